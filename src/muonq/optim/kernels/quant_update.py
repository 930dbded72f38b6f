"""The Triton kernel behind every fused path. One program per tile of a tensor, in one pass:
decode stored codes (or read a dense fp32 tensor), optionally apply the momentum update and a
division by a norm, write the fp32 result, write Newton–Schulz's input (the momentum, or its
Nesterov combination with the gradient) in NS's dtype, emit partial statistics, and requantize.

The tensor is seen as a row-major 2-D *view* chosen so that scale groups are tile-local:

- BLOCK (and row) scales: view = (blocks, block_size); a program owns whole blocks, so the block
  absmax is an in-tile reduction and requantization needs no second pass.
- GRID scales: view = the matrix; a program owns one tile x tile tile, whose row and column
  absmaxes are in-tile reductions as well.
- TENSOR and COLUMN scales: view = flat rows of ``_FLAT`` elements. Their absmax spans the whole
  tensor (or column), so they take two launches: one that writes the values and per-program
  partial (sum of squares, absmax), a tiny torch reduction, then one that quantizes.

4-bit codes are packed two per byte in flat order (element 2i in the low nibble). When every view
row and tile starts at an even element ("paired" layouts: all but odd block sizes, odd row lengths
or odd tiles) a program packs and unpacks its own bytes. Otherwise two programs may share a byte:
codes are then read nibble by nibble and written unpacked to a scratch buffer, packed by torch.

Bit-exactness with the PyTorch codecs: fp32 division is ``div_rn`` (IEEE) and FMA contraction is
off, so values, scales and ROUND/dynamic codes match the reference for the same inputs. Companded
codecs (``COMPAND``) are the exception: their log1p / expm1 are computed here from ``tl.log`` and
``tl.exp`` and agree with torch's to a few ulp (see ``spec``).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from muonq.optim.codecs import Encoded, pack
from muonq.optim.codecs.scales import STEP_FLOOR
from muonq.optim.kernels.spec import BLOCK, COLUMN, GRID, ROUND, TENSOR, KernelSpec, device_tables

_TILE = 4096  # elements per program for flat and block views
_FLAT = 1024  # row length of the flat view

SOURCE_CODES, SOURCE_DENSE = 0, 1  # decode the stored codes / read the fp32 tensor at src_ptr
UPDATE_NONE, UPDATE_SUM, UPDATE_EMA = 0, 1, 2  # x / beta * x + grad / lerp(x, grad, 1 - beta)

# Names the kernel body can see (Triton only reads constexpr globals).
_TENSOR = tl.constexpr(TENSOR)
_BLOCK = tl.constexpr(BLOCK)
_GRID = tl.constexpr(GRID)
_ROUND = tl.constexpr(ROUND)
_CODES = tl.constexpr(SOURCE_CODES)
_SUM = tl.constexpr(UPDATE_SUM)
_EMA = tl.constexpr(UPDATE_EMA)
_NONE = tl.constexpr(UPDATE_NONE)
_FP32_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _pairs(rows, rows_ok, col0, view_cols, numel, TILE_COLS: tl.constexpr, COLS: tl.constexpr):
    """Byte offsets and mask of the packed pairs (elements 2i, 2i + 1) of a paired tile."""
    half = tl.arange(0, COLS // 2)
    cols = col0 + 2 * half
    first = rows[:, None] * view_cols + cols[None, :]
    mask = rows_ok[:, None] & ((cols < view_cols) & (2 * half < TILE_COLS))[None, :] & (first < numel)
    return first // 2, mask


@triton.jit
def _load_codes(codes_ptr, rows, rows_ok, col0, idx, mask, view_cols, numel,
                BITS: tl.constexpr, PAIRED: tl.constexpr, TILE_COLS: tl.constexpr, ROWS: tl.constexpr,
                COLS: tl.constexpr):
    if BITS == 8:
        codes = tl.load(codes_ptr + idx, mask=mask, other=0).to(tl.int32)
    elif PAIRED:
        offs, pmask = _pairs(rows, rows_ok, col0, view_cols, numel, TILE_COLS, COLS)
        packed = tl.load(codes_ptr + offs, mask=pmask, other=0).to(tl.int32)
        codes = tl.reshape(tl.join(packed & 15, packed >> 4), [ROWS, COLS])
    else:
        packed = tl.load(codes_ptr + idx // 2, mask=mask, other=0).to(tl.int32)
        codes = (packed >> ((idx % 2) * 4).to(tl.int32)) & 15
    return codes


@triton.jit
def _store_codes(codes_out_ptr, codes, rows, rows_ok, col0, idx, mask, view_cols, numel,
                 BITS: tl.constexpr, PAIRED: tl.constexpr, TILE_COLS: tl.constexpr, ROWS: tl.constexpr,
                 COLS: tl.constexpr):
    """8-bit codes, or 4-bit codes packed (paired) or one per byte into scratch (not paired)."""
    if BITS == 4 and PAIRED:
        low, high = tl.split(tl.reshape(codes, [ROWS, COLS // 2, 2]))
        offs, pmask = _pairs(rows, rows_ok, col0, view_cols, numel, TILE_COLS, COLS)
        tl.store(codes_out_ptr + offs, (low | (high << 4)).to(tl.uint8), mask=pmask)
    else:
        tl.store(codes_out_ptr + idx, codes.to(tl.uint8), mask=mask)


@triton.jit
def _load_scale(scale_ptr, col_scale_ptr, rows, rows_ok, cols, cols_ok, idx, mask, pid_r, pid_c, ncols, tile_cols,
                GRAN: tl.constexpr):
    """The fp32 scale of every element of the tile (broadcastable to it)."""
    if GRAN == _TENSOR:
        scale = tl.load(scale_ptr).to(tl.float32)
    elif GRAN == _BLOCK:
        scale = tl.load(scale_ptr + rows, mask=rows_ok, other=0).to(tl.float32)[:, None]
    elif GRAN == _GRID:
        row_scale = tl.load(scale_ptr + rows * tile_cols + pid_c, mask=rows_ok, other=0).to(tl.float32)
        col_scale = tl.load(col_scale_ptr + pid_r * ncols + cols, mask=cols_ok, other=0).to(tl.float32)
        scale = tl.minimum(row_scale[:, None], col_scale[None, :])
    else:
        scale = tl.load(scale_ptr + idx % ncols, mask=mask, other=0).to(tl.float32)
    return scale


@triton.jit
def _stored_scale(absmax, scale_ptr):
    """``absmax`` in the scale dtype, rounded up (as ``codecs.scales.store_scale``)."""
    DTYPE: tl.constexpr = scale_ptr.dtype.element_ty
    if DTYPE == tl.float32:
        stored = absmax
    else:
        limit: tl.constexpr = 65504.0 if DTYPE == tl.float16 else 3.3895313892515355e38
        clamped = tl.minimum(absmax, limit)
        stored = clamped.to(DTYPE)
        up = (stored.to(tl.int16, bitcast=True) + 1).to(DTYPE, bitcast=True)
        stored = tl.where(stored.to(tl.float32) < clamped, up, stored)
    return stored


_STEP_FLOOR = tl.constexpr(STEP_FLOOR)


@triton.jit
def _scale(absmax, scale_ptr, STEP: tl.constexpr, LEVELS: tl.constexpr):
    """(stored scale, fp32 divisor) of group absmaxes: the absmax rounded up (``store_scale``), or
    for companded codecs the step absmax / LEVELS, stored rounded to nearest and divided by in fp32,
    floored at 1e-8 (``codecs.scales.step_scale``)."""
    if STEP:
        step = tl.math.div_rn(absmax, LEVELS + tl.zeros_like(absmax))
        stored = step.to(scale_ptr.dtype.element_ty)
        divisor = tl.maximum(step, _STEP_FLOOR)
    else:
        stored = _stored_scale(absmax, scale_ptr)
        divisor = stored.to(tl.float32)
        divisor = tl.where(divisor > 0, divisor, 1.0)
    return stored, divisor


@triton.jit
def _log1p(t):
    """log(1 + t), t >= 0, to a few ulp: log(u) * t / (u - 1) with u = 1 + t rounded (Goldberg)."""
    u = 1.0 + t
    d = u - 1.0
    exact = d == 0.0
    return tl.where(exact, t, tl.log(u) * tl.math.div_rn(t, tl.where(exact, 1.0, d)))


@triton.jit
def _expm1(t):
    """exp(t) - 1, t >= 0, to a few ulp: (u - 1) * t / log(u) with u = exp(t) rounded (Kahan)."""
    u = tl.exp(t)
    d = u - 1.0
    lg = tl.log(u)
    ok = (d != 0.0) & (lg != 0.0)
    return tl.where(ok, d * tl.math.div_rn(t, tl.where(ok, lg, 1.0)), t)


@triton.jit
def _compand(v, MU: tl.constexpr, INV_LOG1P_MU: tl.constexpr):
    """mu-law of v in [-1, 1]: sign(v) log1p(mu |v|) x (1 / ln(1 + mu)) (``MuLawCompander.compand``)."""
    r = _log1p(tl.abs(v) * MU) * INV_LOG1P_MU
    return tl.where(v < 0, -r, r)


@triton.jit
def _expand(z, LOG1P_MU: tl.constexpr, INV_MU: tl.constexpr):
    """The inverse of ``_compand``: sign(z) expm1(|z| ln(1 + mu)) x (1 / mu)."""
    r = _expm1(tl.abs(z) * LOG1P_MU) * INV_MU
    return tl.where(z < 0, -r, r)


@triton.jit
def _encode(y, bounds_ptr, RULE: tl.constexpr, LEVELS: tl.constexpr, OFFSET: tl.constexpr,
            FIRST_CODE: tl.constexpr, STEPS: tl.constexpr, IN_STEPS: tl.constexpr):
    """Codes (int32) of y in [-1, 1], or in [-LEVELS, LEVELS] if ``IN_STEPS``; see ``spec`` for the
    two rules."""
    if RULE == _ROUND:
        # round half to even of |y| * LEVELS (|y| in steps); floor and the fraction are exact in fp32
        if IN_STEPS:
            v = tl.abs(y)
        else:
            v = tl.abs(y) * LEVELS
        whole = tl.floor(v)
        frac = v - whole
        n = whole.to(tl.int32)
        n += ((frac > 0.5) | ((frac == 0.5) & ((n & 1) == 1))).to(tl.int32)
        codes = tl.where(y < 0, -n, n) + OFFSET
    else:
        # count of boundaries < y: branch-free binary search over 2**STEPS - 1 sorted entries
        codes = tl.zeros(y.shape, tl.int32)
        for i in tl.static_range(STEPS):
            step = 1 << (STEPS - 1 - i)
            below = tl.load(bounds_ptr + codes + (step - 1)) < y
            codes += tl.where(below, step, 0)
        codes += FIRST_CODE
    return codes


@triton.jit
def _kernel(
    codes_ptr, codes_out_ptr, scale_ptr, col_scale_ptr, table_ptr, bounds_ptr,
    src_ptr, grad_ptr, out_ptr, ns_ptr, stats_ptr, absmax_ptr, divisor_ptr,
    numel, view_rows, view_cols, ncols, tile_cols, beta, weight,
    SOURCE: tl.constexpr, ADDEND: tl.constexpr, UPDATE: tl.constexpr, DIVIDE: tl.constexpr,
    WRITE_OUT: tl.constexpr, WRITE_NS: tl.constexpr, NESTEROV: tl.constexpr, STATS: tl.constexpr,
    QUANTIZE: tl.constexpr,
    BITS: tl.constexpr, PAIRED: tl.constexpr, GRAN: tl.constexpr, RULE: tl.constexpr, LEVELS: tl.constexpr,
    OFFSET: tl.constexpr, FIRST_CODE: tl.constexpr, STEPS: tl.constexpr,
    COMPAND: tl.constexpr, MU: tl.constexpr, LOG1P_MU: tl.constexpr, INV_MU: tl.constexpr,
    INV_LOG1P_MU: tl.constexpr,
    TILE_ROWS: tl.constexpr, TILE_COLS: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
):
    # a TILE_ROWS x TILE_COLS tile of the view, held in power-of-two ROWS x COLS blocks
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_r.to(tl.int64) * TILE_ROWS + tl.arange(0, ROWS)
    col0 = pid_c * TILE_COLS
    cols = col0 + tl.arange(0, COLS)
    rows_ok = (rows < view_rows) & (tl.arange(0, ROWS) < TILE_ROWS)
    cols_ok = (cols < view_cols) & (tl.arange(0, COLS) < TILE_COLS)
    idx = rows[:, None] * view_cols + cols[None, :]
    mask = rows_ok[:, None] & cols_ok[None, :] & (idx < numel)

    if SOURCE == _CODES:
        codes = _load_codes(codes_ptr, rows, rows_ok, col0, idx, mask, view_cols, numel,
                            BITS, PAIRED, TILE_COLS, ROWS, COLS)
        scale = _load_scale(scale_ptr, col_scale_ptr, rows, rows_ok, cols, cols_ok, idx, mask, pid_r, pid_c, ncols,
                            tile_cols, GRAN)
        x = tl.load(table_ptr + codes) * scale
        if COMPAND:
            x = _expand(x, LOG1P_MU, INV_MU)
        if ADDEND:
            x += tl.load(src_ptr + idx, mask=mask, other=0.0)
    else:
        x = tl.load(src_ptr + idx, mask=mask, other=0.0)
    if UPDATE == _SUM:
        x = x * beta + tl.load(grad_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    elif UPDATE == _EMA:
        # torch.lerp's formula (exact at weight 0 and 1)
        grad = tl.load(grad_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        if weight < 0.5:
            x = tl.fma(grad - x, weight, x)
        else:
            x = tl.fma(grad - x, weight - 1.0, grad)
    if DIVIDE:
        x = tl.math.div_rn(x, tl.load(divisor_ptr) + tl.zeros_like(x))
    x = tl.where(mask, x, 0.0)
    if WRITE_OUT:
        tl.store(out_ptr + idx, x, mask=mask)
    if WRITE_NS:
        # NS input: x, or Nesterov's grad + beta x (EMA: torch.lerp(grad, x, beta))
        if NESTEROV == _NONE:
            u = x
        else:
            g = tl.load(grad_ptr + idx, mask=mask, other=0.0).to(tl.float32)
            if NESTEROV == _SUM:
                u = x * beta + g
            elif beta < 0.5:
                u = tl.fma(x - g, beta, g)
            else:
                u = tl.fma(x - g, beta - 1.0, x)
        tl.store(ns_ptr + idx, u.to(ns_ptr.dtype.element_ty), mask=mask)

    # what the codec quantizes: NaN -> 0, +-inf -> +-fp32 max (torch.nan_to_num)
    clean = tl.where(x != x, 0.0, tl.minimum(tl.maximum(x, -_FP32_MAX), _FP32_MAX))
    magnitude = tl.abs(clean)
    if STATS:
        program = pid_r * tl.num_programs(1) + pid_c
        tl.store(stats_ptr + 2 * program, tl.sum(tl.sum(x * x, axis=1), axis=0))
        tl.store(stats_ptr + 2 * program + 1, tl.max(tl.max(magnitude, axis=1), axis=0))
    if QUANTIZE:
        if COMPAND:
            # MuonQ's order: clamp to [-1, 1] and compand the raw values, then scale
            clean = _compand(tl.minimum(tl.maximum(clean, -1.0), 1.0), MU, INV_LOG1P_MU)
            magnitude = tl.abs(clean)
        if GRAN == _BLOCK:
            stored, divisor = _scale(tl.max(magnitude, axis=1), scale_ptr, COMPAND, LEVELS)
            tl.store(scale_ptr + rows, stored, mask=rows_ok)
            divisor = divisor[:, None]
        elif GRAN == _GRID:
            row_stored, row_divisor = _scale(tl.max(magnitude, axis=1), scale_ptr, COMPAND, LEVELS)
            col_stored, col_divisor = _scale(tl.max(magnitude, axis=0), col_scale_ptr, COMPAND, LEVELS)
            tl.store(scale_ptr + rows * tile_cols + pid_c, row_stored, mask=rows_ok)
            tl.store(col_scale_ptr + pid_r * ncols + cols, col_stored, mask=cols_ok)
            divisor = tl.minimum(row_divisor[:, None], col_divisor[None, :])
        else:
            # TENSOR / COLUMN: the absmax of the source before DIVIDE, reduced by an earlier launch
            if GRAN == _TENSOR:
                group = idx * 0
                first = idx == 0
            else:
                group = idx % ncols
                first = idx < ncols
            absmax = tl.load(absmax_ptr + group, mask=mask, other=0.0)
            if DIVIDE:
                absmax = tl.math.div_rn(absmax, tl.load(divisor_ptr) + tl.zeros_like(absmax))
            if COMPAND:
                # compand is monotonic: the companded group's absmax is the companded absmax
                absmax = _compand(tl.minimum(absmax, 1.0), MU, INV_LOG1P_MU)
            stored, divisor = _scale(absmax, scale_ptr, COMPAND, LEVELS)
            tl.store(scale_ptr + group, stored, mask=mask & first)
        divisor = divisor + tl.zeros_like(clean)
        if COMPAND:
            y = tl.minimum(tl.maximum(tl.math.div_rn(clean, divisor), -LEVELS), LEVELS)
        else:
            y = tl.minimum(tl.maximum(tl.math.div_rn(clean, divisor), -1.0), 1.0)
        codes = tl.where(mask, _encode(y, bounds_ptr, RULE, LEVELS, OFFSET, FIRST_CODE, STEPS, COMPAND), 0)
        _store_codes(codes_out_ptr, codes, rows, rows_ok, col0, idx, mask, view_cols, numel,
                     BITS, PAIRED, TILE_COLS, ROWS, COLS)


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _layout(spec: KernelSpec, shape: torch.Size) -> dict[str, int]:
    """The view, tile and grid of a tensor of ``shape`` (see the module docstring)."""
    numel = math.prod(shape)
    ncols = shape[-1]
    if spec.granularity == GRID:
        view_rows, view_cols = shape
        height = width = spec.tile_size
    else:
        view_cols = spec.block_size if spec.granularity == BLOCK else _FLAT
        view_rows = -(-numel // view_cols)
        width = view_cols
        height = min(max(1, _TILE // _pow2(width)), _pow2(view_rows))
    return dict(
        numel=numel, view_rows=view_rows, view_cols=view_cols, ncols=ncols, tile_cols=-(-ncols // spec.tile_size),
        PAIRED=view_cols % 2 == 0 and width % 2 == 0, TILE_ROWS=height, TILE_COLS=width,
        ROWS=_pow2(height), COLS=_pow2(width), grid=(-(-view_rows // height), -(-view_cols // width)),
    )


def _launch(
    spec: KernelSpec,
    shape: torch.Size,
    encoded: Encoded,
    *,
    src: torch.Tensor | None = None,
    source: int = SOURCE_CODES,
    addend: bool = False,
    grad: torch.Tensor | None = None,
    update: int = UPDATE_NONE,
    beta: float = 1.0,
    out: torch.Tensor | None = None,
    ns_out: torch.Tensor | None = None,
    nesterov: int = UPDATE_NONE,
    stats: bool = False,
    quantize: bool = False,
    absmax: torch.Tensor | None = None,
    divisor: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """One kernel launch; returns the (programs, 2) partial statistics if ``stats``.

    ``update`` applies the momentum update with ``grad``; ``ns_out`` receives NS's input, which
    with ``nesterov`` (UPDATE_SUM / UPDATE_EMA) combines the final x with ``grad``.
    """
    if (update != UPDATE_NONE or nesterov != UPDATE_NONE) and grad is None:
        raise ValueError("a momentum update or a Nesterov NS input needs the gradient")
    layout = _layout(spec, shape)
    grid = layout.pop("grid")
    codes = encoded["codes"]
    device = codes.device
    table, bounds = device_tables(spec, device)
    scale = encoded.get("scale", encoded.get("row_scale"))
    scratch = quantize and spec.bits == 4 and not layout["PAIRED"]
    codes_out = torch.empty(layout["numel"], dtype=torch.uint8, device=device) if scratch else codes
    partials = torch.empty(grid[0] * grid[1], 2, dtype=torch.float32, device=device) if stats else None
    unused = table  # stands in for pointers a configuration never reads
    _kernel[grid](
        codes, codes_out, scale, encoded.get("col_scale", scale), table, bounds,
        unused if src is None else src, unused if grad is None else grad, unused if out is None else out,
        unused if ns_out is None else ns_out, unused if partials is None else partials,
        unused if absmax is None else absmax, unused if divisor is None else divisor,
        beta=float(beta), weight=float(1.0 - beta),
        SOURCE=source, ADDEND=addend, UPDATE=update, DIVIDE=divisor is not None,
        WRITE_OUT=out is not None, WRITE_NS=ns_out is not None, NESTEROV=nesterov, STATS=stats, QUANTIZE=quantize, BITS=spec.bits, GRAN=spec.granularity,
        RULE=spec.rule, LEVELS=spec.levels, OFFSET=spec.offset, FIRST_CODE=spec.first_code, STEPS=spec.steps,
        COMPAND=spec.compand, MU=spec.mu, LOG1P_MU=spec.log1p_mu, INV_MU=spec.inv_mu, INV_LOG1P_MU=spec.inv_log1p_mu,
        enable_fp_fusion=False, num_warps=min(16, max(4, layout["ROWS"] * layout["COLS"] // 1024)), **layout,
    )
    if scratch:
        codes.copy_(pack(codes_out, 4))
    return partials


def nesterov_mode(nesterov: bool, ema: bool) -> int:
    """The kernel's NESTEROV constant for a momentum of the given form."""
    return (UPDATE_EMA if ema else UPDATE_SUM) if nesterov else UPDATE_NONE


