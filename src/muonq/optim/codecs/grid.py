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
