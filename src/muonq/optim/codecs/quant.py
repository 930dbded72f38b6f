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

:meth:`QuantCodec._encode_whole` is that arithmetic on the whole tensor: the reference, and the
path of stochastic rounding, of NaN (and of inf without companding) and of other devices. On the
CPU the same elementwise steps run in slices of about ``CHUNK`` elements (whole groups, rows or
tile rows) through scratch buffers the codec keeps, instead of fresh matrix-sized temporaries; the
absmax is a max, so the bytes are the whole path's. The clamp to [-1, 1] is skipped where no scale
saturated (then |y| <= 1 already); companded slices are companded once, with the scales known
beforehand (see :meth:`QuantCodec._encode_companded_sliced`). Decoding gathers from a table
of decoded values, one row per byte or pair of code bytes, with a per-tensor scale (and the
expansion) folded into the table, unless the value map's own decode is cheaper
(``ValueMap.cheap_decode``); scales multiply in place, and ``out`` takes the result. 4-bit codes
companded before a column, row or block scale read one table of 16 expanded values per group.

With ``native`` (the default), the encoders and decoders that have C loops
(:mod:`~muonq.optim.codecs.native_codec`) run those first; what they do not take comes here.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F

from muonq.optim.codecs import native_codec
from muonq.optim.codecs.base import Codec, Encoded, Shape, ValueMap, check_shape
from muonq.optim.codecs.grid import grid_absmax, grid_apply, grid_counts, grid_row_absmax, grid_scale
from muonq.optim.codecs.linear import LinearMap
from muonq.optim.codecs.mulaw import MuLawCompander, on_whole_vectors
from muonq.optim.codecs.packing import pack, pack_pairs, packed_numel, unpack
from muonq.optim.codecs.scales import check_scale_dtype, safe_divisor, step_scale, store_scale

CHUNK = 1 << 17  # elements per slice of the CPU encoder (512 KiB of fp32: its buffers stay in L2)
_LITTLE = sys.byteorder == "little"
Granularity = Literal["tensor", "block", "row", "column", "grid"]
GRANULARITIES: tuple[str, ...] = ("tensor", "block", "row", "column", "grid")
_MATRIX_ONLY = ("row", "column", "grid")
# Scale search: each group's scale is the absmax times the ratio whose decoded group has the least
# squared error (ties keep the larger). Clipping the few largest entries of a heavy-tailed group
# buys finer steps for the rest.
SEARCH_RATIOS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)


