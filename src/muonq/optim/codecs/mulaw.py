"""mu-law companded linear map (MuonQ): finer levels near zero, where momentum entries are dense."""

from __future__ import annotations

import math

import torch

from muonq.optim.codecs.base import ValueMap
from muonq.optim.codecs.linear import LinearMap


class MuLawMap(ValueMap):
    """z = sign(y) ln(1 + mu |y|) / ln(1 + mu), then linear codes of z; decode inverts.

    Stochastic rounding is unbiased in the companded domain z, not in y.
    """

    def __init__(self, bits: int, mu: float = 255.0) -> None:
        if not mu > 0:
            raise ValueError(f"mu-law needs mu > 0, got {mu}")
        self._linear = LinearMap(bits)
        self.bits = bits
        self.mu = float(mu)
        self._log1p_mu = math.log1p(self.mu)

    def __repr__(self) -> str:
        return f"MuLawMap(bits={self.bits}, mu={self.mu})"

    @property
    def zero_code(self) -> int:
        return self._linear.zero_code

    def encode(self, y, *, stochastic=False, generator=None):
        y = y.float()
        z = torch.log1p(y.abs() * self.mu).div_(self._log1p_mu).copysign_(y)
        return self._linear.encode(z, stochastic=stochastic, generator=generator)

    def decode(self, codes):
        z = self._linear.decode(codes)
        return torch.expm1(z.abs() * self._log1p_mu).div_(self.mu).copysign_(z)
