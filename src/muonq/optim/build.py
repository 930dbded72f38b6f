"""The optimizer factory: ``optimizer_params`` -> an :class:`OptimizerSet`.

Every Muon variant is the same :class:`~muonq.optim.muon.Muon` engine; the config picks its momentum
store (fp32, 8-bit, MuonQ, GRASP), MuonQ's normalization and MuonEq's equilibration.
"""

from __future__ import annotations

from typing import Any

import torch

from muonq.config import MUON_FAMILY, OPTIMIZERS
from muonq.optim.equilibrate import Equilibrate
from muonq.optim.muon import Muon
from muonq.optim.optimizer_set import OptimizerSet


def _adamw_groups(params: list[torch.nn.Parameter], weight_decay: float, lr: float) -> list[dict[str, Any]]:
    """Decay matrices (embeddings, head); never norms or biases."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lr": lr, "role": "adamw"},
        {"params": no_decay, "weight_decay": 0.0, "lr": lr, "role": "adamw_no_decay"},
    ]
    return [g for g in groups if g["params"]]


def _build_adamw(name: str, groups: list[dict[str, Any]], args: Any, device_type: str) -> torch.optim.Optimizer:
    betas = tuple(float(b) for b in args.adamw_betas)
    if name == "adamw8bit":
        try:
            from torchao.optim import AdamW8bit
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("optimizer_params=adamw8bit needs torchao: pip install torchao") from err
        return AdamW8bit(groups, lr=groups[0]["lr"], betas=betas, eps=args.adamw_eps, block_size=args.block_size)
    fused = device_type == "cuda"
    return torch.optim.AdamW(groups, lr=groups[0]["lr"], betas=betas, eps=args.adamw_eps, fused=fused or None)


def build_muon(args: Any, params: list[torch.nn.Parameter], *, kernels: str = "auto") -> Muon:
    """The Muon engine configured from ``optimizer_params.args``; ``kernels`` is
    ``optimizer_params.kernels`` (fused Triton kernels or the PyTorch reference for quantized state)."""
    from muonq.optim.variants import store_selector

    pre_ns = None
    if args.equilibrate != "none":
        pre_ns = Equilibrate(
            mode=args.equilibrate, exponent=args.eq_exponent, phase=args.phase, clip=args.eq_clip, eps=args.eq_eps
        )
    return Muon(
        [{"params": params, "role": "muon"}],
        lr=args.lr,
        weight_decay=args.weight_decay,
        momentum=args.momentum,
        nesterov=args.nesterov,
        ns_steps=args.ns_steps,
        ns_batch_size=args.ns_batch_size,
        scale_mode=args.scale_mode,
        momentum_form=args.momentum_form,
        normalize=args.norm,
        store=store_selector(args, kernels=kernels),
        pre_ns=pre_ns,
    )


def build_optimizer(
    opt_cfg: Any,
    *,
    hidden: list[torch.nn.Parameter],
    others: list[torch.nn.Parameter],
    device_type: str = "cpu",
) -> OptimizerSet:
    """Build the optimizer named by ``opt_cfg.name`` over a model's parameters.

    ``hidden`` are the 2-D hidden matrices (attention, MLP) that Muon variants own; ``others``
    (embeddings, LM head, norms, biases) always go to AdamW with full-precision state.
    """
    name, args = opt_cfg.name, opt_cfg.args
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    adamw_lr = args.adamw_lr if args.adamw_lr is not None else args.lr
    if name in MUON_FAMILY:
        optimizers: dict[str, torch.optim.Optimizer] = {}
        if hidden:
            optimizers["muon"] = build_muon(args, hidden, kernels=getattr(opt_cfg, "kernels", "auto"))
        if others:
            optimizers["adamw"] = _build_adamw("adamw", _adamw_groups(others, args.weight_decay, adamw_lr), args, device_type)
        return OptimizerSet(optimizers)
    groups = _adamw_groups(list(hidden) + list(others), args.weight_decay, args.lr)
    return OptimizerSet({"adamw": _build_adamw(name, groups, args, device_type)})
