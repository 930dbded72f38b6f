"""The quantizing codec family: value map (linear, dynamic, mu-law) x bits (4, 8) x scale
granularity (tensor, block, row, column, grid) x scale dtype, with deterministic or stochastic
rounding.

Encoding: sanitise (NaN -> 0, +-inf -> +-fp32 max), group absmax, store it rounded up in the scale
dtype, divide, map to codes, pack. The stored tensors are ``codes`` (flat uint8, packed) and either
``scale`` (flat, one per group) or, for the grid, ``row_scale`` / ``col_scale``.

On the CPU the same arithmetic runs in slices of about ``CHUNK`` elements (whole groups, rows or
tile rows), so that the value map's temporaries stay small and cached instead of being fresh
matrix-sized allocations; the steps are elementwise (and the absmax a max), so the bytes are those
of the whole-tensor path, which stays the path of stochastic rounding, of non-finite inputs and of
other devices. The clamp to [-1, 1] is skipped where no scale saturated (then |y| <= 1 already).
Decoding gathers from a table of decoded values, one row per pair of code bytes (two or four
codes), with a per-tensor scale folded into the table, unless the value map's own decode is
cheaper (``ValueMap.cheap_decode``); scales multiply in place, and ``out`` takes the result.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F

from muonq.optim.codecs.base import Codec, Encoded, Shape, ValueMap, check_shape
from muonq.optim.codecs.grid import grid_absmax, grid_apply, grid_counts, grid_row_absmax, grid_scale
from muonq.optim.codecs.packing import pack, pack_pairs, packed_numel, unpack
from muonq.optim.codecs.scales import check_scale_dtype, safe_divisor, store_scale

CHUNK = 1 << 16  # elements per slice of the CPU encoder
_LITTLE = sys.byteorder == "little"
Granularity = Literal["tensor", "block", "row", "column", "grid"]
GRANULARITIES: tuple[str, ...] = ("tensor", "block", "row", "column", "grid")
_MATRIX_ONLY = ("row", "column", "grid")


class QuantCodec(Codec):
    """``granularity``: one scale per tensor; per ``block_size`` flattened elements (a ragged last
    block is allowed); per row or per column of a matrix; or grid scales on ``tile_size`` tiles."""

    def __init__(
        self,
        value_map: ValueMap,
        granularity: Granularity = "tensor",
        *,
        block_size: int = 256,
        tile_size: int = 128,
        scale_dtype: torch.dtype = torch.float32,
        stochastic: bool = False,
    ) -> None:
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
        self._tables: dict[tuple[torch.device, bool], torch.Tensor] = {}

    @property
    def bits(self) -> int:
        return self.value_map.bits

    def __repr__(self) -> str:
        detail = {"block": f", block_size={self.block_size}", "grid": f", tile_size={self.tile_size}"}
        return (
            f"QuantCodec({self.value_map!r}, {self.granularity!r}{detail.get(self.granularity, '')}, "
            f"scale_dtype={self.scale_dtype}, stochastic={self.stochastic})"
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
        x = x.float()
        if x.device.type == "cpu" and not self.stochastic and x.numel() > CHUNK:
            encoded = self._encode_sliced(x.contiguous(), shape)
            if encoded is not None:
                return encoded
        return self._encode_whole(torch.nan_to_num(x, nan=0.0), shape, generator)

    def _encode_whole(self, x: torch.Tensor, shape: tuple[int, ...], generator: torch.Generator | None) -> Encoded:
        if self.granularity == "grid":
            row_absmax, col_absmax = grid_absmax(x, self.tile_size)
            row_scale = store_scale(row_absmax, self.scale_dtype)
            col_scale = store_scale(col_absmax, self.scale_dtype)
            y = x / safe_divisor(grid_scale(row_scale, col_scale, self.tile_size))
            return {"codes": self._codes(y, generator), "row_scale": row_scale, "col_scale": col_scale}
        groups, dim = self._groups(x)
        scale = store_scale(groups.abs().amax(dim=dim, keepdim=True), self.scale_dtype)
        y = (groups / safe_divisor(scale)).reshape(-1)[: math.prod(shape)]
        return {"codes": self._codes(y, generator), "scale": scale.reshape(-1)}

    def _codes(self, y: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        codes = self.value_map.encode(y.clamp(-1.0, 1.0), stochastic=self.stochastic, generator=generator)
        return pack(codes, self.bits)

    # -- the CPU encoder: the same steps, slice by slice --------------------------------------------

    def _encode_sliced(self, x: torch.Tensor, shape: tuple[int, ...]) -> Encoded | None:
        """:meth:`_encode_whole` of a finite ``x`` in slices; None (use the whole path) when ``x``
        holds NaN or inf (which the whole path sanitises) or 4-bit slices would split a byte."""
        if self.granularity == "grid":
            return self._encode_grid_sliced(x, shape)
        numel = math.prod(shape)
        groups, dim = self._groups(x)
        rows, row_len = groups.shape
        absmax = _sliced_absmax(groups, dim)
        if not bool(torch.isfinite(absmax).all()):
            return None
        scale = store_scale(absmax, self.scale_dtype)
        divisor = safe_divisor(scale)
        clamp = not bool((divisor >= absmax).all())  # else |y| <= 1 already: only saturated scales clip
        codes = torch.empty(packed_numel(numel, self.bits), dtype=torch.uint8)
        if divisor.numel() == 1:  # one scale: slices of the flat tensor
            flat, divisor = groups.view(-1)[:numel], divisor.view(())
            for start in range(0, numel, CHUNK):
                self._codes_into(flat[start : start + CHUNK] / divisor, codes, start, clamp)
        else:
            step = max(1, CHUNK // row_len)
            step += step % 2 if self.bits == 4 and row_len % 2 else 0  # every slice but the last even
            for r0 in range(0, rows, step):
                y = (groups[r0 : r0 + step] / (divisor if dim == 0 else divisor[r0 : r0 + step])).view(-1)
                start = r0 * row_len
                self._codes_into(y[: numel - start], codes, start, clamp)  # a padded last block stops at numel
        return {"codes": codes, "scale": scale.reshape(-1)}

    def _encode_grid_sliced(self, x: torch.Tensor, shape: tuple[int, ...]) -> Encoded | None:
        rows, cols = shape
        tile = self.tile_size
        if self.bits == 4 and (tile * cols) % 2:
            return None
        tile_rows, tile_cols = grid_counts(rows, cols, tile)
        row_absmax = torch.empty(rows, tile_cols)
        col_absmax = torch.empty(tile_rows, cols)
        for i in range(tile_rows):
            a = x[i * tile : (i + 1) * tile].abs()
            grid_row_absmax(a, tile, out=row_absmax[i * tile : i * tile + a.shape[0]])
            torch.amax(a, dim=0, out=col_absmax[i])
        if not (bool(torch.isfinite(row_absmax).all()) and bool(torch.isfinite(col_absmax).all())):
            return None
        row_scale = store_scale(row_absmax, self.scale_dtype)
        col_scale = store_scale(col_absmax, self.scale_dtype)
        # Dividing by min(safe(row), safe(col)) instead of safe(min(row, col)) gives the same y: they
        # differ only where a row or column scale is 0, where the element itself is +-0.
        row_div, col_div = safe_divisor(row_scale), safe_divisor(col_scale)
        clamp = not (bool((row_div >= row_absmax).all()) and bool((col_div >= col_absmax).all()))
        codes = torch.empty(packed_numel(rows * cols, self.bits), dtype=torch.uint8)
        for i in range(tile_rows):
            r0 = i * tile
            part = x[r0 : r0 + tile]
            y = grid_apply(torch.div, part, row_div[r0 : r0 + part.shape[0]], col_div[i], tile, out=torch.empty_like(part))
            self._codes_into(y.view(-1), codes, r0 * cols, clamp)
        return {"codes": codes, "row_scale": row_scale, "col_scale": col_scale}

    def _codes_into(self, y: torch.Tensor, codes: torch.Tensor, start: int, clamp: bool) -> None:
        """Encode the slice ``y`` (a fresh fp32 tensor: flat elements ``start ...``) into ``codes``;
        ``clamp``: to [-1, 1] first (needed only where a scale saturated below the absmax)."""
        c = self.value_map.encode(y.clamp_(-1.0, 1.0) if clamp else y, stochastic=False, generator=None).view(-1)
        if self.bits == 8:
            codes[start : start + c.numel()].copy_(c)
        elif c.numel() % 2 == 0:
            pack_pairs(c, out=codes[start // 2 : start // 2 + c.numel() // 2])
        else:  # the last slice of an odd count
            codes[start // 2 :].copy_(pack(c, 4))

    # -- decoding -------------------------------------------------------------------------------

    def decode(self, encoded: Mapping[str, torch.Tensor], shape: Shape, *, out: torch.Tensor | None = None) -> torch.Tensor:
        shape = self._check(shape)
        numel = math.prod(shape)
        codes = encoded["codes"]
        if out is not None and (out.shape != shape or out.dtype != torch.float32 or not out.is_contiguous()):
            raise ValueError(f"out must be a contiguous fp32 tensor of shape {shape}, got {out.dtype} {tuple(out.shape)}")
        if self.granularity == "tensor":
            return self._values(codes, numel, encoded["scale"].float(), out=out).view(shape)
        values = self._values(codes, numel, out=out)
        if self.granularity == "grid":
            matrix = values.view(shape)
            row_scale, col_scale = encoded["row_scale"].float(), encoded["col_scale"].float()
            tile = self.tile_size
            for i in range(-(-shape[0] // tile)):  # in place, one tile row at a time
                part = matrix[i * tile : (i + 1) * tile]
                grid_apply(torch.mul, part, row_scale[i * tile : i * tile + part.shape[0]], col_scale[i], tile,
                           out=part, combine=torch.minimum)
            return matrix
        scale = encoded["scale"].float()
        if self.granularity == "block":
            full = numel // self.block_size * self.block_size
            values[:full].view(-1, self.block_size).mul_(scale[: full // self.block_size, None])
            if full < numel:  # the ragged last block
                values[full:].mul_(scale[-1])
            return values.view(shape)
        return values.view(shape).mul_(scale.view(-1, 1) if self.granularity == "row" else scale.view(1, -1))

    def _values(self, codes: torch.Tensor, numel: int, scale: torch.Tensor | None = None, *,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """The value map's values of the first ``numel`` codes (times ``scale``, one value): fresh,
        or in ``out`` (flat view)."""
        if codes.numel() != packed_numel(numel, self.bits):
            raise ValueError(f"{codes.numel()} bytes cannot hold exactly {numel} codes of {self.bits} bits")
        # index by little-endian pairs of bytes (two or four codes per lookup) where they can be viewed so
        wide = codes.numel() % 2 == 0 and codes.is_contiguous() and codes.storage_offset() % 2 == 0 and _LITTLE
        per_row = (2 if wide else 1) * 8 // self.bits
        if out is not None and codes.numel() * 8 // self.bits != numel:
            return out.view(-1).copy_(self._values(codes, numel, scale))  # an odd count of 4-bit codes
        if codes.device.type == "meta" or self.value_map.cheap_decode:
            codes = unpack(codes, self.bits, numel)
            values = self.value_map.decode(codes) if out is None else self.value_map.decode_into(codes, out.view(-1))
            return values if scale is None else values.mul_(scale)
        table = self._table(codes.device, wide)
        if scale is not None:
            table = table * scale  # the same products as scaling each decoded value
        index = (codes.view(torch.uint16) if wide else codes).int()
        if out is None:
            return torch.index_select(table, 0, index).view(-1)[:numel]
        return torch.index_select(table, 0, index, out=out.view(-1, per_row)).view(-1)

    def _table(self, device: torch.device, wide: bool) -> torch.Tensor:
        """``value_map.decode`` of the codes in every byte (256 x codes per byte), or with ``wide``
        in every little-endian pair of bytes (65536 x 2 or x 4; 1 MiB at most)."""
        table = self._tables.get((device, wide))
        if table is None:
            index = torch.arange(65536 if wide else 256, dtype=torch.int32)
            shifts = range(0, 16 if wide else 8, self.bits)
            codes = torch.stack([(index >> shift) & (2**self.bits - 1) for shift in shifts], dim=-1)
            table = self._tables[(device, wide)] = self.value_map.decode(codes.to(torch.uint8)).float().to(device)
        return table

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


def _sliced_absmax(groups: torch.Tensor, dim: int) -> torch.Tensor:
    """``groups.abs().amax(dim=dim, keepdim=True)`` in slices of rows (a NaN anywhere gives NaN)."""
    rows, row_len = groups.shape
    if rows == 1 and dim == 1:
        low, high = torch.aminmax(groups)
        return torch.maximum(high, -low).abs().reshape(1, 1)  # abs: an all -0.0 tensor gives +0.0
    step = max(1, CHUNK // row_len)
    if dim == 1:
        out = torch.empty(rows, 1)
        for r0 in range(0, rows, step):
            torch.amax(groups[r0 : r0 + step].abs(), dim=1, keepdim=True, out=out[r0 : r0 + step])
        return out
    out = torch.zeros(1, row_len)
    for r0 in range(0, rows, step):
        torch.maximum(out, groups[r0 : r0 + step].abs().amax(dim=0, keepdim=True), out=out)
    return out
