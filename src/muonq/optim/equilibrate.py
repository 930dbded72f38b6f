"""MuonEq: state-free row / column equilibration of the update right before Newton–Schulz."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Equilibrate:
    """U -> diag(r)^p U diag(c)^p with r, c the row and column sums of U * U (p = ``exponent``).

    ``rowcol`` computes both statistics from the same U. With ``phase`` set, ``rowcol`` becomes
    ``row`` from that step on. ``clip`` bounds every scale to [1/clip, clip].
    """

    mode: str = "row"
    exponent: float = -0.5
    phase: int | None = None
    clip: float | None = None
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.mode not in ("row", "col", "rowcol"):
            raise ValueError(f"equilibrate mode must be row, col or rowcol, got {self.mode!r}")
        if self.clip is not None and self.clip < 1:
            raise ValueError(f"equilibrate clip must be >= 1, got {self.clip}")

    def mode_at(self, step: int) -> str:
        if self.mode == "rowcol" and self.phase is not None and step >= self.phase:
            return "row"
        return self.mode

    def _scale(self, sum_sq: torch.Tensor) -> torch.Tensor:
        scale = (sum_sq + self.eps).pow(self.exponent)
        if self.clip is not None:
            scale = scale.clamp(1.0 / self.clip, self.clip)
        return scale

    def __call__(self, update: torch.Tensor, step: int) -> torch.Tensor:
        mode = self.mode_at(step)
        squared = update.float().square()
        out = update
        if mode in ("row", "rowcol"):
            out = out * self._scale(squared.sum(dim=-1, keepdim=True)).to(update.dtype)
        if mode in ("col", "rowcol"):
            out = out * self._scale(squared.sum(dim=-2, keepdim=True)).to(update.dtype)
        return out
