"""Scale storage. Two rules:

- :func:`store_scale` (every codec without companding): the group absmax, rounded *up* into the
  scale dtype, so |x| <= stored scale holds for every element and x / scale never leaves [-1, 1].
- :func:`step_scale` (companded codecs, MuonQ's quantizer, as the original implementation does it):
  the values are divided by the fp32 step absmax / levels, and the step is stored rounded to
  nearest in the scale dtype, which is what decoding multiplies by.
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


# The smallest step a companded codec divides by (the original implementation's eps): an all-zero
# group gets codes 0, and a stored step that rounds to 0 in the scale dtype decodes to zeros.
STEP_FLOOR = 1e-8


def step_scale(absmax: torch.Tensor, levels: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(stored, divisor) of companded codecs: the step absmax / levels in fp32 is what the values
    are divided by (floored at :data:`STEP_FLOOR`); it is stored rounded to nearest in ``dtype``
    and decoding multiplies by the stored value. absmax <= 1 here, so nothing saturates."""
    step = absmax.float() / levels
    return step.to(dtype), step.clamp_min(STEP_FLOOR)


def safe_divisor(scale: torch.Tensor) -> torch.Tensor:
    """The scale as fp32 with zeros replaced by one: a zero scale only occurs where every element
    of the group is zero, so dividing by one keeps them zero (no 0/0)."""
    scale = scale.float()
    return torch.where(scale > 0, scale, torch.ones_like(scale))
