"""Learning-rate multiplier per optimizer step (one multiplier for every param group)."""

from __future__ import annotations

import math
from typing import Any


def budget_steps(tokens_processed: int, total_tokens_B: float) -> int:
    """Optimizer steps that ``recipe.dataset.total_tokens_B`` buys (at least one)."""
    return max(1, int(total_tokens_B * 1e9) // tokens_processed)


def total_steps(cfg: Any) -> int:
    """A run's optimizer steps: the token budget, capped by ``recipe.training_params.max_steps``."""
    tp = cfg.recipe.training_params
    steps = budget_steps(tp.tokens_processed, cfg.recipe.dataset.total_tokens_B)
    return min(steps, tp.max_steps) if tp.max_steps else steps


def lr_multiplier(step: int, total_steps: int, *, name: str, warm_up_fraction: float, min_lr_ratio: float) -> float:
    """Multiplier on the peak lr for optimizer step ``step`` (0-based) of ``total_steps``.

    ``warm-up-cosine``: linear warmup over ``warm_up_fraction`` of the steps, starting at
    1/warmup (never 0), then cosine decay to ``min_lr_ratio``. ``cosine``: the decay alone.
    ``constant``: 1.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if name == "constant":
        return 1.0
    if name not in ("warm-up-cosine", "cosine"):
        raise ValueError(f"unknown lr schedule {name!r}; expected warm-up-cosine, cosine or constant")
    warmup = max(1, round(warm_up_fraction * total_steps)) if name == "warm-up-cosine" and warm_up_fraction > 0 else 0
    if step < warmup:
        return (step + 1) / warmup
    decay_steps = max(1, total_steps - warmup - 1)
    progress = min(1.0, (step - warmup) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
