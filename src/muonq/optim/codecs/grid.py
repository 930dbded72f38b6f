"""Grid scales (GRASP): within each tile x tile tile of a matrix, entry (i, j) is scaled by
min(absmax of row i in the tile, absmax of column j in the tile).

Row outliers inflate only their own row's scale and column outliers only their column's, so the
entries of a tile that has either kind (not both) keep a fine scale. Edge tiles may be ragged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def grid_counts(rows: int, cols: int, tile: int) -> tuple[int, int]:
    """(tile rows, tile columns) covering a rows x cols matrix."""
    return -(-rows // tile), -(-cols // tile)


def grid_absmax(x: torch.Tensor, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tile row absmax (rows x tile columns) and column absmax (tile rows x cols) of matrix x."""
    rows, cols = x.shape
    tile_rows, tile_cols = grid_counts(rows, cols, tile)
    a = x.abs()
    row_absmax = F.pad(a, (0, tile_cols * tile - cols)).view(rows, tile_cols, tile).amax(dim=2)
    col_absmax = F.pad(a, (0, 0, 0, tile_rows * tile - rows)).view(tile_rows, tile, cols).amax(dim=1)
    return row_absmax, col_absmax


def grid_scale(row_scale: torch.Tensor, col_scale: torch.Tensor, tile: int) -> torch.Tensor:
    """The elementwise scale min(row_scale[i, j // tile], col_scale[i // tile, j]) (fp32)."""
    rows, cols = row_scale.shape[0], col_scale.shape[1]
    per_row = row_scale.float().repeat_interleave(tile, dim=1)[:, :cols]
    per_col = col_scale.float().repeat_interleave(tile, dim=0)[:rows]
    return torch.minimum(per_row, per_col)


def grid_row_absmax(a: torch.Tensor, tile: int, *, out: torch.Tensor) -> torch.Tensor:
    """The row absmax per tile column of ``a`` (|x| of some rows of a matrix), into ``out``
    (rows x tile columns): :func:`grid_absmax`'s row part, without the padded copy."""
    rows, cols = a.shape
    full_tiles = cols // tile
    full = full_tiles * tile
    if full:
        torch.amax(a[:, :full].reshape(rows, full_tiles, tile), dim=2, out=out[:, :full_tiles])
    if full < cols:
        torch.amax(a[:, full:], dim=1, keepdim=True, out=out[:, full_tiles:])
    return out


def grid_apply(op, part: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor, tile: int, *,
               out: torch.Tensor, combine=torch.minimum) -> torch.Tensor:
    """``op(part, combine(row scale, column scale))`` elementwise into ``out``, for ``part``: rows
    of one tile row of a matrix, ``row_scale`` their (rows x tile columns) scales and ``col_scale``
    the tile row's (columns) scales. With ``combine`` = minimum, that is ``op(part, grid_scale)``,
    one tile row at a time, without materialising the repeated scales."""
    rows, cols = part.shape
    full_tiles = cols // tile
    full = full_tiles * tile
    if full:
        scale = combine(row_scale[:, :full_tiles, None], col_scale[:full].view(1, full_tiles, tile))
        op(part[:, :full].reshape(rows, full_tiles, tile), scale, out=out[:, :full].view(rows, full_tiles, tile))
    if full < cols:
        op(part[:, full:], combine(row_scale[:, full_tiles:], col_scale[full:].view(1, -1)), out=out[:, full:])
    return out
