"""Scale storage: absmax values rounded *up* into the scale dtype, so |x| <= stored scale holds for
every element and normalised values never leave [-1, 1]."""

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


def safe_divisor(scale: torch.Tensor) -> torch.Tensor:
    """The scale as fp32 with zeros replaced by one: a zero scale only occurs where every element
    of the group is zero, so dividing by one keeps them zero (no 0/0)."""
    scale = scale.float()
    return torch.where(scale > 0, scale, torch.ones_like(scale))
