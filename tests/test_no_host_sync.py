"""The optimizer step never reads a device value on the host: no host synchronisation in the step.

On the meta device a tensor has shape and dtype but no data, so every read that would make a CUDA
step wait for the GPU raises there: ``.item()``, ``bool()``/``float()`` of a tensor, ``.tolist()``,
a copy to the CPU, an op whose output shape depends on the data (``nonzero``, boolean masks). Each
optimizer is built by the real factory over meta parameters and stepped; the step counter lives on
the CPU in real runs too (torch's convention), so reading it is allowed here as it is on a GPU.

The fused-kernel path is checked the same way with Triton's launch replaced by a recorder: what
runs on the host around the kernels (specs, layouts, grids, scratch buffers, the norm and absmax
reductions, the power iteration) must not read the device either. On a GPU,
``tests/test_gpu.py`` checks the real launches with ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import pytest
import torch

from muonq.config import OPTIMIZERS, compose_config, optimizer_spec
from muonq.optim.zero import build_sharded_optimizer

# Square, wide, tall and odd shapes (odd: partial blocks, tiles and 4-bit pairs); two of one shape
# so that batched Newton-Schulz (ns_batch_size) has something to batch.
HIDDEN = {"q": (96, 96), "k": (96, 96), "up": (160, 96), "down": (96, 160), "odd": (37, 53)}
OTHERS = {"embed": (300, 96), "norm": (96,)}
QUANTIZED = ("muon8bit", "muonq", "grasp", "muon8", "muon4")


def meta_step(name: str, *overrides: str, steps: int = 3) -> torch.optim.Optimizer:
    cfg = compose_config(["recipe=llama-tiny", f"optimizer_params={name}", *overrides])
    hidden = [(n, torch.nn.Parameter(torch.empty(s, device="meta"))) for n, s in HIDDEN.items()]
    others = [(n, torch.nn.Parameter(torch.empty(s, device="meta"))) for n, s in OTHERS.items()]
    optimizer = build_sharded_optimizer(optimizer_spec(cfg.optimizer_params), named_hidden=hidden, named_others=others,
                                        rank=0, world_size=1, device_type="meta")
    for _ in range(steps):  # the first step creates the state, the later ones read it
        for _, p in hidden + others:
            p.grad = torch.empty_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return optimizer


def test_meta_tensors_refuse_every_host_read() -> None:
    """The premise: each way of reading a device value fails on meta, so a passing step has none."""
    t = torch.empty(4, device="meta")
    reads = [lambda: t.sum().item(), lambda: bool(t.sum() > 0), lambda: float(t.max()), lambda: t.tolist(),
             lambda: t.cpu(), lambda: t.nonzero(), lambda: t[t > 0]]
    for read in reads:
        with pytest.raises((RuntimeError, NotImplementedError)):
            read()


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_step_reads_nothing_back(name: str) -> None:
    optimizer = meta_step(name, "optimizer_params.kernels=reference")
    assert optimizer.state_report()["total"] > 0  # the state exists: the step really ran


@pytest.mark.parametrize("name", ["muon", "muonq"])
def test_batched_newton_schulz_reads_nothing_back(name: str) -> None:
    meta_step(name, "optimizer_params.kernels=reference", "optimizer_params.args.ns_batch_size=4")


class LaunchRecorder:
    """Stands in for the Triton kernel: ``kernel[grid](*args, **constants)`` records the call."""

    def __init__(self) -> None:
        self.grids: list[tuple[int, ...]] = []

    def __getitem__(self, grid: tuple[int, ...]):
        def launch(*args, **kwargs) -> None:
            assert all(isinstance(g, int) and g > 0 for g in grid), grid
            assert all(a.device.type == "meta" for a in args if isinstance(a, torch.Tensor))
            self.grids.append(grid)
        return launch


@pytest.mark.parametrize("name", QUANTIZED)
def test_fused_path_host_code_reads_nothing_back(name: str, monkeypatch) -> None:
    pytest.importorskip("triton")
    from muonq.optim.kernels import quant_update

    recorder = LaunchRecorder()
    monkeypatch.setattr(quant_update, "_kernel", recorder)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets kernels=triton take non-CUDA tensors
    meta_step(name, "optimizer_params.kernels=triton")
    assert recorder.grids, f"{name}: the fused path launched nothing"
