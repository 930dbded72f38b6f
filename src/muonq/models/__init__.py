"""Model families (LLaMA, GPT-2) whose weights map one-to-one onto Hugging Face checkpoints."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from muonq.config import ModelConfig
from muonq.models.base import CausalLM
from muonq.models.gpt import GPT
from muonq.models.llama import Llama

__all__ = ["CausalLM", "GPT", "Llama", "as_model_config", "build_model"]

_FAMILIES: dict[str, type[CausalLM]] = {"llama": Llama, "gpt": GPT}


def as_model_config(cfg: ModelConfig | Any) -> ModelConfig:
    """A :class:`ModelConfig` from itself or anything with the same attributes (an OmegaConf node)."""
    if isinstance(cfg, ModelConfig):
        return cfg
    return ModelConfig(**{f.name: getattr(cfg, f.name) for f in fields(ModelConfig)})


def build_model(cfg: ModelConfig | Any) -> CausalLM:
    """The initialized model that ``cfg.model_type`` names, on the current default device.

    Build under ``torch.device("meta")`` to get shapes without memory; then ``to_empty(device=...)``
    and ``init_weights()``.
    """
    cfg = as_model_config(cfg)
    if cfg.model_type not in _FAMILIES:
        raise ValueError(f"model.model_type: got {cfg.model_type!r}, expected one of {', '.join(_FAMILIES)}")
    return _FAMILIES[cfg.model_type](cfg)
