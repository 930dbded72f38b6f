""":class:`~muonq.optim.codecs.quant.QuantCodec`'s encoding and decoding of CPU tensors through the C
loops of :mod:`~muonq.optim.codecs.native`: the PyTorch encoder's scales (rounded into their
format in C by the same rules) and codes, each in one or two passes.

What runs there, deterministic rounding only: 4-bit mu-law codes (companded before the scale,
MuonQ's quantizer, or after it) on tensor, column or block scales (blocks a multiple of 64
elements), the scale search on mu-law-after-the-scale blocks, linear codes (4 or 8 bits) on
tensor, block, row or column scales and (4 bits) GRASP's grid scales; decoding of 4-bit codes on
any of those scales (companded before the scale: with a 16-bit scale dtype) and of linear 8-bit
codes. Everything else (other value maps, stochastic rounding, inputs with NaN or inf) stays in
PyTorch: :func:`encode` and :func:`decode` return None for it.

The bytes are the PyTorch encoder's. Linear codes are its arithmetic. Mu-law levels come from
thresholds (see ``native.c``); the 64-element chunks with an element within :data:`BAND`
(relative) of one are encoded again here by the PyTorch arithmetic, since a rounded log1p can move
an element across a threshold only that close to it. The scale search measures each candidate's
error with levels from the exact thresholds and sums it in another order than PyTorch does: where
an element within fp32 rounding of a threshold meets candidates whose errors are that close, the
two encoders may keep different candidates (none of 6,656 blocks of the tests' data); the codes
of a chosen scale are the same.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import torch

from muonq.optim.codecs import native
from muonq.optim.codecs.base import Encoded
from muonq.optim.codecs.linear import LinearMap
from muonq.optim.codecs.mulaw import VECTOR, MuLawCompander, MuLawMap
from muonq.optim.codecs.packing import packed_numel
from muonq.optim.codecs.scales import STEP_FLOOR

if TYPE_CHECKING:
    from muonq.optim.codecs.quant import QuantCodec

# Relative half-width of the band around each threshold whose elements the PyTorch arithmetic
# decides. The PyTorch encoder's level of an element carries a few fp32 roundings (log1p to 1 ulp,
# a product, a quotient): over 21M values per map (mu-law 255 before the scale, 3 after it), the
# dozen it levels otherwise than the exact thresholds lay within 1.6e-7 (relative) of one.
BAND = 1e-5


def encode(codec: QuantCodec, x: torch.Tensor, shape: tuple[int, ...]) -> Encoded | None:
    """``codec.encode(x)`` (x: fp32) through C, or None where this module does not apply."""
    if not (codec.bits in (4, 8) and not codec.stochastic and type(x) is torch.Tensor and x.device.type == "cpu"
            and native.available()):  # plain tensors only: C reads their memory (a DTensor's is a shard)
        return None
    x = x.contiguous()
    if codec.compander is None and isinstance(codec.value_map, LinearMap):
        if codec.granularity == "grid":
            return _encode_grid(codec, x, shape) if codec.bits == 4 else None
        return None if codec.scale_search else _encode_linear(codec, x, shape)
    mulaw_first, mulaw_after = codec.compander is not None, isinstance(codec.value_map, MuLawMap)
    if codec.bits != 4 or not (mulaw_first or mulaw_after) or codec.granularity in ("row", "grid"):
        return None
    if codec.granularity == "block" and codec.block_size % native.CHUNK:
        return None
    if codec.scale_search:
        return _encode_searched(codec, x, shape) if codec.granularity == "block" and mulaw_after else None
    return _encode_mulaw(codec, x, shape)


def _layout(codec: QuantCodec, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(rows, cols, group) of ``native.c``'s loops for the codec's scale groups: the flat tensor as a
    rows x cols matrix, with one scale per ``group`` consecutive elements, or per column when
    ``group`` is 0."""
    if codec.granularity in ("row", "column"):
        return shape[0], shape[1], 0 if codec.granularity == "column" else shape[1]
    numel = math.prod(shape)
    return 1, numel, numel if codec.granularity == "tensor" else codec.block_size