def decode_update(
    spec: KernelSpec,
    encoded: Encoded,
    shape: torch.Size,
    *,
    grad: torch.Tensor | None = None,
    addend: torch.Tensor | None = None,
    beta: float = 1.0,
    ema: bool = False,
    requantize: bool = False,
    stats: bool = False,
    write_out: bool = True,
    ns_out: torch.Tensor | None = None,
    nesterov: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """x = decode(encoded) (+ ``addend``); with ``grad``, x <- beta x + grad (EMA: lerp(x, grad,
    1 - beta)). Returns (x as fp32 or None without ``write_out``, partial (sum of squares, absmax)
    per program or None).

    ``requantize`` writes x back into ``encoded`` in the same pass (block and grid scales only).
    ``ns_out`` (any float dtype) receives x, or with ``nesterov`` the Nesterov input from ``grad``.
    """
    if requantize and spec.granularity not in (BLOCK, GRID):
        raise ValueError("in-pass requantization needs block or grid scales")
    out = torch.empty(shape, dtype=torch.float32, device=encoded["codes"].device) if write_out else None
    update = UPDATE_NONE if grad is None else (UPDATE_EMA if ema else UPDATE_SUM)
    partials = _launch(
        spec, shape, encoded, src=addend, addend=addend is not None, grad=grad, update=update, beta=beta, out=out,
        ns_out=ns_out, nesterov=nesterov_mode(nesterov, ema), stats=stats, quantize=requantize,
    )
    return out, partials


def dense_stats(spec: KernelSpec, x: torch.Tensor) -> torch.Tensor:
    """Per-program partial (sum of squares, absmax) of the fp32 tensor ``x``."""
    encoded = {"codes": x.new_empty(1, dtype=torch.uint8), "scale": x.new_empty(1)}
    return _launch(spec, x.shape, encoded, src=x, source=SOURCE_DENSE, stats=True)


def divide(
    spec: KernelSpec,
    x: torch.Tensor,
    divisor: torch.Tensor,
    *,
    ns_out: torch.Tensor | None = None,
    grad: torch.Tensor | None = None,
    beta: float = 1.0,
    nesterov: int = UPDATE_NONE,
) -> None:
    """x <- x / ``divisor`` (one value) in place; ``ns_out`` receives the result in its dtype, or with
    ``nesterov`` its combination with ``grad`` (see :func:`nesterov_mode`), from the same pass."""
    encoded = {"codes": x.new_empty(1, dtype=torch.uint8), "scale": x.new_empty(1)}
    _launch(spec, x.shape, encoded, src=x, source=SOURCE_DENSE, out=x, divisor=divisor, ns_out=ns_out, grad=grad,
            beta=beta, nesterov=nesterov)


def quantize_into(
    spec: KernelSpec,
    x: torch.Tensor,
    encoded: Encoded,
    *,
    absmax: torch.Tensor | None = None,
    divisor: torch.Tensor | None = None,
    overwrite: bool = True,
    ns_out: torch.Tensor | None = None,
    grad: torch.Tensor | None = None,
    beta: float = 1.0,
    nesterov: int = UPDATE_NONE,
) -> None:
    """Encode fp32 ``x`` into the tensors of ``encoded``, in place.

    Tensor and column scales need ``absmax`` (of x, one value or one per column); block and grid
    scales are computed in the tile. With ``divisor`` (one value), x / divisor is encoded, and x is
    overwritten with it in the same pass if ``overwrite``. ``ns_out`` receives the encoded values
    (x / divisor), or with ``nesterov`` (see :func:`nesterov_mode`) their combination with ``grad``.
    """
    if spec.granularity in (TENSOR, COLUMN) and absmax is None:
        raise ValueError("tensor and column scales need the absmax from an earlier reduction")
    _launch(
        spec, x.shape, encoded, src=x, source=SOURCE_DENSE, out=x if divisor is not None and overwrite else None,
        quantize=True, absmax=absmax, divisor=divisor, ns_out=ns_out, grad=grad, beta=beta, nesterov=nesterov,
    )
