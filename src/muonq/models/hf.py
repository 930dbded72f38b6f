"""The mapping onto Hugging Face ``LlamaForCausalLM`` / ``GPT2LMHeadModel``, for export and tests."""

from __future__ import annotations

from typing import Any

import torch
from transformers import GPT2Config, LlamaConfig, PreTrainedConfig

from muonq.config import ModelConfig
from muonq.models import as_model_config
from muonq.models.base import CausalLM

# Our nn.Linear layers that HF's GPT-2 stores as Conv1D, i.e. transposed.
_GPT_CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def hf_config(model_cfg: ModelConfig | Any) -> PreTrainedConfig:
    """The transformers config of the same architecture (no dropout)."""
    cfg = as_model_config(model_cfg)
    if cfg.model_type == "llama":
        return LlamaConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.n_embd,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.n_layer,
            num_attention_heads=cfg.n_head,
            num_key_value_heads=cfg.n_head,
            max_position_embeddings=cfg.block_size,
            rms_norm_eps=cfg.norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
            initializer_range=cfg.init_std,
            tie_word_embeddings=False,
        )
    if cfg.model_type == "gpt":
        return GPT2Config(
            vocab_size=cfg.vocab_size,
            n_positions=cfg.block_size,
            n_embd=cfg.n_embd,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            activation_function="gelu_new",  # the tanh approximation
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            layer_norm_epsilon=cfg.norm_eps,
            initializer_range=cfg.init_std,
            tie_word_embeddings=True,
        )
    raise ValueError(f"model.model_type: got {cfg.model_type!r}, expected llama or gpt")


def to_hf_state_dict(model: CausalLM) -> dict[str, torch.Tensor]:
    """The model's weights under HF names and layouts: identical for LLaMA; for GPT-2 the Conv1D
    weights transposed and the tied ``lm_head.weight`` dropped (HF re-ties it on load)."""
    state = {name: t.detach() for name, t in model.state_dict().items()}
    if model.cfg.model_type != "gpt":
        return state
    state.pop("lm_head.weight")
    return {name: t.t().contiguous() if name.endswith(_GPT_CONV1D_SUFFIXES) else t for name, t in state.items()}
