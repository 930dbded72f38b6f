"""Short training runs of every optimizer on a GPU through the real entry point: bf16 autocast,
fused AdamW, the Triton kernels (``kernels=triton``, so a missing kernel fails instead of falling
back) and ``torch.compile``. Skipped without CUDA; the kernel-level comparisons on CUDA are in
test_kernels.py."""

from __future__ import annotations

import math

import pytest
import torch

from muonq.config import MUON_FAMILY, OPTIMIZERS

from .conftest import TINY, losses, run_training

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_each_optimizer_trains_on_the_gpu(tmp_path, shakespeare_data, optimizer):
    overrides = [*TINY, "device=cuda", f"optimizer_params={optimizer}", "recipe.training_params.max_steps=30",
                 "optimizer_params.args.lr=0.006", "optimizer_params.args.min_quant_numel=0"]
    if optimizer in MUON_FAMILY and optimizer not in ("muon", "muoneq"):
        overrides.append("optimizer_params.kernels=triton")
    proc, rows = run_training(tmp_path / "out", shakespeare_data, *overrides, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    curve = losses(rows)
    assert all(math.isfinite(v) for v in curve.values())
    first, last = curve[min(curve)], curve[max(curve)]
    assert last < first - 0.5, (first, last)
    perf = [r for r in rows if "perf/peak_memory_bytes" in r]
    assert perf and perf[-1]["perf/peak_memory_bytes"] > 0


def test_compiled_model_trains_like_the_eager_one(tmp_path, shakespeare_data):
    common = [*TINY, "device=cuda", "optimizer_params=muonq", "recipe.training_params.max_steps=10"]
    eager, rows_eager = run_training(tmp_path / "eager", shakespeare_data, *common, "run_name=eager")
    compiled, rows_compiled = run_training(tmp_path / "compiled", shakespeare_data, *common, "run_name=compiled",
                                           "recipe.training_params.compile=true", timeout=900)
    assert eager.returncode == 0 and compiled.returncode == 0, (eager.stderr + compiled.stderr)[-3000:]
    a, b = losses(rows_eager), losses(rows_compiled)
    assert a.keys() == b.keys()
    for step in a:  # bf16 autocast: compiled kernels round differently, the trajectories stay close
        assert abs(a[step] - b[step]) < 0.05 * a[step], (step, a[step], b[step])