def _mulaw(codec: QuantCodec) -> tuple[int, MuLawCompander]:
    """``native.c``'s mode of a mu-law codec and the compander of its values (before the scale, or
    the value map's after it)."""
    if codec.compander is not None:
        return native.COMPAND_FIRST, codec.compander
    return native.COMPAND_AFTER, codec.value_map.compander


def _group_count(codec: QuantCodec, shape: tuple[int, ...]) -> int:
    rows, cols, group = _layout(codec, shape)
    return cols if group == 0 else -(-rows * cols // group)


def _group_absmax(codec: QuantCodec, x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor | None:
    """|x|'s max per scale group (flat, one per group), None if x holds NaN or inf."""
    absmax = torch.empty(_group_count(codec, shape), dtype=torch.float32)
    return None if native.call("mq_absmax", x, *_layout(codec, shape), 0.0, absmax) else absmax


def _redo_listed(codec: QuantCodec, x: torch.Tensor, shape: tuple[int, ...], codes: torch.Tensor,
                 listed: torch.Tensor, divisor: torch.Tensor) -> None:
    """Encode the listed 64-element chunks of ``x`` again, into ``codes``, by the PyTorch encoder's
    arithmetic: C computes what it gives log1p and finishes the codes, torch's log1p (on whole
    chunks, so its vector loop) runs between. ``divisor``: the fp32 divisor of each scale group."""
    _, cols, group = _layout(codec, shape)
    mode, compander = _mulaw(codec)
    head = (x, x.numel(), cols, group, divisor.contiguous(), mode)
    logs = torch.empty(listed.numel() * native.CHUNK, dtype=torch.float32)
    native.call("mq_redo_args", *head, compander.mu, listed, listed.numel(), logs)
    torch.log1p(logs, out=logs)
    native.call("mq_redo_codes", *head, compander.inv_log1p_mu, listed, listed.numel(), logs, codes)


def _outputs(codec: QuantCodec, groups: int, numel: int) -> tuple[torch.Tensor, ...]:
    """Fresh (scale, divisor, codes, listed) for a mu-law encoder of ``native.c``."""
    return (torch.empty(groups, dtype=codec.scale_dtype), torch.empty(groups),
            torch.empty(packed_numel(numel, 4), dtype=torch.uint8),
            torch.empty(-(-numel // native.CHUNK), dtype=torch.int64))


def _redone(codec: QuantCodec, x: torch.Tensor, shape: tuple[int, ...], count: int, outputs: tuple[torch.Tensor, ...]
            ) -> Encoded:
    """The encoding in ``outputs`` once the ``count`` chunks the C encoder listed are encoded again."""
    scale, divisor, codes, listed = outputs
    assert count >= 0, "the C encoder ran out of memory"
    if count:
        _redo_listed(codec, x, shape, codes, listed[:count], divisor)
    return {"codes": codes, "scale": scale}


def _encode_mulaw(codec: QuantCodec, x: torch.Tensor, shape: tuple[int, ...]) -> Encoded | None:
    """Mu-law codes and their scales: C takes each group's absmax, then (given torch's log1p of the
    companding before the scale) makes the scales as ``QuantCodec._scale`` does and the codes."""
    mode, compander = _mulaw(codec)
    first = mode == native.COMPAND_FIRST
    groups = _group_count(codec, shape)
    # before the scale, what the companding of the absmax gives log1p: min(absmax, 1) x mu, padded
    # with zeros to whole vectors (see mulaw.on_whole_vectors)
    v = torch.zeros(groups + (-groups % VECTOR)) if first else torch.empty(groups)
    if native.call("mq_absmax", x, *_layout(codec, shape), compander.mu if first else 0.0, v):
        return None
    if first:
        torch.log1p(v, out=v)
    outputs = _outputs(codec, groups, math.prod(shape))
    count = native.call("mq_encode4_mulaw", x, *_layout(codec, shape), v, compander.inv_log1p_mu,
                        native.SCALE_KINDS[codec.scale_dtype], STEP_FLOOR, *outputs[:2], mode, compander.mu,
                        BAND, *outputs[2:])
    return _redone(codec, x, shape, count, outputs)


@functools.lru_cache(maxsize=4)
def _ratio_tensor(ratios: tuple[float, ...]) -> torch.Tensor:
    """The search's candidate ratios as the fp32 tensor C reads (made once, not at every call)."""
    return torch.tensor(ratios, dtype=torch.float32)


def _encode_searched(codec: QuantCodec, x: torch.Tensor, shape: tuple[int, ...],
                     errors: torch.Tensor | None = None) -> Encoded | None:
    """The scale search (see ``QuantCodec``) of mu-law-after-the-scale blocks; ``errors`` (fp32,
    blocks x candidates), when given, receives each candidate's squared error."""
    from muonq.optim.codecs.quant import SEARCH_RATIOS

    assert len(SEARCH_RATIOS) <= 16, "native.c's search keeps 16 candidates at most"
    blocks = _group_count(codec, shape)
    assert errors is None or (errors.dtype == torch.float32 and errors.shape == (blocks, len(SEARCH_RATIOS)))
    ratios = _ratio_tensor(SEARCH_RATIOS)
    magnitudes = codec._code_values(x.device)[8:]  # levels 0..7, decoded, before the scale
    numel = math.prod(shape)
    outputs = _outputs(codec, blocks, numel)
    count = native.call("mq_search4_blocks", x, numel, codec.block_size, len(SEARCH_RATIOS), ratios,
                        native.SCALE_KINDS[codec.scale_dtype], *outputs[:2], magnitudes, codec.value_map.mu, BAND,
                        *outputs[2:], errors)
    return None if count == -2 else _redone(codec, x, shape, count, outputs)  # -2: NaN or inf in x


def _encode_linear(codec: QuantCodec, x: torch.Tensor, shape: tuple[int, ...]) -> Encoded | None:
    """Linear codes on tensor, block, row or column scales: the PyTorch encoder's arithmetic."""
    absmax = _group_absmax(codec, x, shape)
    if absmax is None:
        return None
    scale, divisor = torch.empty(absmax.numel(), dtype=codec.scale_dtype), torch.empty(absmax.numel())
    codes = torch.empty(packed_numel(math.prod(shape), codec.bits), dtype=torch.uint8)
    assert native.call("mq_encode_linear", x, *_layout(codec, shape), absmax, native.SCALE_KINDS[codec.scale_dtype],
                       scale, divisor, codec.bits, codes) == 0, "the C encoder ran out of memory"
    return {"codes": codes, "scale": scale}


def _encode_grid(codec: QuantCodec, x: torch.Tensor, shape: tuple[int, ...]) -> Encoded | None:
    """Linear codes on grid scales: the PyTorch encoder's arithmetic."""
    from muonq.optim.codecs.grid import grid_counts

    if shape[1] % 2:
        return None
    tile_rows, tile_cols = grid_counts(shape[0], shape[1], codec.tile_size)
    row_absmax, col_absmax = torch.empty(shape[0], tile_cols), torch.empty(tile_rows, shape[1])
    if native.call("mq_grid_absmax", x, shape[0], shape[1], codec.tile_size, row_absmax, col_absmax):
        return None
    (row_scale, row_div), (col_scale, col_div) = codec._scale(row_absmax), codec._scale(col_absmax)
    clamp = not (bool((row_div >= row_absmax).all()) and bool((col_div >= col_absmax).all()))
    codes = torch.empty(packed_numel(math.prod(shape), 4), dtype=torch.uint8)
    native.call("mq_encode4_grid", x, shape[0], shape[1], codec.tile_size, row_div.contiguous(),
                col_div.contiguous(), int(clamp), torch.empty(shape[1], dtype=torch.uint8), codes)
    return {"codes": codes, "row_scale": row_scale, "col_scale": col_scale}


def decode(codec: QuantCodec, encoded: Encoded, shape: tuple[int, ...], out: torch.Tensor | None
           ) -> torch.Tensor | None:
    """``codec.decode(encoded, shape, out=out)`` (flat) by the PyTorch decoder's arithmetic in one C
    pass, for 4-bit codes on grid scales (linear), 4-bit codes on tensor, block, row or column scales
    (companded before the scale with a 16-bit scale dtype, or not companded), and linear 8-bit codes
    on those scales; None for every other codec."""
    codes = encoded["codes"]
    if not (codec.bits in (4, 8) and type(codes) is torch.Tensor and codes.device.type == "cpu"
            and codes.is_contiguous() and codes.numel() == packed_numel(math.prod(shape), codec.bits)
            and native.available()):
        return None
    if codec.granularity == "grid":
        return _decode_grid(codec, encoded, shape, out) if codec.bits == 4 else None
    scale = encoded["scale"]
    if not (type(scale) is torch.Tensor and scale.dtype == codec.scale_dtype and scale.is_contiguous()
            and scale.numel() == _group_count(codec, shape)):
        return None
    if codec.bits == 8:
        if codec.compander is not None or not isinstance(codec.value_map, LinearMap):
            return None
        out = torch.empty(math.prod(shape), dtype=torch.float32) if out is None else out.view(-1)
        assert native.call("mq_decode8_linear", codes, *_layout(codec, shape), scale,
                           native.SCALE_KINDS[scale.dtype], out) == 0, "the C decoder ran out of memory"
        return out
    if codec.compander is None:  # the value map's level of each code times the scale
        source, table = native.TABLE_SCALED, codec._code_values(codes.device)
    elif codec.scale_dtype in (torch.float16, torch.bfloat16):
        source, table = native.TABLE_EXPANDED, _expanded_table(codec)
    else:
        return None
    return _decode_groups(codec, codes, shape, scale, source, table, out)


def _decode_grid(codec: QuantCodec, encoded: Encoded, shape: tuple[int, ...], out: torch.Tensor | None
                 ) -> torch.Tensor | None:
    if codec.compander is not None or not isinstance(codec.value_map, LinearMap) or len(shape) != 2 \
            or shape[1] % 2 or codec.tile_size % 2:
        return None
    out = torch.empty(math.prod(shape), dtype=torch.float32) if out is None else out.view(-1)
    native.call("mq_decode4_grid", encoded["codes"], shape[0], shape[1], codec.tile_size,
                encoded["row_scale"].float().contiguous(), encoded["col_scale"].float().contiguous(), out)
    return out


def decode_tables(codec: QuantCodec, codes: torch.Tensor, shape: tuple[int, ...], tables: torch.Tensor,
                  out: torch.Tensor | None) -> torch.Tensor | None:
    """The per-group table lookup of ``QuantCodec._decode_group_tables`` (``tables``: groups x 16
    fp32) in one C pass, flat; None where the codes are not a plain contiguous CPU tensor."""
    if not (type(codes) is torch.Tensor and codes.device.type == "cpu" and codes.is_contiguous()
            and native.available()):
        return None
    return _decode_groups(codec, codes, shape, tables, native.TABLE_GIVEN, tables.contiguous(), out)


def _decode_groups(codec: QuantCodec, codes: torch.Tensor, shape: tuple[int, ...], scale: torch.Tensor,
                   source: int, table: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    out = torch.empty(math.prod(shape), dtype=torch.float32) if out is None else out.view(-1)
    kind = native.SCALE_KINDS.get(scale.dtype, 0)
    assert native.call("mq_decode4_groups", codes, *_layout(codec, shape), scale, kind, source, table, out) == 0, \
        "the C decoder ran out of memory"
    return out


_EXPANDED: dict[tuple[float, torch.dtype], torch.Tensor] = {}


def _expanded_table(codec: QuantCodec) -> torch.Tensor:
    """``QuantCodec._group_tables`` of every 16-bit scale pattern (65536 x 16, flat, 4 MiB) of a codec
    companded before the scale (the products level x scale are exact in fp32, so each row is what
    the codec computes for that scale), once per mu and scale dtype."""
    key = (codec.compander.mu, codec.scale_dtype)
    table = _EXPANDED.get(key)
    if table is None:
        patterns = torch.arange(65536, dtype=torch.int32)
        scales = torch.where(patterns >= 32768, patterns - 65536, patterns).to(torch.int16).view(codec.scale_dtype)
        table = _EXPANDED[key] = codec._group_tables(scales.float()).view(-1)
    return table
