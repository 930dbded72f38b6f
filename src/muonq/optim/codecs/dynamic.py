"""The signed dynamic-tree code map of the 8-bit optimizer literature (Dettmers et al., 2021).

256 values in [-1, 1]: 0, +1, and for each decade 10**-6 ... 10**0 (decade index d = 0 ... 6) the
midpoints of 2**d equal bins of [0.1, 1] times 10**(d - 6), with both signs. Small magnitudes get
relative (not absolute) resolution, which linear codes lack.
"""

from __future__ import annotations

import torch

from muonq.optim.codecs.base import ValueMap, uniform_noise

_DECADES = 7


def dynamic_code_values() -> torch.Tensor:
    """The 256 code values, sorted ascending (fp32)."""
    values = [torch.tensor([0.0, 1.0], dtype=torch.float64)]
    for d in range(_DECADES):
        edges = torch.linspace(0.1, 1.0, 2**d + 1, dtype=torch.float64)
        mids = (edges[:-1] + edges[1:]) / 2 * 10.0 ** (d - (_DECADES - 1))
        values += [mids, -mids]
    table = torch.cat(values).sort().values.float()
    assert table.numel() == 256 and table.unique().numel() == 256
    return table


class DynamicMap(ValueMap):
    """Nearest code value (via ``bucketize`` on the midpoints); stochastic rounding picks one of the
    two neighbouring values with probability linear in the distance (unbiased inside [min, max])."""

    bits = 8

    def __init__(self) -> None:
        self._values = dynamic_code_values()
        self._midpoints = (self._values[:-1] + self._values[1:]) / 2
        self._zero = int(torch.nonzero(self._values == 0).item())
        self._cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __repr__(self) -> str:
        return "DynamicMap()"

    @property
    def zero_code(self) -> int:
        return self._zero

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._cache:
            self._cache[device] = (self._values.to(device), self._midpoints.to(device))
        return self._cache[device]

    def encode(self, y, *, stochastic=False, generator=None):
        y = y.float().contiguous()
        values, midpoints = self._tables(y.device)
        if not stochastic:
            return torch.bucketize(y, midpoints).to(torch.uint8)
        low = (torch.bucketize(y, values, right=True) - 1).clamp_(0, values.numel() - 2)
        v_low, v_high = values[low], values[low + 1]
        p_high = ((y - v_low) / (v_high - v_low)).clamp_(0.0, 1.0)
        return (low + (uniform_noise(y, generator) < p_high)).to(torch.uint8)

    def decode(self, codes):
        values, _ = self._tables(codes.device)
        return values[codes.long()]
