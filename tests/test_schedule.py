from __future__ import annotations

import math

import pytest

from muonq.train.schedule import lr_multiplier


def test_warmup_starts_above_zero_and_reaches_one() -> None:
    total = 1000
    mults = [lr_multiplier(s, total, name="warm-up-cosine", warm_up_fraction=0.01, min_lr_ratio=0.1) for s in range(total)]
    assert mults[0] == pytest.approx(0.1)  # 10 warmup steps: the first runs at 1/10, never at 0
    assert mults[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(mults[:10], mults[1:10]))
    assert all(a >= b for a, b in zip(mults[10:], mults[11:]))
    assert mults[-1] == pytest.approx(0.1)


def test_cosine_midpoint_and_constant() -> None:
    total = 101
    mid = lr_multiplier(50, total, name="cosine", warm_up_fraction=0.0, min_lr_ratio=0.0)
    assert mid == pytest.approx(0.5)
    assert lr_multiplier(7, total, name="constant", warm_up_fraction=0.5, min_lr_ratio=0.0) == 1.0
    assert math.isclose(lr_multiplier(0, 1, name="warm-up-cosine", warm_up_fraction=0.01, min_lr_ratio=0.1), 1.0)


def test_bad_schedule_is_rejected() -> None:
    with pytest.raises(ValueError, match="linear"):
        lr_multiplier(0, 10, name="linear", warm_up_fraction=0.0, min_lr_ratio=0.0)
