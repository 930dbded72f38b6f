"""Scale storage. Two rules:

- :func:`store_scale` (every codec without companding): the group absmax, rounded *up* into the
  scale dtype, so |x| <= stored scale holds for every element and x / scale never leaves [-1, 1].
- :func:`store_step` (companded codecs, MuonQ's quantizer): the quantization step absmax / levels,
  rounded to nearest, as the original MuonQ implementation stores it; x / step may then exceed
  the top level by a fraction of an ulp-sized step, and the code is clamped.
"""

from __future__ import annotations

import torch

SCALE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_scale_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype not in SCALE_DTYPES:
        raise ValueError(f"scale dtype must be one of {SCALE_DTYPES}, got {dtype}")
    return dtype


def store_scale(absmax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``absmax`` (fp32, >= 0) as ``dtype``: rounded up to the next representable value, positive
    values that would underflow become the smallest subnormal, values above the dtype's range
    saturate at its max (those groups then clip, and nothing becomes inf)."""
    clamped = absmax.float().clamp(0.0, torch.finfo(dtype).max)
    stored = clamped.to(dtype)
    if dtype == torch.float32:
        return stored
    up = torch.nextafter(stored, torch.full_like(stored, float("inf")))
    return torch.where(stored.float() < clamped, up, stored)


def store_step(absmax: torch.Tensor, levels: int, dtype: torch.dtype) -> torch.Tensor:
    """The step ``absmax / levels`` (fp32 division) as ``dtype``, rounded to nearest. Positive steps
    that would underflow to zero become the smallest subnormal (so a group that is not all zero
    keeps a non-zero scale); values above the dtype's range saturate at its max."""
    step = (absmax.float() / levels).clamp_(0.0, torch.finfo(dtype).max)
    stored = step.to(dtype)
    if dtype == torch.float32:
        return stored
    tiny = torch.nextafter(torch.zeros_like(stored), torch.ones_like(stored))
    return torch.where((stored == 0) & (step > 0), tiny, stored)


def safe_divisor(scale: torch.Tensor) -> torch.Tensor:
    """The scale as fp32 with zeros replaced by one: a zero scale only occurs where every element
    of the group is zero, so dividing by one keeps them zero (no 0/0)."""
    scale = scale.float()
    return torch.where(scale > 0, scale, torch.ones_like(scale))
