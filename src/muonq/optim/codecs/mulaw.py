"""mu-law companding: y = sign(x) ln(1 + mu |x|) / ln(1 + mu), finer levels near zero, where momentum
entries are dense.

:class:`MuLawCompander` is MuonQ's quantizer: it acts on the *raw* values, before any scale
(``QuantCodec(..., compander=MuLawCompander(mu))``). Momentum entries of a unit-norm matrix are
~1/sqrt(mn), so its effective strength is about mu x absmax, far gentler than mu itself.

:class:`MuLawMap` is a value map: it compands x / absmax, after the scale, at full strength mu.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from muonq.optim.codecs.base import ValueMap
from muonq.optim.codecs.linear import LinearMap


VECTOR = 64  # elements: a multiple of every CPU's vector width of torch's elementwise loops


def on_whole_vectors(function: Callable[[torch.Tensor], torch.Tensor], values: torch.Tensor) -> torch.Tensor:
    """``function`` (elementwise) of a few flat ``values`` as it computes them inside a matrix: on the
    values padded with zeros to a multiple of :data:`VECTOR` elements, so that none takes torch's
    scalar tail loop, whose log1p and expm1 may differ from the vectorised ones in the last bit."""
    pad = -values.numel() % VECTOR
    return function(F.pad(values, (0, pad)) if pad else values)[: values.numel()]


def check_mu(mu: float) -> float:
    if not mu > 0:
        raise ValueError(f"mu-law needs mu > 0, got {mu}")
    return float(mu)


class MuLawCompander:
    """compand: [-1, 1] -> [-1, 1], y = sign(x) ln(1 + mu |x|) / ln(1 + mu); expand inverts it,
    x = sign(y) ((1 + mu)**|y| - 1) / mu. fp32, in the original implementation's arithmetic:
    log1p(mu |x|) x (1 / ln(1 + mu)) and expm1(|y| ln(1 + mu)) x (1 / mu), the reciprocals
    rounded to fp32."""

    def __init__(self, mu: float = 255.0) -> None:
        self.mu = check_mu(mu)
        self.log1p_mu = math.log1p(self.mu)
        self.inv_log1p_mu = 1.0 / self.log1p_mu
        self.inv_mu = 1.0 / self.mu

    def __repr__(self) -> str:
        return f"MuLawCompander(mu={self.mu})"

    def compand(self, x: torch.Tensor) -> torch.Tensor:
        """x (fp32, in [-1, 1]) companded; a new tensor."""
        return torch.log1p(x.abs() * self.mu).mul_(self.inv_log1p_mu).copysign_(x)

    def expand(self, y: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`compand`; a new tensor."""
        return torch.expm1(y.abs() * self.log1p_mu).mul_(self.inv_mu).copysign_(y)

    # In-place forms for the CPU codec's slices: the same operations, into given buffers.

    def compand_magnitude_(self, a: torch.Tensor, *, clamp: bool = True) -> torch.Tensor:
        """|compand(x clamped to [-1, 1])| in place of ``a`` = |x| (fp32): the clamp as
        min(|x| mu, mu), which equals min(|x|, 1) mu; ``clamp=False`` where every |x| <= 1."""
        a.mul_(self.mu)
        if clamp:
            a.clamp_max_(self.mu)
        return torch.log1p(a, out=a).mul_(self.inv_log1p_mu)

    def expand_(self, y: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
        """:meth:`expand` of ``y`` written into ``y``; ``scratch``: an fp32 buffer of its shape."""
        t = torch.abs(y, out=scratch).mul_(self.log1p_mu)
        return torch.copysign(torch.expm1(t, out=t).mul_(self.inv_mu), y, out=y)


class MuLawMap(ValueMap):
    """z = sign(y) ln(1 + mu |y|) / ln(1 + mu) of the scaled value y = x / absmax, then linear codes
    of z; decode inverts.

    Stochastic rounding is unbiased in the companded domain z, not in y.
    """

    def __init__(self, bits: int, mu: float = 255.0) -> None:
        self._linear = LinearMap(bits)
        self.bits = bits
        self.levels = self._linear.levels  # companded codes are linear codes of z: L levels each side
        self.compander = MuLawCompander(mu)
        self.mu = self.compander.mu

    def __repr__(self) -> str:
        return f"MuLawMap(bits={self.bits}, mu={self.mu})"

    @property
    def zero_code(self) -> int:
        return self._linear.zero_code

    def encode(self, y, *, stochastic=False, generator=None):
        z = self.compander.compand(y.float())
        return self._linear.encode(z, stochastic=stochastic, generator=generator)

    def decode(self, codes):
        return self.compander.expand(self._linear.decode(codes))
