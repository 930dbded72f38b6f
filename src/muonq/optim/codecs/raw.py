"""The identity codec: values kept as plain floats (e.g. full-precision decomposition factors)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from muonq.optim.codecs.base import Codec, Encoded, Shape, check_shape


class RawCodec(Codec):
    """Stores ``values`` in ``dtype`` (fp32 by default: lossless for fp32 input)."""

    bits = 32

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        if not dtype.is_floating_point:
            raise ValueError(f"RawCodec needs a floating dtype, got {dtype}")
        self.dtype = dtype

    def __repr__(self) -> str:
        return f"RawCodec({self.dtype})"

    def encode(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> Encoded:
        return {"values": x.to(self.dtype, copy=True)}

    def decode(self, encoded: Mapping[str, torch.Tensor], shape: Shape, *, out: torch.Tensor | None = None) -> torch.Tensor:
        values = encoded["values"].view(check_shape(shape))
        return values.to(torch.float32, copy=True) if out is None else out.copy_(values)

    def zeros(self, shape: Shape, device: torch.device | str = "cpu") -> Encoded:
        return {"values": torch.zeros(check_shape(shape), dtype=self.dtype, device=device)}

    def nbytes(self, shape: Shape) -> int:
        return math.prod(check_shape(shape)) * torch.finfo(self.dtype).bits // 8

    def dtypes(self) -> dict[str, torch.dtype]:
        return {"values": self.dtype}
