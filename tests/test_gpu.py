"""Short training runs of every optimizer on a GPU through the real entry point: bf16 autocast,
fused AdamW, the Triton kernels (``kernels=triton``, so a missing kernel fails instead of falling
back) and ``torch.compile``; and a training step that never waits for the GPU. Skipped without
CUDA; the kernel-level comparisons on CUDA are in test_kernels.py."""

from __future__ import annotations

import math

import pytest
import torch

from muonq.config import OPTIMIZERS, compose_config, optimizer_spec, preset
from muonq.models import build_model
from muonq.optim.zero import build_sharded_optimizer
from muonq.train import guard
from muonq.train.trainer import to_device

from .conftest import TINY, losses, run_training

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_each_optimizer_trains_on_the_gpu(tmp_path, shakespeare_data, optimizer):
    overrides = [*TINY, "device=cuda", f"optimizer_params={optimizer}", "recipe.training_params.max_steps=30",
                 "optimizer_params.args.lr=0.006"]
    if preset(optimizer).family == "muon":  # (min_quant_numel is a Muon key: adamw refuses it)
        overrides.append("optimizer_params.args.min_quant_numel=0")
        if optimizer not in ("muon", "muoneq", "muonq-hifi"):  # fp32 state; muonq-hifi's scale search is PyTorch's
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


@pytest.mark.parametrize("optimizer", [o for o in OPTIMIZERS if o != "adamw8bit"])  # torchao's step is not ours
def test_training_step_never_waits_for_the_gpu(optimizer):
    """The trainer's step with nonfinite=abort (the batch's copy to the GPU, forward, backward,
    gradient norm, the late verdict, clipping, the optimizer with its fused kernels) under
    ``set_sync_debug_mode("error")``: any host synchronisation raises. Two warm-up steps first
    create the state and the kernels' tables."""
    cfg = compose_config(["recipe=llama-tiny", f"optimizer_params={optimizer}", "device=cuda"])
    torch.manual_seed(0)
    model = build_model(cfg.recipe.model)
    model.cuda()
    hidden = model.hidden_matrices()
    hidden_ids = {id(p) for _, p in hidden}
    others = [(n, p) for n, p in model.named_parameters() if id(p) not in hidden_ids]
    optimizer_set = build_sharded_optimizer(optimizer_spec(cfg.optimizer_params), named_hidden=hidden, named_others=others,
                                            rank=0, world_size=1, device_type="cuda")
    params = list(model.parameters())
    tokens = torch.randint(0, cfg.recipe.model.vocab_size, (4, 129))  # a host batch, as the loader gives
    device = torch.device("cuda")

    def step() -> guard.LateVerdict:
        x, y = to_device(tokens[:, :-1], device), to_device(tokens[:, 1:], device)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x, y)
        loss.backward()
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        verdict = guard.LateVerdict(1, loss, norm, stop=False)
        torch.nn.utils.clip_grads_with_norm_(params, 1.0, norm, foreach=True)
        optimizer_set.step()
        optimizer_set.zero_grad(set_to_none=True)
        return verdict

    for _ in range(2):
        step().read()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        verdict = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    bad, stop, _ = verdict.read()
    assert not bad and not stop
