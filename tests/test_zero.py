"""ZeRO-1 (muonq.optim.zero): sharded equals unsharded for every optimizer, state splits evenly,
sharded checkpoints resume at the same and at another world size, and a failing rank ends the job.

The per-optimizer sweep runs in-process ranks (torch.multiprocessing spawn + gloo, one thread
each, so results compare bit for bit); every rank computes the full global batch, which gives the
gradients DDP's average would. The end-to-end cases run the real entry point under torchrun.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from muonq.config import OPTIMIZERS, ModelConfig, compose_config, preset
from muonq.models import build_model
from muonq.optim.build import build_optimizer
from muonq.optim.shard_format import shard_file
from muonq.optim.zero import ShardedOptimizer, assign_owners, build_sharded_optimizer
from muonq.plan import plan

from muonq.train.hooks import PLUGINS_ENV

from .conftest import TINY, losses, run_training
from .probes import RELEASE_PLUGIN

# 4 layers x 7 matrices and a 32-token vocabulary: enough similar-sized parameters to balance 4 ranks
MODEL = dict(model_type="llama", n_embd=64, n_layer=4, n_head=2, intermediate_size=160, vocab_size=32)
STEPS, SAVE_AT, BATCH, SEQ = 4, 2, 8, 16
SWEEP = ((1, None), (2, 1), (4, 2))  # (world size, world size of the checkpoint it resumes from)


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, MODEL["vocab_size"], (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(step))
    return tokens[:, :-1], tokens[:, 1:]


def _model() -> tuple[torch.nn.Module, list, list]:
    torch.manual_seed(0)
    model = build_model(ModelConfig(**MODEL))
    hidden = model.hidden_matrices()
    ids = {id(p) for _, p in hidden}
    return model, hidden, [(n, p) for n, p in model.named_parameters() if id(p) not in ids]


def _train(model, opt, steps) -> None:
    for step in steps:
        opt.set_lr_multiplier(0.5 + 0.2 * step)
        x, y = _batch(step)
        model(x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _run_world(rank: int, world: int, tmp: Path, resume_from: int | None) -> None:
    for name in OPTIMIZERS:
        out = tmp / name
        cfg = dataclasses.replace(preset(name), zero=True)
        if world == 1:  # the reference: the plain, unsharded OptimizerSet
            model, hidden, others = _model()
            opt = build_optimizer(cfg, hidden=[p for _, p in hidden], others=[p for _, p in others])
            _train(model, opt, range(1, STEPS + 1))
            torch.save(model.state_dict(), out / "reference.pt")
        model, hidden, others = _model()
        opt = build_sharded_optimizer(cfg, named_hidden=hidden, named_others=others, rank=rank, world_size=world)
        _train(model, opt, range(1, SAVE_AT + 1))
        ckpt = out / f"ckpt_w{world}"
        torch.save(opt.state_dict(), ckpt / shard_file(rank))
        if rank == 0:
            torch.save({"model": model.state_dict(), "owners": opt.owners}, ckpt / "main.pt")
        _train(model, opt, range(SAVE_AT + 1, STEPS + 1))
        report = opt.state_report()
        if rank == 0:
            torch.save({"params": model.state_dict(), "report": report}, out / f"w{world}.pt")
        if resume_from is not None:  # continue the step-2 checkpoint of another world size
            model, hidden, others = _model()
            opt = build_sharded_optimizer(cfg, named_hidden=hidden, named_others=others, rank=rank, world_size=world)
            src = out / f"ckpt_w{resume_from}"
            main = torch.load(src / "main.pt", weights_only=True)
            model.load_state_dict(main["model"])
            opt.load_state_dict([torch.load(src / shard_file(r), weights_only=True) for r in opt.shards_to_read(main["owners"])])
            _train(model, opt, range(SAVE_AT + 1, STEPS + 1))
            if rank == 0:
                torch.save(model.state_dict(), out / f"w{resume_from}_to_w{world}.pt")


def _sweep_worker(rank: int, world: int, tmp: str, resume_from: int | None, with_world_1: bool) -> None:
    torch.set_num_threads(1)
    if with_world_1 and rank == 0:  # one process fewer: the 1-rank runs come first, on rank 0
        _run_world(0, 1, Path(tmp), None)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous_{world}", rank=rank, world_size=world)
    _run_world(rank, world, Path(tmp), resume_from)
    dist.barrier()  # no rank tears gloo down while a peer still finishes a collective
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """Every optimizer at world sizes 1, 2, 4 (spawned ranks), with checkpoints at step 2 and
    resumes 1 -> 2 and 2 -> 4; results in one folder per optimizer."""
    tmp = tmp_path_factory.mktemp("zero_sweep")
    for name in OPTIMIZERS:
        for world, _ in SWEEP:
            (tmp / name / f"ckpt_w{world}").mkdir(parents=True)
    # adamw8bit wraps its step in torch.compile: tens of seconds per process on a busy CPU. Eager
    # runs the same arithmetic on every rank, which is all this comparison needs.
    saved = os.environ.get("TORCHDYNAMO_DISABLE")
    os.environ["TORCHDYNAMO_DISABLE"] = "1"  # read by the spawned ranks only
    try:
        mp.spawn(_sweep_worker, args=(2, str(tmp), 1, True), nprocs=2, join=True)
        mp.spawn(_sweep_worker, args=(4, str(tmp), 2, False), nprocs=4, join=True)
    finally:
        if saved is None:
            os.environ.pop("TORCHDYNAMO_DISABLE")
        else:
            os.environ["TORCHDYNAMO_DISABLE"] = saved
    return tmp


def _assert_same_params(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), f"{what}: {key} differs by {(got[key] - want[key]).abs().max():.3e}"


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_sharded_equals_unsharded_and_state_splits_evenly(sweep, name) -> None:
    reference = torch.load(sweep / name / "reference.pt", weights_only=True)
    totals = {}
    for world, _ in SWEEP:
        result = torch.load(sweep / name / f"w{world}.pt", weights_only=True)
        _assert_same_params(result["params"], reference, f"{name} on {world} ranks")  # bit-identical on CPU
        per_rank = result["report"]["per_rank"]
        totals[world] = result["report"]["total"]
        assert len(per_rank) == world
        assert max(per_rank) <= 1.10 * totals[world] / world, (name, world, per_rank)
        # the planner (meta tensors, no run) predicts the largest rank's state and the total exactly
        planned, whole = plan(compose_config([*(f"recipe.model.{k}={v}" for k, v in MODEL.items()),
                                              f"optimizer_params={name}"]), world)
        assert (planned.state, whole.state) == (max(per_rank), totals[world]), (name, world, planned, whole, per_rank)
    assert totals[1] == totals[2] == totals[4] > 0


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_checkpoint_resumes_on_another_world_size(sweep, name) -> None:
    reference = torch.load(sweep / name / "reference.pt", weights_only=True)
    for world, resume_from in SWEEP:
        if resume_from is not None:
            got = torch.load(sweep / name / f"w{resume_from}_to_w{world}.pt", weights_only=True)
            _assert_same_params(got, reference, f"{name} {resume_from} -> {world} ranks")


def _overlap_worker(rank: int, world: int, tmp: str) -> None:
    """Two ranks: the overlapped step (Muon in rounds, each round's broadcasts in flight while the
    next computes) against the plain one (every update, then every bucket), same model and data."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    events: list[str] = []
    real_broadcast = dist.broadcast
    params = {}
    for overlap in (False, True):
        model, hidden, others = _model()
        opt = build_sharded_optimizer(dataclasses.replace(preset("muonq"), zero=True), named_hidden=hidden,
                                      named_others=others, rank=rank, world_size=world, overlap=overlap)
        assert opt.overlap is overlap
        muon = opt.inner.optimizers["muon"]
        real_step = muon.step
        muon.step = lambda *a, real_step=real_step, **k: events.append("ns") or real_step(*a, **k)
        dist.broadcast = lambda *a, **k: events.append("send") or real_broadcast(*a, **k)
        events.clear()
        try:
            _train(model, opt, range(1, STEPS + 1))
        finally:
            dist.broadcast = real_broadcast
        params[overlap] = model.state_dict()
        plan = opt.comm_plan()
        assert plan["bytes_sent"] + plan["bytes_received"] == plan["param_bytes"]
        per_step = events[: len(events) // STEPS]
        if overlap:  # AdamW's buckets, then rounds: round j+1's NS runs after round j's matrices went out
            assert per_step.count("ns") == len(opt._rounds) > 1
            after_first = per_step[per_step.index("ns") + 1 :]
            assert "send" in after_first and "ns" in after_first[after_first.index("send") :], per_step
        else:  # every update, then every broadcast
            assert per_step[0] == "ns" and per_step.count("ns") == 1, per_step
    if rank == 0:
        torch.save(params, Path(tmp) / "params.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_overlapped_broadcast_is_bit_identical_and_interleaves_with_the_rounds(tmp_path) -> None:
    mp.spawn(_overlap_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    params = torch.load(tmp_path / "params.pt", weights_only=True)
    _assert_same_params(params[True], params[False], "overlapped vs plain ZeRO-1 step")


def test_owner_assignment_balances_bytes_and_newton_schulz_work() -> None:
    # (state bytes, update work): one work-heavy matrix, three memory-only tensors
    costs = {"ns": (10.0, 100.0), "a": (10.0, 0.0), "b": (10.0, 0.0), "c": (10.0, 1.0)}
    owners = assign_owners(costs, 2)
    assert owners == assign_owners(costs, 2)
    per_rank = [sum(costs[n][0] for n, r in owners.items() if r == rank) for rank in (0, 1)]
    assert per_rank == [20.0, 20.0], owners
    assert assign_owners(costs, 1) == dict.fromkeys(costs, 0)
    p = torch.nn.Parameter(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="given twice"):
        ShardedOptimizer(lambda h, o: None, [("w", p)], [("w2", p)], rank=0, world_size=1)


# -- end to end, through torchrun --------------------------------------------------------------------


def _state_bytes(rows: list[dict]) -> dict:
    return next(r for r in rows if "optim/state_bytes_total" in r)


def test_sharded_checkpoints_resume_at_same_and_other_world_size(tmp_path, shakespeare_data) -> None:
    common = (*TINY, "optimizer_params=muonq", "recipe.training_params.max_steps=6", "logging_params.save_checkpoint=true",
              "logging_params.save_ckpt_step=2", "logging_params.keep_last=5")

    def run(tag: str, nproc: int, *extra: str) -> list[dict]:
        proc, rows = run_training(tmp_path / tag, shakespeare_data, *common, f"logging_params.checkpoint_dir={tmp_path / tag}_ckpt",
                                  f"run_name={tag}", *extra, nproc=nproc)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return rows

    def checkpoint_from(src: str, step: int, dst: str) -> None:
        shutil.copytree(tmp_path / f"{src}_ckpt" / f"step_{step:06d}", tmp_path / f"{dst}_ckpt" / f"step_{step:06d}")

    rows2 = run("two", 2)  # checkpoints at steps 2, 4, 6
    step2 = tmp_path / "two_ckpt" / "step_000002"
    assert sorted(p.name for p in step2.glob("*.pt")) == ["main.pt", shard_file(0), shard_file(1)]
    manifest = json.loads((step2 / "manifest.json").read_text())["optimizer"]
    assert manifest["world_size"] == 2 and set(manifest["owners"].values()) == {0, 1}
    assert "optimizer" not in torch.load(step2 / "main.pt", weights_only=True)
    (log_file,) = (tmp_path / "logs").glob("two_*.log")  # per-run log files carry their start time
    assert "ZeRO-1 over 2 ranks" in log_file.read_text()

    checkpoint_from("two", 2, "down")  # 2 -> 1 ranks from step 2; its own checkpoints have 1 shard
    down = run("down", 1, "resume=true")
    checkpoint_from("down", 4, "up")  # 1 -> 2 ranks from step 4
    up = run("up", 2, "resume=true")
    checkpoint_from("two", 4, "same")  # 2 -> 2 ranks from step 4
    same = run("same", 2, "resume=true")
    assert sorted(p.name for p in (tmp_path / "down_ckpt" / "step_000004").glob("*.pt")) == ["main.pt", shard_file(0)]

    l2 = losses(rows2)
    assert sorted(losses(down)) == [3, 4, 5, 6] and sorted(losses(up)) == sorted(losses(same)) == [5, 6]
    assert all(losses(same)[s] == l2[s] for s in (5, 6)), (losses(same), l2)  # bit-identical on CPU
    assert all(math.isclose(losses(down)[s], l2[s], rel_tol=1e-4) for s in (3, 4, 5, 6)), (losses(down), l2)
    assert all(math.isclose(losses(up)[s], l2[s], rel_tol=1e-4) for s in (5, 6)), (losses(up), l2)

    # the same optimizer state, in two halves on two ranks
    b1, b2 = _state_bytes(down), _state_bytes(rows2)
    assert b1["optim/state_bytes_total"] == b2["optim/state_bytes_total"] == b1["optim/state_bytes_rank"]
    assert b2["optim/state_bytes_rank_max"] <= 0.55 * b1["optim/state_bytes_total"]


def test_gradient_accumulation_under_torchrun_follows_one_process(tmp_path, shakespeare_data) -> None:
    """2 ranks x 2 micro-steps (DDP's no_sync on the first) take the same steps as 1 process x 4."""
    common = (*TINY, "optimizer_params=muon", "recipe.training_params.max_steps=3", "recipe.training_params.batch_size=2")
    curves = {}
    for nproc in (1, 2):
        proc, rows = run_training(tmp_path / f"n{nproc}", shakespeare_data, *common, nproc=nproc,
                                  env={PLUGINS_ENV: RELEASE_PLUGIN})
        assert proc.returncode == 0, proc.stderr[-3000:]
        if nproc > 1:  # each rank frees its model (DDP's reducer, gloo's work) before the process group
            # goes: left to interpreter exit, that teardown aborted a rank now and then after a good run
            assert proc.stderr.count("model released; process group alive") == nproc, proc.stderr[-3000:]
        log_file = max((tmp_path / "logs").glob("llama-tiny_muon_*.log"), key=lambda p: p.stat().st_mtime)  # this run's
        assert f"x {4 // nproc} accum" in proc.stderr + log_file.read_text()
        curves[nproc] = losses(rows)
    assert sorted(curves[2]) == [1, 2, 3]
    assert all(math.isclose(curves[2][s], curves[1][s], rel_tol=1e-4) for s in curves[1]), curves
    assert (tmp_path / "n2" / ".hydra" / "config.yaml").exists()  # written by rank 0 alone, to the shared folder


# Loaded at start-up by every Python process of the job (PYTHONPATH): rank 1 raises in its third
# ZeRO-1 step, while rank 0 goes on into the parameter broadcast and waits for rank 1's bucket.
FAULT_IN_STEP = """
import os
if os.environ.get("RANK") == "1":
    from muonq.optim import zero
    _step, _calls = zero.ShardedOptimizer.step, []
    def step(self):
        _calls.append(1)
        if len(_calls) == 3:
            raise RuntimeError("test fault: rank 1 raised inside its ZeRO-1 step")
        return _step(self)
    zero.ShardedOptimizer.step = step
"""


def test_a_rank_failing_inside_the_sharded_step_ends_the_job(tmp_path, shakespeare_data) -> None:
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FAULT_IN_STEP)
    pythonpath = os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH")) if p)
    start = time.monotonic()
    proc, rows = run_training(tmp_path / "out", shakespeare_data, *TINY, "optimizer_params=muonq",
                              "recipe.training_params.max_steps=200", nproc=2, timeout=300,
                              env={"PYTHONPATH": pythonpath, "MUONQ_DIST_TIMEOUT_S": "60"})
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert "test fault: rank 1 raised inside its ZeRO-1 step" in proc.stderr
    assert sorted(losses(rows)) == [1, 2] and not (tmp_path / "out" / "summary.json").exists()
    assert elapsed < 120, elapsed


# Every optimizer's sharded arithmetic, state split and planned bytes are checked in process above;
# these run the entry point under torchrun for the state layouts no other 2-rank run of the suite
# covers: grid-scaled residuals with 8-bit factors (grasp) and torchao's 8-bit AdamW (adamw8bit).
@pytest.mark.slow
@pytest.mark.parametrize("name", ["grasp", "adamw8bit"])
def test_optimizer_trains_on_two_ranks(tmp_path, shakespeare_data, name) -> None:
    # torchao compiles AdamW8bit's step (~20 s per process here); eager runs the same arithmetic, and
    # the compiled step trains in the single-process runs (tests/conftest.py tiny_runs, test_reliability)
    proc, rows = run_training(tmp_path / "out", shakespeare_data, *TINY, f"optimizer_params={name}",
                              "recipe.training_params.max_steps=3", nproc=2, env={"TORCHDYNAMO_DISABLE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(losses(rows)) == 3 and all(math.isfinite(v) for v in losses(rows).values())
    b = _state_bytes(rows)
    assert b["optim/state_bytes_rank_max"] <= 0.55 * b["optim/state_bytes_total"], b
    # the planner (meta tensors, no run) predicts the logged bytes exactly
    planned, whole = plan(compose_config([*TINY, f"optimizer_params={name}"]), 2)
    assert (planned.params, planned.grads, planned.state, whole.state) == (
        b["memory/param_bytes_rank_max"], b["memory/grad_bytes_rank_max"], b["optim/state_bytes_rank_max"],
        b["optim/state_bytes_total"]), (planned, whole, b)
