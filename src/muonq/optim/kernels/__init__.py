"""Which implementation runs a quantized momentum store's update: fused Triton kernels or the
codecs (the reference).

``optimizer_params.kernels``:

- ``auto``: Triton on CUDA tensors when ``triton`` imports and the store's codecs have kernels;
  the codecs everywhere else. On the CPU the codecs encode and decode in C loops (compiled on
  first use, see :mod:`muonq.optim.codecs.native`) where those apply, with the PyTorch codecs'
  bytes and values (the scale search: up to ties in fp32 rounding), and in PyTorch otherwise.
- ``triton``: always Triton. A store whose codecs have no kernel (e.g. stochastic rounding) is
  refused when it is built, and so is a missing ``triton``; CPU tensors are refused at the first
  step unless ``TRITON_INTERPRET=1`` (Triton's interpreter) was set before the kernels were imported.
- ``reference``: always the PyTorch codecs, every step in PyTorch.

Nothing here imports Triton; :mod:`~muonq.optim.kernels.fused` does, on first use.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from muonq.optim.spec import KERNEL_MODES
from muonq.optim.codecs import Codec
from muonq.optim.kernels.spec import unfusable_reason

KernelMode = Literal["auto", "triton", "reference"]


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether ``triton`` can be imported (checked once)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - a broken install counts as missing
        return False
    return True


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class KernelChoice:
    """A store's decision, made once when it is built; :meth:`applies` decides per call by device."""

    mode: str
    unfusable: str | None  # why the store's codecs have no kernel; None when they all have one

    def applies(self, tensor: torch.Tensor) -> bool:
        """Whether the fused path runs for a step whose gradient is ``tensor``."""
        if self.mode == "reference" or self.unfusable is not None:
            return False
        if tensor.is_cuda:
            return self.mode == "triton" or triton_available()
        if self.mode == "auto":
            return False
        if interpreting():
            return True
        raise ValueError(
            f"optimizer_params.kernels=triton runs Triton kernels on CUDA tensors, got a {tensor.device.type} "
            "tensor; use kernels=auto or reference, or set TRITON_INTERPRET=1 before importing muonq to run "
            "the kernels in Triton's CPU interpreter"
        )


def choose_kernels(mode: str, codecs: Sequence[Codec], unfusable: str | None = None) -> KernelChoice:
    """The kernel choice of a store whose state is encoded with ``codecs``; ``unfusable``: why the
    store itself has no fused kernel, if it has none."""
    if mode not in KERNEL_MODES:
        raise ValueError(f"optimizer_params.kernels must be one of {KERNEL_MODES}, got {mode!r}")
    reasons = ([unfusable] if unfusable else []) + [reason for codec in codecs if (reason := unfusable_reason(codec))]
    if mode == "triton":
        if not triton_available():
            raise ValueError(
                "optimizer_params.kernels=triton needs the triton package (pip install triton, on a CUDA "
                "machine); use kernels=auto or reference"
            )
        if reasons:
            raise ValueError(
                f"optimizer_params.kernels=triton: no fused kernel for this momentum store ({reasons[0]}); "
                "use kernels=auto, which falls back to the PyTorch reference"
            )
    return KernelChoice(mode, reasons[0] if reasons else None)


__all__ = ["KERNEL_MODES", "KernelChoice", "KernelMode", "choose_kernels", "interpreting", "triton_available"]
