"""The optimizer factory: an :class:`~muonq.optim.spec.OptimizerSpec` -> an :class:`OptimizerSet`.

Every Muon variant is the same :class:`~muonq.optim.muon.Muon` engine; the spec picks its momentum
store (fp32, 8-bit, MuonQ, GRASP), MuonQ's normalization and MuonEq's equilibration.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from muonq.optim.equilibrate import Equilibrate
from muonq.optim.muon import Muon
from muonq.optim.optimizer_set import OptimizerSet
from muonq.optim.selection import store_selector
from muonq.optim.spec import AdamWSpec, MuonSpec, OptimizerSpec


def _adamw_groups(params: list[torch.nn.Parameter], weight_decay: float, lr: float) -> list[dict[str, Any]]:
    """Decay matrices (embeddings, head); never norms or biases."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lr": lr, "role": "adamw"},
        {"params": no_decay, "weight_decay": 0.0, "lr": lr, "role": "adamw_no_decay"},
    ]
    return [g for g in groups if g["params"]]


# The 8- and 4-bit AdamW sides are torchao's, not this project's codecs: those are made for Muon's
# one signed momentum, while AdamW also keeps an unsigned second moment spanning decades, which at
# 4 bits needs a code map without zero (Li et al., 2023). torchao implements the published 8-bit
# (Dettmers et al., 2022) and 4-bit AdamW with such maps, and DTensor state for FSDP, so the AdamW
# side stays a known baseline instead of a new optimizer to validate.
_TORCHAO_ADAMW = {8: "AdamW8bit", 4: "AdamW4bit"}


def build_adamw(spec: AdamWSpec, params: list[torch.nn.Parameter], device_type: str) -> torch.optim.Optimizer:
    """torch's AdamW (fused on CUDA), or torchao's AdamW8bit / AdamW4bit for ``spec.bits`` 8 / 4."""
    groups = _adamw_groups(params, spec.weight_decay, spec.lr)
    if spec.bits in _TORCHAO_ADAMW:
        try:
            import torchao.optim
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError(f"{spec.bits}-bit AdamW state (adamw_bits={spec.bits}) needs torchao: "
                              "pip install torchao") from err
        adamw = getattr(torchao.optim, _TORCHAO_ADAMW[spec.bits])
        return adamw(groups, lr=spec.lr, betas=spec.betas, eps=spec.eps, block_size=spec.block_size)
    assert spec.bits == 32, spec
    fused = device_type == "cuda"
    return torch.optim.AdamW(groups, lr=spec.lr, betas=spec.betas, eps=spec.eps, fused=fused or None)


def build_muon(spec: MuonSpec, params: list[torch.nn.Parameter], *, kernels: str = "auto",
               qkv_blocks: Mapping[torch.Tensor, int] | None = None) -> Muon:
    """The Muon engine a :class:`MuonSpec` describes; ``kernels`` picks fused Triton kernels or the
    PyTorch reference for quantized state; ``qkv_blocks``: the fused QKV weights among ``params``
    (parameter -> 3), split into their matrices when ``spec.split_qkv``."""
    eq = spec.equilibrate
    pre_ns = None
    if eq is not None:
        pre_ns = Equilibrate(mode=eq.mode, exponent=eq.exponent, phase=eq.phase, clip=eq.clip, eps=eq.eps)
    return Muon(
        [{"params": params, "role": "muon"}],
        lr=spec.lr,
        weight_decay=spec.weight_decay,
        momentum=spec.momentum,
        nesterov=spec.nesterov,
        ns_steps=spec.ns_steps,
        ns_batch_size=spec.ns_batch_size,
        matmul_dtype=spec.matmul_dtype,
        scale_mode=spec.scale_mode,
        momentum_form=spec.momentum_form,
        normalize=spec.normalize,
        store=store_selector(spec.store, kernels=kernels),
        pre_ns=pre_ns,
        row_blocks=spec.row_blocks(qkv_blocks or {}),
    )


def build_optimizer(
    spec: OptimizerSpec,
    *,
    hidden: list[torch.nn.Parameter],
    others: list[torch.nn.Parameter],
    device_type: str = "cpu",
    qkv_blocks: Mapping[torch.Tensor, int] | None = None,
) -> OptimizerSet:
    """The optimizer ``spec`` describes, over a model's parameters.

    ``hidden`` are the 2-D hidden matrices (attention, MLP) that the Muon family's Muon owns;
    ``others`` (embeddings, LM head, norms, biases) always go to AdamW. The adamw family puts both
    under AdamW. ``qkv_blocks``: the fused QKV weights among ``hidden`` (see :func:`build_muon`).
    """
    if spec.muon is None:
        return OptimizerSet({"adamw": build_adamw(spec.adamw, list(hidden) + list(others), device_type)})
    optimizers: dict[str, torch.optim.Optimizer] = {}
    if hidden:
        optimizers["muon"] = build_muon(spec.muon, hidden, kernels=spec.kernels, qkv_blocks=qkv_blocks)
    if others:
        optimizers["adamw"] = build_adamw(spec.adamw, others, device_type)
    return OptimizerSet(optimizers)
