"""How one matrix's Muon momentum is kept between optimizer steps.

A :class:`MomentumStore` is a stateless policy. Everything it persists lives as tensors in the
optimizer's per-parameter ``state`` dict, so ``Optimizer.state_dict()``, checkpoints and the
state-byte count all see exactly what is stored (codes, scales, factors), never a float copy.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

StateDict = dict[str, torch.Tensor]


def accumulate_into(buf: torch.Tensor, grad: torch.Tensor, beta: float, ema: bool,
                    divisor: torch.Tensor | None = None) -> torch.Tensor:
    """buf <- beta buf + G, or lerp(buf, G, 1 - beta) if ``ema``, in place; G is ``grad``, or
    grad / ``divisor`` (a 0-dim tensor) rounded as that division rounds."""
    if divisor is None:
        return buf.lerp_(grad, 1.0 - beta) if ema else buf.mul_(beta).add_(grad)
    return buf.lerp_(grad / divisor, 1.0 - beta) if ema else buf.mul_(beta).addcdiv_(grad, divisor)


def renormalize_(momentum: torch.Tensor, eps: float) -> torch.Tensor:
    """momentum / max(||momentum||_F, eps) in place (MuonQ's normalisation of B)."""
    return momentum.div_(torch.linalg.vector_norm(momentum).clamp_min(eps))


class MomentumStore(ABC):
    """Reads and writes the momentum buffer B of one m x n matrix."""

    name: str = "abstract"
    # Whether ns_input folds a gradient's division (grad_divisor) into its own pass over the
    # gradient; the optimizer divides beforehand for stores that do not.
    folds_grad_division: bool = False

    @abstractmethod
    def init(self, state: StateDict, param: torch.Tensor) -> None:
        """Create the stored form of a zero momentum for ``param`` inside ``state``."""

    @abstractmethod
    def load(self, state: StateDict, *, matmul_dtype: torch.dtype | None = None) -> torch.Tensor:
        """Return the stored momentum as an fp32 tensor of the parameter's shape. ``matmul_dtype``:
        as in :meth:`save` (the decomposition's low-rank product)."""

    @abstractmethod
    def save(self, state: StateDict, momentum: torch.Tensor, *, matmul_dtype: torch.dtype | None = None) -> None:
        """Encode ``momentum`` (fp32, parameter shape) into ``state``. ``matmul_dtype`` is the dtype
        of any matmul the encoding runs (the decomposition's power iteration); None: the machine's
        faster one (:func:`muonq.optim.precision.fast_matmul_dtype`)."""

    def accumulate(
        self,
        state: StateDict,
        grad: torch.Tensor,
        *,
        beta: float,
        ema: bool,
        renormalize: bool,
        eps: float = 1e-12,
        matmul_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """B <- beta * B_stored + grad, or the EMA B <- lerp(B_stored, grad, 1 - beta) if ``ema``;
        then B / ||B||_F if ``renormalize``. ``matmul_dtype``: as in :meth:`save`.

        Stores B and returns it unquantized: Newton–Schulz runs on this step's exact momentum and
        quantization only affects what is carried to the next step. Fused kernels override this.
        """
        momentum = accumulate_into(self.load(state, matmul_dtype=matmul_dtype), grad, beta, ema)
        if renormalize:
            renormalize_(momentum, eps)
        self.save(state, momentum, matmul_dtype=matmul_dtype)
        return momentum

    def ns_input(
        self,
        state: StateDict,
        grad: torch.Tensor,
        *,
        beta: float,
        ema: bool,
        renormalize: bool,
        nesterov: bool,
        dtype: torch.dtype,
        eps: float = 1e-12,
        matmul_dtype: torch.dtype | None = None,
        grad_divisor: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """:meth:`accumulate`, then Newton–Schulz's input U in ``dtype``: the new momentum B, or
        with ``nesterov`` grad + beta B (EMA form: lerp(grad, B, beta)).

        ``grad_divisor`` (a 0-dim tensor): the gradient is grad / grad_divisor (see
        ``folds_grad_division``). U may alias the stored buffer: callers must not write into it.
        Fused kernels override this to produce U in the same pass as the update.
        """
        if grad_divisor is not None:
            grad = grad / grad_divisor
        momentum = self.accumulate(state, grad, beta=beta, ema=ema, renormalize=renormalize, eps=eps,
                                   matmul_dtype=matmul_dtype)
        if nesterov:
            momentum = grad.lerp(momentum, beta) if ema else grad.add(momentum, alpha=beta)
        return momentum.to(dtype)


class FullPrecisionStore(MomentumStore):
    """Plain fp32 momentum: 4 bytes per element, the reference every codec is compared with."""

    name = "fp32"

    def init(self, state: StateDict, param: torch.Tensor) -> None:
        state["momentum_buffer"] = torch.zeros_like(param, dtype=torch.float32, memory_format=torch.preserve_format)

    def load(self, state: StateDict, *, matmul_dtype: torch.dtype | None = None) -> torch.Tensor:
        return state["momentum_buffer"].clone()

    def save(self, state: StateDict, momentum: torch.Tensor, *, matmul_dtype: torch.dtype | None = None) -> None:
        state["momentum_buffer"].copy_(momentum)

    def accumulate(self, state, grad, *, beta, ema, renormalize, eps=1e-12, matmul_dtype=None):
        buf = accumulate_into(state["momentum_buffer"], grad, beta, ema)
        if renormalize:
            renormalize_(buf, eps)
        return buf


# Picks the store of each parameter (from its shape and size); see muonq.optim.selection.
StoreSelector = Callable[[torch.Tensor], MomentumStore]
