"""Symmetric linear value map: 2**(bits-1) - 1 levels each side of an exact zero."""

from __future__ import annotations

import torch

from muonq.optim.codecs.base import ValueMap, uniform_noise
from muonq.optim.codecs.packing import check_bits


class LinearMap(ValueMap):
    """y in [-1, 1] -> q = round(y * L), L = 127 (8-bit) or 7 (4-bit); stored as q + 2**(bits-1),
    so codes are unsigned and code 0 is unused.

    :meth:`encode_steps` / :meth:`decode_steps` are the same map in units of one quantization step
    (u in [-L, L] -> round(u)), for codecs whose stored scale is the step rather than the absmax."""

    def __init__(self, bits: int) -> None:
        self.bits = check_bits(bits)
        # 8-bit codes decode with one conversion and one subtraction; 4-bit codes would first be
        # unpacked, which costs more than gathering them from the codec's table
        self.cheap_decode = bits == 8
        self.levels = 2 ** (bits - 1) - 1
        self._offset = 2 ** (bits - 1)

    def __repr__(self) -> str:
        return f"LinearMap(bits={self.bits})"

    @property
    def zero_code(self) -> int:
        return self._offset

    def encode(self, y, *, stochastic=False, generator=None):
        return self.encode_steps(y.float() * self.levels, stochastic=stochastic, generator=generator)

    def decode(self, codes):
        return self.decode_steps(codes).div_(self.levels)

    def encode_steps(self, u: torch.Tensor, *, stochastic: bool = False,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """Codes of u measured in steps: round half to even (or stochastically) to an integer in
        [-L, L]. ``u`` is not modified."""
        u = u.float()
        q = (u + uniform_noise(u, generator)).floor_() if stochastic else u.round()
        return q.clamp_(-self.levels, self.levels).add_(self._offset).to(torch.uint8)

    def decode_into(self, codes, out):
        return self.decode_steps_into(codes, out).div_(self.levels)

    def decode_steps(self, codes: torch.Tensor) -> torch.Tensor:
        """The integer level q in [-L, L] of each code, as fp32."""
        return codes.float().sub_(self._offset)

    def decode_steps_into(self, codes: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """:meth:`decode_steps` written into ``out`` (fp32, the shape of ``codes``)."""
        return out.copy_(codes).sub_(self._offset)
