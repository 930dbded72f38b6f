"""What a fused kernel needs to know about a codec: the compile-time constants and two small lookup
tables, derived once from a :class:`~muonq.optim.codecs.QuantCodec` (no Triton import here).

Decoding is a table lookup for every value map: ``table[code] * scale``, where the table is the
value map's own ``decode`` of all 2**bits codes, so fused decoding is bit-identical to the codec's.

Encoding uses one of two rules:

- ``ROUND`` (linear map): ``round_half_even(y * levels) + offset``, the same fp32 arithmetic as
  :class:`~muonq.optim.codecs.LinearMap`, hence bit-identical codes.
- ``SEARCH`` (dynamic and mu-law maps): the code is ``first_code`` plus the number of decision
  boundaries strictly below y, found by a branch-free binary search over a sorted table padded with
  +inf to 2**steps - 1 entries. For the dynamic map the boundaries are the midpoints the codec
  bucketizes on (bit-identical). For mu-law they are the midpoints of the companded levels mapped
  back through the inverse companding in float64: this is exact nearest-level rounding in the
  companded domain, where the codec computes log1p in fp32; the two can differ by one level for
  values within a few ulp of a boundary (see docs/kernels.md).

Codecs with a compander (MuonQ's quantizer: mu-law on the raw values, before the scale) use the
ROUND rule in units of the step (``compand``): the kernel compands the clamped values and the
group absmax, rounds y / step with the fp32 step, stores the step rounded to nearest, and decodes
expand(table[code] x stored step) with the table holding the integer levels. It computes log1p
and expm1 from ``tl.log`` / ``tl.exp`` (libdevice has no interpreter version), which agree with
torch's to a few ulp: decoded values then differ by a few ulp, and codes by one level at values
that close to a boundary.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

from muonq.optim.codecs import Codec, DynamicMap, LinearMap, MuLawMap, QuantCodec

# Granularities as the kernels number them. ROW is BLOCK with one block per matrix row.
TENSOR, BLOCK, COLUMN, GRID = 0, 1, 2, 3
# Encoding rules.
ROUND, SEARCH = 0, 1


@dataclass(frozen=True, eq=False)
class KernelSpec:
    """The compile-time shape of a codec as the kernels see it (see the module docstring)."""

    bits: int
    granularity: int
    rule: int
    levels: int  # ROUND: levels each side of zero
    offset: int  # ROUND: code of zero
    first_code: int  # SEARCH: code of the lowest level
    steps: int  # SEARCH: binary-search steps (the boundary table has 2**steps - 1 entries)
    block_size: int  # BLOCK: elements per scale (for row scales, the row length)
    tile_size: int  # GRID
    compand: bool  # mu-law on the raw values before the scale; the scale is the step (ROUND rule)
    mu: float  # compand: mu, ln(1 + mu) and their reciprocals
    log1p_mu: float
    inv_mu: float
    inv_log1p_mu: float
    table: torch.Tensor = field(repr=False)  # fp32, the 2**bits decoded values
    bounds: torch.Tensor = field(repr=False)  # fp32 sorted decision boundaries, +inf padded


@functools.lru_cache(maxsize=None)
def device_tables(spec: KernelSpec, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(decode table, boundary table) of ``spec`` on ``device``, copied once."""
    return spec.table.to(device), spec.bounds.to(device)


def _padded(bounds: torch.Tensor) -> tuple[torch.Tensor, int]:
    steps = max(1, math.ceil(math.log2(bounds.numel() + 1)))
    pad = torch.full((2**steps - 1 - bounds.numel(),), float("inf"))
    return torch.cat([bounds.float(), pad]), steps


def _mulaw_bounds(mu: float, levels: int) -> torch.Tensor:
    """y-domain images of the companded midpoints (k + 1/2) / levels, k = -levels .. levels - 1."""
    z = (torch.arange(-levels, levels, dtype=torch.float64) + 0.5) / levels
    y = torch.expm1(z.abs() * math.log1p(mu)) / mu
    return (y * z.sign()).float()


def unfusable_reason(codec: Codec) -> str | None:
    """Why ``codec`` has no fused kernel, or None if it has one (every shape, block and tile size)."""
    if not isinstance(codec, QuantCodec):
        return f"{type(codec).__name__} is not a quantizing codec"
    if codec.stochastic:
        return "stochastic rounding draws from torch generators, which a kernel cannot reproduce"
    if codec.scale_search:
        return "the scale search (least-squared-error scales) runs in the PyTorch encoder only"
    if type(codec.value_map) not in (LinearMap, DynamicMap, MuLawMap):
        return f"value map {codec.value_map!r} has no kernel"
    return None


def kernel_spec(codec: QuantCodec, shape: tuple[int, ...]) -> KernelSpec:
    """The spec of a fusable ``codec`` (see :func:`unfusable_reason`) for a tensor of ``shape``."""
    return _spec(codec, shape[-1] if codec.granularity == "row" else codec.block_size)


@functools.lru_cache(maxsize=None)
def _spec(codec: QuantCodec, block_size: int) -> KernelSpec:
    value_map = codec.value_map
    compander = codec.compander
    codes = torch.arange(2**codec.bits, dtype=torch.uint8)
    table = (value_map.decode(codes) if compander is None else value_map.decode_steps(codes)).float()
    rule, levels, offset, first_code, bounds, steps = ROUND, 0, 0, 0, torch.zeros(1), 1
    if isinstance(value_map, LinearMap):
        levels, offset = value_map.levels, value_map.zero_code
    elif isinstance(value_map, DynamicMap):
        rule = SEARCH
        bounds, steps = _padded((table[:-1] + table[1:]) / 2)  # the midpoints the codec bucketizes on
    else:
        rule = SEARCH
        half = 2 ** (codec.bits - 1) - 1
        first_code = value_map.zero_code - half
        bounds, steps = _padded(_mulaw_bounds(value_map.mu, half))
    granularity = {"tensor": TENSOR, "block": BLOCK, "row": BLOCK, "column": COLUMN, "grid": GRID}[codec.granularity]
    return KernelSpec(
        bits=codec.bits, granularity=granularity, rule=rule, levels=levels, offset=offset, first_code=first_code,
        steps=steps, block_size=block_size, tile_size=codec.tile_size, compand=compander is not None,
        mu=compander.mu if compander else 0.0, log1p_mu=compander.log1p_mu if compander else 0.0,
        inv_mu=compander.inv_mu if compander else 0.0, inv_log1p_mu=compander.inv_log1p_mu if compander else 0.0,
        table=table, bounds=bounds,
    )
