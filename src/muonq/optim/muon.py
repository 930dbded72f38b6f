"""The one Muon engine. Every variant (fp32, 8-bit, MuonQ, GRASP, MuonEq) is this optimizer with a
different :class:`~muonq.optim.momentum.MomentumStore` and optional transforms around Newton–Schulz."""

from __future__ import annotations

import math
from typing import Callable, Iterable, Literal

import torch

from muonq.optim.momentum import FullPrecisionStore, MomentumStore
from muonq.optim.stores import preserve_state_dtypes
from muonq.optim.newton_schulz import QUINTIC_COEFFS, zeropower_via_newtonschulz

ScaleMode = Literal["match_rms_adamw", "original"]
MomentumForm = Literal["sum", "ema"]
# Maps (update U, step index) -> transformed U, applied right before Newton–Schulz (e.g. MuonEq).
PreNSTransform = Callable[[torch.Tensor, int], torch.Tensor]
StoreSelector = Callable[[torch.Tensor], MomentumStore]


def update_scale(shape: torch.Size, mode: ScaleMode) -> float:
    """Multiplier on the orthogonalised update of an m x n matrix.

    ``match_rms_adamw`` gives the update an RMS of about 0.2, AdamW's typical update RMS, so AdamW's
    learning rate and weight decay carry over; ``original`` is Keller Jordan's sqrt(max(1, m/n)).
    """
    rows, cols = shape[-2], shape[-1]
    if mode == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    if mode == "original":
        return math.sqrt(max(1.0, rows / cols))
    raise ValueError(f"unknown scale_mode {mode!r}; expected 'match_rms_adamw' or 'original'")


class Muon(torch.optim.Optimizer):
    """Muon for 2-D matrices: momentum, Newton–Schulz, scaled update, decoupled weight decay.

    ``momentum_form='sum'`` keeps B <- mu B + G (the form MuonQ and the 8-bit paper use);
    ``'ema'`` keeps B <- mu B + (1 - mu) G, the form of ``torch.optim.Muon``. ``normalize`` is MuonQ's
    pre-quantization normalisation: G and the new B are scaled to unit Frobenius norm.
    ``ns_dtype`` None runs Newton–Schulz in bf16 on GPUs and in fp32 on CPUs, where bf16 matmuls are
    emulated and several times slower.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        *,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        nesterov: bool = False,
        ns_steps: int = 5,
        ns_coefficients: tuple[float, float, float] = QUINTIC_COEFFS,
        ns_dtype: torch.dtype | None = None,
        eps: float = 1e-7,
        scale_mode: ScaleMode = "match_rms_adamw",
        momentum_form: MomentumForm = "sum",
        normalize: bool = False,
        store: MomentumStore | StoreSelector | None = None,
        pre_ns: PreNSTransform | None = None,
    ) -> None:
        if lr <= 0:
            raise ValueError(f"Muon lr must be > 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Muon momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"Muon weight_decay must be >= 0, got {weight_decay}")
        if ns_steps < 1:
            raise ValueError(f"Muon ns_steps must be >= 1, got {ns_steps}")
        if momentum_form not in ("sum", "ema"):
            raise ValueError(f"Muon momentum_form must be 'sum' or 'ema', got {momentum_form!r}")
        update_scale(torch.Size((1, 1)), scale_mode)  # validates the name
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            eps=eps,
            scale_mode=scale_mode,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon only takes 2-D parameters, got one of shape {tuple(p.shape)}")
        self.ns_coefficients = ns_coefficients
        self.ns_dtype = ns_dtype
        self.momentum_form = momentum_form
        self.normalize = normalize
        self.pre_ns = pre_ns
        if store is None:
            store = FullPrecisionStore()
        self._select_store: StoreSelector = store if not isinstance(store, MomentumStore) else (lambda _p, s=store: s)
        self._stores: dict[torch.Tensor, MomentumStore] = {}
        # torch casts loaded state to the parameter dtype; codes and fp16 scales must stay as saved.
        preserve_state_dtypes(self)

    def store_for(self, param: torch.Tensor) -> MomentumStore:
        """The momentum store that serves ``param`` (chosen once, from its shape and size)."""
        store = self._stores.get(param)
        if store is None:
            store = self._stores[param] = self._select_store(param)
        return store

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        ema = self.momentum_form == "ema"
        for group in self.param_groups:
            beta = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                self._update_param(p, group, beta=beta, ema=ema)
        return loss

    def _update_param(self, p: torch.Tensor, group: dict, *, beta: float, ema: bool) -> None:
        state = self.state[p]
        store = self.store_for(p)
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            store.init(state, p)
        step = int(state["step"].item())
        grad = p.grad.float()
        if self.normalize:
            grad = grad / grad.norm().clamp_min(group["eps"])
        momentum = store.accumulate(
            state, grad, beta=beta, ema=ema, renormalize=self.normalize
        )
        # ``momentum`` may alias the stored buffer: derive U without writing into it.
        if group["nesterov"]:
            update = grad.lerp(momentum, beta) if ema else grad.add(momentum, alpha=beta)
        else:
            update = momentum
        if self.pre_ns is not None:
            update = self.pre_ns(update, step)
        ns_dtype = self.ns_dtype or (torch.bfloat16 if update.is_cuda else torch.float32)
        ortho = zeropower_via_newtonschulz(
            update, group["ns_steps"], coefficients=self.ns_coefficients, eps=group["eps"], dtype=ns_dtype
        )
        lr = group["lr"]
        if group["weight_decay"]:
            p.mul_(1.0 - lr * group["weight_decay"])
        p.add_(ortho.to(p.dtype), alpha=-lr * update_scale(p.shape, group["scale_mode"]))
        state["step"] += 1