class QuantCodec(Codec):
    """``granularity``: one scale per tensor; per ``block_size`` flattened elements (a ragged last
    block is allowed); per row or per column of a matrix; or grid scales on ``tile_size`` tiles.
    ``compander``: compand the raw values before the scale (needs a linear map; see the module
    docstring). ``scale_search``: each group's scale is chosen among absmax x :data:`SEARCH_RATIOS`
    for the least squared error of the decoded group (deterministic rounding; not with grid
    scales); the decoder and the bytes are the same. ``native``: encode (and decode grid scales of)
    CPU tensors of 4-bit codes in the C loops of :mod:`~muonq.optim.codecs.native_codec` where they
    apply: the PyTorch path's bytes (the scale search: see there), faster; False keeps every step in
    PyTorch."""

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
        scale_search: bool = False,
        native: bool = True,
    ) -> None:
        if scale_search and (granularity == "grid" or stochastic):
            raise ValueError("scale search needs deterministic rounding and tensor, block, row or column scales")
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
        self.scale_search = scale_search
        self.native = native
        self._tables: dict[tuple[torch.device, bool | str], torch.Tensor] = {}
        self._scratch: dict[str, torch.Tensor] = {}  # CPU slice buffers of encoding and expansion

    @property
    def bits(self) -> int:
        return self.value_map.bits

    def __repr__(self) -> str:
        detail = {"block": f", block_size={self.block_size}", "grid": f", tile_size={self.tile_size}"}
        compand = f", compander={self.compander!r}" if self.compander is not None else ""
        search = ", scale_search=True" if self.scale_search else ""
        return (
            f"QuantCodec({self.value_map!r}, {self.granularity!r}{detail.get(self.granularity, '')}, "
            f"scale_dtype={self.scale_dtype}, stochastic={self.stochastic}{compand}{search})"
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
        if self.native:
            encoded = native_codec.encode(self, x, shape)
            if encoded is not None:
                return encoded
        if self.scale_search:
            return self._encode_searched(x, shape)
        if x.device.type == "cpu" and not self.stochastic and x.numel() > CHUNK:
            encoded = self._encode_sliced(x.contiguous(), shape)
            if encoded is not None:
                return encoded
        return self._encode_whole(x, shape, generator)

    def _encode_whole(self, x: torch.Tensor, shape: tuple[int, ...], generator: torch.Generator | None) -> Encoded:
        """The encoding arithmetic on the whole fp32 tensor ``x`` (the reference of the CPU paths)."""
        x = torch.nan_to_num(x, nan=0.0)
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

    def _encode_searched(self, x: torch.Tensor, shape: tuple[int, ...]) -> Encoded:
        """Per group, the codes and scale of the ratio in :data:`SEARCH_RATIOS` (the group absmax
        scaled by it, values beyond the scale saturating) whose decoding is nearest to the input in
        squared error. On the CPU, blocks and rows are searched in slices of about ``CHUNK``
        elements: each group's arithmetic is the same, and the slices stay in cache (1.65x faster
        than the whole tensor at once on a 1376 x 512 residual)."""
        groups, dim = self._groups(torch.nan_to_num(x, nan=0.0))
        if self.compander is not None:
            target = groups.clamp(-1.0, 1.0)
            y = self.compander.compand(target)
        else:
            target = y = groups
        absmax = y.abs().amax(dim=dim, keepdim=True)
        codes = torch.empty(groups.shape, dtype=torch.uint8, device=x.device)
        scale = torch.empty(absmax.shape, dtype=self.scale_dtype, device=x.device)
        sliced = x.device.type == "cpu" and dim == 1 and groups.shape[0] > 1
        step = max(1, CHUNK // groups.shape[1]) if sliced else groups.shape[0]
        for r0 in range(0, groups.shape[0], step):
            rows = slice(r0, r0 + step) if dim == 1 else slice(None)
            codes[rows], scale[rows] = self._search_groups(target[rows], y[rows], absmax[rows], dim)
        return {"codes": pack(codes.reshape(-1)[: math.prod(shape)], self.bits), "scale": scale.reshape(-1)}

    def _search_groups(self, target: torch.Tensor, y: torch.Tensor, absmax: torch.Tensor,
                       dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, scale) of least squared error over :data:`SEARCH_RATIOS` for these groups."""
        best: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        for ratio in SEARCH_RATIOS:
            scale, divisor = self._scale(absmax * ratio)
            scaled = y / divisor
            if self.compander is None:
                codes = self.value_map.encode(scaled.clamp_(-1.0, 1.0))
            else:
                codes = self.value_map.encode_steps(scaled)
            decoded = self._decode_codes(codes).mul_(scale.float())
            if self.compander is not None:
                decoded = self.compander.expand(decoded)
            error = decoded.sub_(target).square_().sum(dim=dim, keepdim=True)
            if best is None:
                best = (error, codes, scale)
                continue
            better = error < best[0]
            best = (torch.where(better, error, best[0]), torch.where(better, codes, best[1]),
                     torch.where(better, scale, best[2]))
        assert best is not None
        return best[1], best[2]

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

    # -- the CPU encoder: the same steps, slice by slice --------------------------------------------

    def _buffer(self, role: str, numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A flat CPU buffer of ``numel`` elements for ``role`` (garbage contents), kept between
        calls: a fresh one would be a large allocation whose pages are faulted in again."""
        buffer = self._scratch.get(role)
        if buffer is None or buffer.numel() < numel:
            buffer = self._scratch[role] = torch.empty(numel, dtype=dtype)
        return buffer[:numel]

    def _encode_sliced(self, x: torch.Tensor, shape: tuple[int, ...]) -> Encoded | None:
        """:meth:`_encode_whole` of ``x`` in slices; None (use the whole path) when ``x`` holds what
        the whole path sanitises (NaN; inf too without companding), when 4-bit slices would split
        a byte, or for companded grid scales."""
        if self.granularity == "grid":
            return None if self.compander is not None else self._encode_grid_sliced(x, shape)
        numel = math.prod(shape)
        groups, dim = self._groups(x)
        absmax = _sliced_absmax(groups, dim)
        if self.compander is not None:
            return self._encode_companded_sliced(groups, dim, absmax, numel)
        if not bool(torch.isfinite(absmax).all()):
            return None
        scale, divisor = self._scale(absmax)
        clamp = not bool((divisor >= absmax).all())  # else |y| <= 1 already: only saturated scales clip
        codes = torch.empty(packed_numel(numel, self.bits), dtype=torch.uint8)
        for start, part, div, _ in self._slices(groups, dim, divisor):
            y = torch.div(part, div, out=self._buffer("y", part.numel()).view(part.shape))
            self._codes_into(y.view(-1)[: numel - start], codes, start, clamp)
        return {"codes": codes, "scale": scale.reshape(-1)}

    def _slices(self, groups: torch.Tensor, dim: int, divisor: torch.Tensor):
        """(first flat element, slice of ``groups`` (2-D), its divisor, its groups' absmax rows) in
        slices of about ``CHUNK`` elements made of whole groups (of the flat tensor under one
        scale); for 4-bit codes every slice but the last has an even length. A padded last block
        runs past the codes' count: the caller stops there."""
        rows, row_len = groups.shape
        if divisor.numel() == 1:
            flat, divisor = groups.view(-1), divisor.view(())
            for start in range(0, flat.numel(), CHUNK):
                yield start, flat[start : start + CHUNK].view(1, -1), divisor, slice(None)
            return
        step = max(1, CHUNK // row_len)
        step += step % 2 if self.bits == 4 and row_len % 2 else 0
        for r0 in range(0, rows, step):
            rows_of = slice(None) if dim == 0 else slice(r0, r0 + step)
            yield r0 * row_len, groups[r0 : r0 + step], divisor[rows_of], rows_of

    def _encode_companded_sliced(self, groups: torch.Tensor, dim: int, raw_absmax: torch.Tensor,
                                 numel: int) -> Encoded | None:
        """The companded encoding in one pass over ``x``: the group absmax of the companded values is
        the companding of the raw values' absmax clamped to 1 (companding is monotone), so the
        scales are known before the slices are companded, each once, into a scratch buffer. The
        companded absmax of every group is checked against that; a mismatch (a log1p that is not
        monotone) falls back to the whole path, which also takes NaN (that it zeroes).

        Per slice: a = |compand(x)|, q = round(a / step) (no clamp to the levels: a <= absmax, so
        a / (absmax / levels) rounds to the levels at most), codes of sign(x) q. Dividing and
        rounding are odd functions, so that is round(compand(x) / step), the whole path's level."""
        if bool(torch.isnan(raw_absmax).any()):
            return None
        compander = self.compander
        absmax = compander.compand(raw_absmax.clamp_max(1.0))
        scale, divisor = self._scale(absmax)
        clamp = not bool((raw_absmax <= 1.0).all())  # else |x| mu <= mu already
        seen = torch.zeros_like(absmax)
        codes = torch.empty(packed_numel(numel, self.bits), dtype=torch.uint8)
        for start, part, div, rows_of in self._slices(groups, dim, divisor):
            a = torch.abs(part, out=self._buffer("y", part.numel()).view(part.shape))
            compander.compand_magnitude_(a, clamp=clamp)
            group = seen[rows_of]
            torch.maximum(group, a.amax(dim=dim, keepdim=True) if div.dim() else a.amax().view(1, 1), out=group)
            sign = torch.sign(part, out=self._buffer("sign", part.numel()).view(part.shape))
            self._store_levels(a.div_(div).round_().mul_(sign).view(-1)[: numel - start], codes, start)
        if not torch.equal(seen, absmax):
            return None
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
            part = x[i * tile : (i + 1) * tile]
            a = torch.abs(part, out=self._buffer("y", part.numel()).view(part.shape))
            grid_row_absmax(a, tile, out=row_absmax[i * tile : i * tile + a.shape[0]])
            torch.amax(a, dim=0, out=col_absmax[i])
        if not (bool(torch.isfinite(row_absmax).all()) and bool(torch.isfinite(col_absmax).all())):
            return None
        (row_scale, row_div), (col_scale, col_div) = self._scale(row_absmax), self._scale(col_absmax)
        clamp = not (bool((row_div >= row_absmax).all()) and bool((col_div >= col_absmax).all()))
        codes = torch.empty(packed_numel(rows * cols, self.bits), dtype=torch.uint8)
        for i in range(tile_rows):
            r0 = i * tile
            part = x[r0 : r0 + tile]
            y = grid_apply(torch.div, part, row_div[r0 : r0 + part.shape[0]], col_div[i], tile,
                           out=self._buffer("y", part.numel()).view(part.shape))
            self._codes_into(y.view(-1), codes, r0 * cols, clamp)
        return {"codes": codes, "row_scale": row_scale, "col_scale": col_scale}

    def _codes_into(self, y: torch.Tensor, codes: torch.Tensor, start: int, clamp: bool) -> None:
        """Encode the slice ``y`` (flat fp32 in a scratch buffer: flat elements ``start ...``) into
        ``codes``; ``clamp``: to [-1, 1] first (needed only where a scale saturated below the
        absmax). Linear codes are round(y L) in place: |y| <= 1 needs no clamp to the levels."""
        if clamp:
            y.clamp_(-1.0, 1.0)
        if isinstance(self.value_map, LinearMap):
            self._store_levels(y.mul_(self.value_map.levels).round_(), codes, start)
            return
        c = self.value_map.encode(y)
        if self.bits == 8:
            codes[start : start + c.numel()].copy_(c)
        elif c.numel() % 2 == 0:
            pack_pairs(c, out=codes[start // 2 : start // 2 + c.numel() // 2])
        else:  # the last slice of an odd count
            codes[start // 2 :].copy_(pack(c, 4))

    def _store_levels(self, q: torch.Tensor, codes: torch.Tensor, start: int) -> None:
        """Linear codes of the integer levels ``q`` (flat fp32, in [-L, L]; overwritten) of flat
        elements ``start ...``, packed into ``codes``. The codes (level + zero code, exact small
        integers) go to int16 first, several times cheaper on the CPU than fp32 to uint8; two 4-bit
        codes are then one little-endian 32-bit word w = low | high << 16, whose byte is
        (w & 0x0F) | ((w >> 12) & 0xF0)."""
        count = q.numel()
        small = self._buffer("int16", count, torch.int16).copy_(q.add_(self.value_map.zero_code))
        if self.bits == 8:
            codes[start : start + count].copy_(small)
            return
        even, first = count - count % 2, start // 2
        if even and _LITTLE:
            words = small[:even].view(torch.int32)
            high = torch.bitwise_right_shift(words, 12, out=self._buffer("int32", even // 2, torch.int32))
            high.bitwise_and_(0xF0).bitwise_or_(words.bitwise_and_(0x0F))
            codes[first : first + even // 2].copy_(high)
        elif even:
            codes[first : first + even // 2].copy_(pack(small[:even].to(torch.uint8), 4))
        if even < count:  # the last code of an odd count: a byte of its own, high nibble zero
            codes[first + even // 2 :].copy_(small[even:])

    # -- decoding -------------------------------------------------------------------------------

    def decode(self, encoded: Mapping[str, torch.Tensor], shape: Shape, *, out: torch.Tensor | None = None) -> torch.Tensor:
        shape = self._check(shape)
        numel = math.prod(shape)
        codes = encoded["codes"]
        if out is not None and (out.shape != shape or out.dtype != torch.float32 or not out.is_contiguous()):
            raise ValueError(f"out must be a contiguous fp32 tensor of shape {shape}, got {out.dtype} {tuple(out.shape)}")
        if self.native:
            values = native_codec.decode(self, encoded, shape, out)
            if values is not None:
                return values.view(shape)
        if self.granularity == "tensor":  # the scale and the expansion are in the table
            return self._values(codes, numel, encoded["scale"].float(), out=out).view(shape)
        if self.compander is not None and self.bits == 4 and self.granularity != "grid":
            return self._decode_group_tables(codes, shape, encoded["scale"].float(), out).view(shape)
        values = self._values(codes, numel, out=out)
        if self.granularity == "grid":
            matrix = values.view(shape)
            row_scale, col_scale = encoded["row_scale"].float(), encoded["col_scale"].float()
            tile = self.tile_size
            for i in range(-(-shape[0] // tile)):  # in place, one tile row at a time
                part = matrix[i * tile : (i + 1) * tile]
                grid_apply(torch.mul, part, row_scale[i * tile : i * tile + part.shape[0]], col_scale[i], tile,
                           out=part, combine=torch.minimum)
        elif self.granularity == "block":
            scale = encoded["scale"].float()
            full = numel // self.block_size * self.block_size
            values[:full].view(-1, self.block_size).mul_(scale[: full // self.block_size, None])
            if full < numel:  # the ragged last block
                values[full:].mul_(scale[-1])
        else:
            scale = encoded["scale"].float()
            values.view(shape).mul_(scale.view(-1, 1) if self.granularity == "row" else scale.view(1, -1))
        return self._expand_(values).view(shape)

    def _decode_group_tables(self, codes: torch.Tensor, shape: tuple[int, ...], scale: torch.Tensor,
                             out: torch.Tensor | None) -> torch.Tensor:
        """4-bit codes companded before a per-row, -column or -block scale: each group's 16 decoded
        values (the expansion of level x scale) are computed once, a table that every code of the
        group reads, instead of expanding every element. (A per-tensor scale is the one-group case of
        :meth:`_values`.)"""
        numel = math.prod(shape)
        tables = self._group_tables(scale)
        values = native_codec.decode_tables(self, codes, shape, tables, out) if self.native else None
        if values is not None:
            return values
        # flat table index of each element: its group's first row (16 x group) + its code
        index = unpack(codes, 4, numel).int()
        first = torch.arange(0, tables.numel(), 16, dtype=torch.int32, device=codes.device)
        if self.granularity == "column":
            index = index.view(shape).add_(first)
        elif self.granularity == "row":
            index = index.view(shape).add_(first.view(-1, 1))
        else:
            full = numel // self.block_size * self.block_size
            index[:full].view(-1, self.block_size).add_(first[: full // self.block_size].view(-1, 1))
            index[full:].add_(first[-1])  # a ragged last block
        out = torch.empty(numel, dtype=torch.float32, device=codes.device) if out is None else out.view(-1)
        return torch.index_select(tables.view(-1), 0, index.view(-1), out=out)

    def _group_tables(self, scale: torch.Tensor) -> torch.Tensor:
        """groups x 16: the decoded value of codes 0..15 under each fp32 ``scale`` of a codec
        companded before the scale, expand(level x scale)."""
        steps = self._code_values(scale.device)
        return on_whole_vectors(self.compander.expand, (scale.view(-1, 1) * steps).view(-1)).view(-1, 16)

    def _decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """The value map's values of uint8 codes (in steps when companding)."""
        return self.value_map.decode(codes) if self.compander is None else self.value_map.decode_steps(codes)

    def _values(self, codes: torch.Tensor, numel: int, scale: torch.Tensor | None = None, *,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`_decode_codes` of the first ``numel`` codes, fresh or in ``out`` (flat view); with
        ``scale`` (one value), times it and expanded."""
        if codes.numel() != packed_numel(numel, self.bits):
            raise ValueError(f"{codes.numel()} bytes cannot hold exactly {numel} codes of {self.bits} bits")
        if out is not None and codes.numel() * 8 // self.bits != numel:
            return out.view(-1).copy_(self._values(codes, numel, scale))  # an odd count of 4-bit codes
        # index by little-endian pairs of bytes (two or four codes per lookup) where they can be viewed
        # so, unless the table is expanded per call (65536 rows of expansions would cost what they save)
        folds = self.compander is not None and scale is not None
        wide = (not folds and codes.numel() % 2 == 0 and codes.is_contiguous() and codes.storage_offset() % 2 == 0
                and _LITTLE)
        per_row = (2 if wide else 1) * 8 // self.bits
        if codes.device.type == "meta" or (self.value_map.cheap_decode and not folds):
            codes = unpack(codes, self.bits, numel)
            if out is None:
                values = self._decode_codes(codes)
            elif self.compander is None:
                values = self.value_map.decode_into(codes, out.view(-1))
            else:
                values = self.value_map.decode_steps_into(codes, out.view(-1))
            return values if scale is None else self._expand_(values.mul_(scale))
        table = self._table(codes.device, wide) if scale is None else self._scaled_table(codes.device, wide, scale)
        index = (codes.view(torch.uint16) if wide else codes).int()
        if out is None:
            out = torch.empty(index.numel() * per_row, dtype=torch.float32, device=codes.device)
            return _gather_rows(table, index, out.view(-1, per_row)).view(-1)[:numel]
        return _gather_rows(table, index, out.view(-1, per_row)).view(-1)

    def _table(self, device: torch.device, wide: bool) -> torch.Tensor:
        """:meth:`_decode_codes` of the codes in every byte (256 x codes per byte), or with ``wide``
        in every little-endian pair of bytes (65536 x 2 or x 4; 1 MiB at most)."""
        table = self._tables.get((device, wide))
        if table is None:
            index = torch.arange(65536 if wide else 256, dtype=torch.int32)
            shifts = range(0, 16 if wide else 8, self.bits)
            codes = torch.stack([(index >> shift) & (2**self.bits - 1) for shift in shifts], dim=-1)
            table = self._tables[(device, wide)] = self._decode_codes(codes.to(torch.uint8)).float().to(device)
        return table

    def _code_values(self, device: torch.device) -> torch.Tensor:
        """The value of each of the 16 codes of 4 bits before the scale (in steps when companding;
        bytes 0..15's low nibble), contiguous: what the C decoders and the scale search read, kept
        instead of sliced and copied at every call."""
        values = self._tables.get((device, "codes"))
        if values is None:
            values = self._tables[(device, "codes")] = self._table(device, False)[:16, 0].contiguous()
        return values

    def _scaled_table(self, device: torch.device, wide: bool, scale: torch.Tensor) -> torch.Tensor:
        """The table times ``scale``, expanded when companding: the same products and expansions
        as of each decoded value."""
        return self._expand_(self._table(device, wide) * scale)

    def _expand_(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` expanded in place when companding (on the CPU in slices through a small
        scratch buffer: the compander's arithmetic without a matrix-sized temporary)."""
        compander = self.compander
        if compander is None:
            return values
        if values.device.type != "cpu":
            return values.copy_(compander.expand(values))
        flat = values.view(-1)
        for start in range(0, flat.numel(), CHUNK):
            v = flat[start : start + CHUNK]
            compander.expand_(v, self._buffer("y", v.numel()))
        return values

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


# A table row of 1, 2 or 4 fp32 values read as one element of this dtype (the same bytes).
_ROW_WORDS = {4: torch.float32, 8: torch.int64, 16: torch.complex128}


def _gather_rows(table: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``torch.index_select(table, 0, index, out=out)`` for a contiguous fp32 ``table`` of 1, 2 or 4
    columns: on the CPU each row is gathered as one element of a 1-D table of 4-, 8- or 16-byte
    words, which torch's gather kernel copies several times faster than rows (the bytes are only
    moved, never computed on, so they are the rows' bytes)."""
    columns = table.shape[1]
    words = _ROW_WORDS.get(columns * 4)
    if (table.device.type != "cpu" or words is None or not (table.is_contiguous() and out.is_contiguous())
            or table.storage_offset() % columns or out.storage_offset() % columns):
        return torch.index_select(table, 0, index, out=out)
    torch.index_select(table.view(words).view(-1), 0, index, out=out.view(words).view(-1))
    return out


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
