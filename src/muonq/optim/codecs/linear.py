"""Symmetric linear value map: 2**(bits-1) - 1 levels each side of an exact zero."""

from __future__ import annotations

import torch

from muonq.optim.codecs.base import ValueMap, uniform_noise
from muonq.optim.codecs.packing import check_bits


class LinearMap(ValueMap):
    """y in [-1, 1] -> q = round(y * L), L = 127 (8-bit) or 7 (4-bit); stored as q + 2**(bits-1),
    so codes are unsigned and code 0 is unused."""

    cheap_decode = True

    def __init__(self, bits: int) -> None:
        self.bits = check_bits(bits)
        self.levels = 2 ** (bits - 1) - 1
        self._offset = 2 ** (bits - 1)

    def __repr__(self) -> str:
        return f"LinearMap(bits={self.bits})"

    @property
    def zero_code(self) -> int:
        return self._offset

    def encode(self, y, *, stochastic=False, generator=None):
        scaled = y.float() * self.levels
        q = (scaled + uniform_noise(scaled, generator)).floor_() if stochastic else scaled.round_()
        return q.clamp_(-self.levels, self.levels).add_(self._offset).to(torch.uint8)

    def decode(self, codes):
        return codes.float().sub_(self._offset).div_(self.levels)

    def decode_into(self, codes, out):
        return out.copy_(codes).sub_(self._offset).div_(self.levels)
