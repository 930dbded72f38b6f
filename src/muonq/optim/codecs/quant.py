"""The quantizing codec family: value map (linear, dynamic, mu-law) x bits (4, 8) x scale
granularity (tensor, block, row, column, grid) x scale dtype, with deterministic or stochastic
rounding, and optional companding of the raw values before the scale.

Encoding: sanitise (NaN -> 0, +-inf -> +-fp32 max), group absmax, store it rounded up in the scale
dtype, divide, map to codes, pack. The stored tensors are ``codes`` (flat uint8, packed) and either
``scale`` (flat, one per group) or, for the grid, ``row_scale`` / ``col_scale``.

With a ``compander`` (MuonQ's quantizer, :class:`~muonq.optim.codecs.mulaw.MuLawCompander`) the
order is the original MuonQ implementation's: sanitise, clamp to [-1, 1], compand the raw values,
take the group absmax of the companded values, codes = round(y / step) with the fp32 step
absmax / levels (floored at 1e-8), clamped to the levels of a linear map; the *step* is stored,
rounded to nearest in the scale dtype (:func:`~muonq.optim.codecs.scales.step_scale`); decoding
expands q x stored step. Same stored tensors and bytes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F

from muonq.optim.codecs.base import Codec, Encoded, Shape, ValueMap, check_shape
from muonq.optim.codecs.grid import grid_absmax, grid_counts, grid_scale
from muonq.optim.codecs.linear import LinearMap
from muonq.optim.codecs.mulaw import MuLawCompander
from muonq.optim.codecs.packing import pack, packed_numel, unpack
from muonq.optim.codecs.scales import check_scale_dtype, safe_divisor, step_scale, store_scale

Granularity = Literal["tensor", "block", "row", "column", "grid"]
GRANULARITIES: tuple[str, ...] = ("tensor", "block", "row", "column", "grid")
_MATRIX_ONLY = ("row", "column", "grid")


class QuantCodec(Codec):
    """``granularity``: one scale per tensor; per ``block_size`` flattened elements (a ragged last
    block is allowed); per row or per column of a matrix; or grid scales on ``tile_size`` tiles.
    ``compander``: compand the raw values before the scale (needs a linear map; see the module
    docstring)."""

    def __init__(
        self,
        value_map: ValueMap,
        granularity: Granularity = "tensor",
        *,
        block_size: int = 256,
        tile_size: int = 128,
        scale_dtype: torch.dtype = torch.float32,
        stochastic: bool = False,
        compander: MuLawCompander | None = None,
    ) -> None:
        if compander is not None and not isinstance(value_map, LinearMap):
            raise ValueError(f"companding is followed by linear codes, got the value map {value_map!r}")
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if tile_size < 1:
            raise ValueError(f"tile_size must be >= 1, got {tile_size}")
        self.value_map = value_map
        self.granularity = granularity
        self.block_size = block_size
        self.tile_size = tile_size
        self.scale_dtype = check_scale_dtype(scale_dtype)
        self.stochastic = stochastic
        self.compander = compander

    @property
    def bits(self) -> int:
        return self.value_map.bits

    def __repr__(self) -> str:
        detail = {"block": f", block_size={self.block_size}", "grid": f", tile_size={self.tile_size}"}
        compand = f", compander={self.compander!r}" if self.compander is not None else ""
        return (
            f"QuantCodec({self.value_map!r}, {self.granularity!r}{detail.get(self.granularity, '')}, "
            f"scale_dtype={self.scale_dtype}, stochastic={self.stochastic}{compand})"
        )

    # -- layout -------------------------------------------------------------------------------

    def _check(self, shape: Shape) -> tuple[int, ...]:
        shape = check_shape(shape)
        if math.prod(shape) == 0:
            raise ValueError(f"cannot encode an empty tensor (shape {shape})")
        if self.granularity in _MATRIX_ONLY and len(shape) != 2:
            raise ValueError(f"{self.granularity!r} scales need a matrix, got shape {shape}")
        return shape

    def _groups(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """A view of ``x`` (padded copy for a ragged last block) with one scale per slice along the
        returned dim."""
        if self.granularity == "tensor":
            return x.reshape(1, -1), 1
        if self.granularity == "block":
            flat = x.reshape(-1)
            pad = -flat.numel() % self.block_size
            return (F.pad(flat, (0, pad)) if pad else flat).view(-1, self.block_size), 1
        return x, (1 if self.granularity == "row" else 0)

    def _scale_numel(self, shape: tuple[int, ...]) -> int:
        numel = math.prod(shape)
        if self.granularity == "tensor":
            return 1
        if self.granularity == "block":
            return -(-numel // self.block_size)
        if self.granularity == "grid":
            tile_rows, tile_cols = grid_counts(shape[0], shape[1], self.tile_size)
            return shape[0] * tile_cols + tile_rows * shape[1]
        return shape[0] if self.granularity == "row" else shape[1]

    # -- Codec ----------------------------------------------------------------------------------

    def encode(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> Encoded:
        shape = self._check(x.shape)
        x = torch.nan_to_num(x.float(), nan=0.0)
        if self.compander is not None:
            x = self.compander.compand(x.clamp(-1.0, 1.0))
        if self.granularity == "grid":
            row_absmax, col_absmax = grid_absmax(x, self.tile_size)
            (row_scale, row_divisor), (col_scale, col_divisor) = self._scale(row_absmax), self._scale(col_absmax)
            y = x / grid_scale(row_divisor, col_divisor, self.tile_size)
            return {"codes": self._codes(y, generator), "row_scale": row_scale, "col_scale": col_scale}
        groups, dim = self._groups(x)
        scale, divisor = self._scale(groups.abs().amax(dim=dim, keepdim=True))
        y = (groups / divisor).reshape(-1)[: math.prod(shape)]
        return {"codes": self._codes(y, generator), "scale": scale.reshape(-1)}

    def _scale(self, absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(stored scale, fp32 divisor) of group absmaxes."""
        if self.compander is None:
            scale = store_scale(absmax, self.scale_dtype)
            return scale, safe_divisor(scale)
        return step_scale(absmax, self.value_map.levels, self.scale_dtype)

    def _codes(self, y: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Packed codes of y = x / divisor (in steps when companding)."""
        if self.compander is None:
            codes = self.value_map.encode(y.clamp(-1.0, 1.0), stochastic=self.stochastic, generator=generator)
        else:
            codes = self.value_map.encode_steps(y, stochastic=self.stochastic, generator=generator)
        return pack(codes, self.bits)

    def decode(self, encoded: Mapping[str, torch.Tensor], shape: Shape) -> torch.Tensor:
        shape = self._check(shape)
        numel = math.prod(shape)
        codes = unpack(encoded["codes"], self.bits, numel)
        values = self.value_map.decode(codes) if self.compander is None else self.value_map.decode_steps(codes)
        if self.granularity == "grid":
            scale = grid_scale(encoded["row_scale"], encoded["col_scale"], self.tile_size)
            return self._expand(values.view(shape).mul_(scale))
        groups, dim = self._groups(values.view(shape))
        view = list(groups.shape)
        view[dim] = 1
        out = groups * encoded["scale"].float().view(view)
        return self._expand(out.reshape(-1)[:numel].view(shape))

    def _expand(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.compander is None else self.compander.expand(x)

    def zeros(self, shape: Shape, device: torch.device | str = "cpu") -> Encoded:
        shape = self._check(shape)
        codes = pack(torch.full((math.prod(shape),), self.value_map.zero_code, dtype=torch.uint8, device=device), self.bits)
        if self.granularity == "grid":
            tile_rows, tile_cols = grid_counts(shape[0], shape[1], self.tile_size)
            return {
                "codes": codes,
                "row_scale": torch.zeros(shape[0], tile_cols, dtype=self.scale_dtype, device=device),
                "col_scale": torch.zeros(tile_rows, shape[1], dtype=self.scale_dtype, device=device),
            }
        return {"codes": codes, "scale": torch.zeros(self._scale_numel(shape), dtype=self.scale_dtype, device=device)}

    def nbytes(self, shape: Shape) -> int:
        shape = self._check(shape)
        scale_bytes = self._scale_numel(shape) * torch.finfo(self.scale_dtype).bits // 8
        return packed_numel(math.prod(shape), self.bits) + scale_bytes

    def dtypes(self) -> dict[str, torch.dtype]:
        if self.granularity == "grid":
            return {"codes": torch.uint8, "row_scale": self.scale_dtype, "col_scale": self.scale_dtype}
        return {"codes": torch.uint8, "scale": self.scale_dtype}
