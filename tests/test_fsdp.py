"""FSDP2 (``parallelism=fsdp``): losses match a single process, per-rank memory halves at 2 ranks,
Muon state lives on the matrix's owner only, checkpoints move between FSDP and DDP, bad input
stops at preflight.

The end-to-end runs start the real entry point under torchrun (gloo, 2 ranks). The in-process
case spawns 2 gloo ranks that each compute the full batch, so FSDP's averaged gradient equals the
single-process gradient exactly and the parameters can be compared to a tight tolerance.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from muonq import metric_names as M
from muonq.config import ModelConfig, preset
from muonq.models import build_model
from muonq.optim.shard_format import shard_file
from muonq.train.model_rows import model_shard_file

from .conftest import TINY, losses, run_tool, run_training

STEPS = 10
# A single process with batch 1 x accumulation 4 sees the same 4 sequences per step as 2 ranks x 1 x
# accumulation 2 (so FSDP's skipped gradient sync on the first micro-step is exercised too).
COMMON = (*TINY, f"recipe.training_params.max_steps={STEPS}", "recipe.training_params.batch_size=1",
          "recipe.training_params.tokens_processed=256", "logging_params.val_tokens_processed=512")
# AdamW alone, fp32 momentum, blockwise 8-bit momentum, the decomposed 4-bit store, grid scales, and
# equilibration before Newton-Schulz: every kind of Muon state and transform on its owner
OPTIMIZERS = ("adamw", "muon", "muon8bit", "muonq", "grasp", "muoneq")
# Measured (torch 2.13 CPU, gloo): the largest relative loss difference over the 10 steps was 1.1e-7
# (adamw), 1.1e-7 (muon), 2.2e-7 (muonq), 1.1e-7 (muoneq) with fp32 Newton-Schulz (2026-12-01), and
# 1.1e-7 (adamw), 1.1e-6 (muon), 1.1e-6 (muon8bit), 1.4e-6 (muonq), 4.0e-6 (grasp), 9.7e-7 (muoneq)
# with bf16 Newton-Schulz (auto on an AMD EPYC with avx512_bf16, 2026-12-06); the bound leaves room
# for other machines' reduction order (DDP vs one process differs by ~1e-5).
REL_TOL = 1e-4


SAVE_AT = 5  # the curves' runs save checkpoints at steps 5 and 10
FILES_OF_TWO = [model_shard_file(0), model_shard_file(1), shard_file(0), shard_file(1)]  # 2 ranks' files


def _run(tmp: Path, data: Path, name: str, nproc: int, *extra: str, tag: str = "",
         env: dict[str, str] | None = None) -> list[dict]:
    run = f"{name}_{nproc}{tag}"
    proc, rows = run_training(tmp / run, data, *COMMON, f"optimizer_params={name}", f"run_name={run}",
                              f"logging_params.checkpoint_dir={tmp / 'ckpt' / run}", *extra, nproc=nproc, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return rows


@pytest.fixture(scope="module")
def fsdp_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fsdp")


@pytest.fixture(scope="module")
def curves(fsdp_tmp, shakespeare_data) -> dict[tuple[str, str], list[dict]]:
    jobs = [(name, "single", 1, ()) for name in OPTIMIZERS] + [(name, "fsdp", 2, ("parallelism=fsdp",)) for name in OPTIMIZERS]
    save = ("logging_params.save_checkpoint=true", f"logging_params.save_ckpt_step={SAVE_AT}")

    def one(job):
        name, kind, nproc, extra = job
        return (name, kind), _run(fsdp_tmp, shakespeare_data, name, nproc, *extra, *save)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(one, jobs))


def _first(rows: list[dict], key: str) -> float:
    return next(r[key] for r in rows if key in r)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_fsdp_matches_single_process(curves, name):
    single, fsdp = losses(curves[name, "single"]), losses(curves[name, "fsdp"])
    assert sorted(fsdp) == sorted(single) == list(range(1, STEPS + 1))
    worst = max(abs(fsdp[s] - single[s]) / abs(single[s]) for s in single)
    print(f"{name}: largest relative loss difference {worst:.2e}")
    assert worst < REL_TOL, (name, worst, single, fsdp)
    assert fsdp[STEPS] < fsdp[1]  # it trains


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_fsdp_halves_per_rank_bytes(curves, name):
    single, fsdp = curves[name, "single"], curves[name, "fsdp"]
    for key in (M.PARAM_BYTES_RANK_MAX, M.GRAD_BYTES_RANK_MAX):
        ratio = _first(fsdp, key) / _first(single, key)
        print(f"{name}: {key} {_first(fsdp, key):.0f} vs {_first(single, key):.0f} ({ratio:.3f})")
        assert 0.49 < ratio < 0.51, (key, ratio)  # Shard(0) rows: the odd row count rounds up
    ratio = _first(fsdp, M.STATE_BYTES_RANK_MAX) / _first(single, M.STATE_BYTES_RANK_MAX)
    print(f"{name}: {M.STATE_BYTES_RANK_MAX} {_first(fsdp, M.STATE_BYTES_RANK_MAX):.0f} vs "
          f"{_first(single, M.STATE_BYTES_RANK_MAX):.0f} ({ratio:.3f})")
    assert 0.45 < ratio < 0.56, ratio
    assert _first(fsdp, M.STATE_BYTES_TOTAL) == pytest.approx(_first(single, M.STATE_BYTES_TOTAL), rel=0.01)


def test_four_ranks_resume_two_and_follow_one_process_with_a_quarter_of_the_bytes(curves, fsdp_tmp, shakespeare_data):
    """muonq at 4 FSDP ranks (no accumulation), resumed from the 2-rank FSDP run's step-5
    checkpoint (its Muon state re-assigned to four owners, the AdamW state and the model's rows
    re-sharded): the single-process losses to 1e-4, and the largest rank's parameters + gradients
    + optimizer state within 10% of a quarter of one process's. Its step-7 checkpoint (four
    ranks' files) resumes at 2 ranks and follows one process too."""
    rows = _resumed_rows(fsdp_tmp, shakespeare_data, "muonq", 4, "muonq_2", "parallelism=fsdp",
                         "logging_params.save_checkpoint=true", "logging_params.save_ckpt_step=7")
    single, four = losses(curves["muonq", "single"]), losses(rows)
    assert sorted(four) == list(range(SAVE_AT + 1, STEPS + 1))
    assert all(math.isclose(four[s], single[s], rel_tol=REL_TOL) for s in four), (four, single)
    step = fsdp_tmp / "ckpt" / "muonq_4_from_muonq_2" / "step_000007"
    assert sorted(p.name for p in step.glob("model_rank*.pt")) == [model_shard_file(r) for r in range(4)]
    two = _resumed(fsdp_tmp, shakespeare_data, "muonq", 2, "muonq_4_from_muonq_2", "parallelism=fsdp", at=7)
    assert sorted(two) == list(range(8, STEPS + 1))
    assert all(math.isclose(two[s], single[s], rel_tol=REL_TOL) for s in two), (two, single)
    keys = (M.PARAM_BYTES_RANK_MAX, M.GRAD_BYTES_RANK_MAX, M.STATE_BYTES_RANK_MAX)
    ratio = sum(_first(rows, k) for k in keys) / sum(_first(curves["muonq", "single"], k) for k in keys)
    print(f"muonq at 4 ranks: largest rank's bytes {ratio:.3f} of one process's")
    assert 0.25 * 0.9 <= ratio <= 0.25 * 1.1, ratio
    from muonq.config import compose_config
    from muonq.plan import plan

    planned, _ = plan(compose_config([*COMMON, "optimizer_params=muonq", "parallelism=fsdp"]), 4)
    assert (planned.params, planned.grads, planned.state) == tuple(_first(rows, k) for k in keys)


@pytest.mark.parametrize("name", [n for n in OPTIMIZERS if n != "muonq"])  # muonq: the tests above and below
def test_four_ranks_and_hsdp_follow_one_process(curves, fsdp_tmp, shakespeare_data, name):
    """Every other optimizer at 4 FSDP ranks and as 2 replicas x 2 shards: the single-process
    losses to 1e-4; at 4 ranks the largest rank holds a quarter of one process's parameter +
    gradient + state bytes (within 10%), under HSDP exactly what a 2-rank FSDP rank holds."""
    single = curves[name, "single"]
    keys = (M.PARAM_BYTES_RANK_MAX, M.GRAD_BYTES_RANK_MAX, M.STATE_BYTES_RANK_MAX)
    four = _run(fsdp_tmp, shakespeare_data, name, 4, "parallelism=fsdp", tag="_fsdp4")
    hsdp = _run(fsdp_tmp, shakespeare_data, name, 4, "parallelism=fsdp", "parallelism.dp_shard=2", tag="_hsdp")
    for rows in (four, hsdp):
        got, want = losses(rows), losses(single)
        assert sorted(got) == sorted(want)
        worst = max(abs(got[s] - want[s]) / abs(want[s]) for s in want)
        print(f"{name}: largest relative loss difference {worst:.2e}")
        assert worst < REL_TOL, (name, got, want)
    ratio = sum(_first(four, k) for k in keys) / sum(_first(single, k) for k in keys)
    print(f"{name} at 4 ranks: largest rank's bytes {ratio:.3f} of one process's")
    assert 0.25 * 0.9 <= ratio <= 0.25 * 1.1, ratio
    assert [_first(hsdp, k) for k in keys] == [_first(curves[name, "fsdp"], k) for k in keys]


def test_hsdp_two_replicas_of_two_shards(curves, fsdp_tmp, shakespeare_data):
    """parallelism.dp_shard=2 at 4 ranks: two shard groups replicating each other; the losses of
    one process to 1e-4, every rank holds what a 2-rank FSDP rank holds (as planned), and its
    checkpoint resumes under plain FSDP at 2 ranks."""
    rows = _run(fsdp_tmp, shakespeare_data, "muonq", 4, "parallelism=fsdp", "parallelism.dp_shard=2",
                "logging_params.save_checkpoint=true", f"logging_params.save_ckpt_step={SAVE_AT}", tag="_hsdp")
    single, hsdp = losses(curves["muonq", "single"]), losses(rows)
    assert all(math.isclose(hsdp[s], single[s], rel_tol=REL_TOL) for s in single), (hsdp, single)
    keys = (M.PARAM_BYTES_RANK_MAX, M.GRAD_BYTES_RANK_MAX, M.STATE_BYTES_RANK_MAX)
    assert [_first(rows, k) for k in keys] == [_first(curves["muonq", "fsdp"], k) for k in keys]
    from muonq.config import compose_config
    from muonq.plan import plan

    planned, _ = plan(compose_config([*COMMON, "optimizer_params=muonq", "parallelism=fsdp", "parallelism.dp_shard=2"]), 4)
    assert [planned.params, planned.grads, planned.state] == [_first(rows, k) for k in keys]
    step = fsdp_tmp / "ckpt" / "muonq_4_hsdp" / f"step_{SAVE_AT:06d}"
    assert sorted(p.name for p in step.glob("*.pt")) == ["main.pt", *FILES_OF_TWO]  # one replica writes
    resumed = _resumed(fsdp_tmp, shakespeare_data, "muonq", 2, "muonq_4_hsdp", "parallelism=fsdp")
    fsdp = losses(curves["muonq", "fsdp"])
    assert all(math.isclose(resumed[s], fsdp[s], rel_tol=REL_TOL) for s in resumed), (resumed, fsdp)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_planner_predicts_the_logged_bytes(curves, name):
    """``python -m muonq.plan`` on meta tensors gives the bytes the real runs log, exactly."""
    from muonq.config import compose_config
    from muonq.plan import plan

    for kind, world_size, layout in (("fsdp", 2, "fsdp"), ("single", 1, "ddp")):
        planned, _ = plan(compose_config([*COMMON, f"optimizer_params={name}", f"parallelism={layout}"]), world_size)
        rows = curves[name, kind]
        assert (planned.params, planned.grads, planned.state) == (
            _first(rows, M.PARAM_BYTES_RANK_MAX), _first(rows, M.GRAD_BYTES_RANK_MAX), _first(rows, M.STATE_BYTES_RANK_MAX))


def _resumed_rows(tmp: Path, data: Path, name: str, nproc: int, source: str, *extra: str, at: int = SAVE_AT,
                  env: dict[str, str] | None = None) -> list[dict]:
    """The metrics of a run of ``name`` on ``nproc`` processes resumed from run ``source``'s
    checkpoint of step ``at``."""
    tag = f"_from_{source}"
    step = f"step_{at:06d}"
    shutil.copytree(tmp / "ckpt" / source / step, tmp / "ckpt" / f"{name}_{nproc}{tag}" / step)
    return _run(tmp, data, name, nproc, "resume=true", *extra, tag=tag, env=env)


def _resumed(tmp: Path, data: Path, name: str, nproc: int, source: str, *extra: str, at: int = SAVE_AT,
             env: dict[str, str] | None = None) -> dict[int, float]:
    """The losses of :func:`_resumed_rows`."""
    return losses(_resumed_rows(tmp, data, name, nproc, source, *extra, at=at, env=env))


def test_checkpoints_move_between_fsdp_and_ddp(curves, fsdp_tmp, shakespeare_data):
    """An FSDP checkpoint holds each rank's rows of the model (no rank gathers it) and ZeRO-1's
    optimizer shards: FSDP resumes it bit for bit, one DDP process resumes it, FSDP resumes a DDP
    checkpoint (the whole model of its main.pt), and evaluate reads it."""
    fsdp, single = losses(curves["muonq", "fsdp"]), losses(curves["muonq", "single"])
    later = range(SAVE_AT + 1, STEPS + 1)
    step = fsdp_tmp / "ckpt" / "muonq_2" / f"step_{SAVE_AT:06d}"
    assert sorted(p.name for p in step.glob("*.pt")) == ["main.pt", *FILES_OF_TWO]
    main = torch.load(step / "main.pt", weights_only=True)
    assert "model" not in main and main["model_shards"] == 2
    whole = torch.load(fsdp_tmp / "ckpt" / "muonq_1" / f"step_{SAVE_AT:06d}" / "main.pt", weights_only=True)["model"]
    rows = [torch.load(step / model_shard_file(r), weights_only=True)["tensors"] for r in (0, 1)]
    for name, tensor in whole.items():  # each rank wrote its half of every weight
        assert [rows[r][name]["rows"].shape[0] for r in (0, 1)] == [tensor.shape[0] // 2] * 2, name
    shards = [torch.load(step / shard_file(r), weights_only=True) for r in (0, 1)]
    # each rank saved the AdamW state of its rows (plain tensors, no DTensor), Muon's each matrix's owner
    for name, state in shards[1]["optimizers"]["adamw"]["state"].items():
        half = whole[name].shape[0] // 2
        assert [s["row_starts"][name] for s in shards] == [0, half] and shards[0]["owners"][name] == [0, 1]
        assert type(state["exp_avg"]) is torch.Tensor and state["exp_avg"].shape[0] == half, name
    assert set(shards[0]["optimizers"]["muon"]["state"]).isdisjoint(shards[1]["optimizers"]["muon"]["state"])

    jobs = [("muonq", 2, "muonq_2", ("parallelism=fsdp",)), ("adamw", 2, "adamw_2", ("parallelism=fsdp",)),
            ("muonq", 1, "muonq_2", ()), ("muonq", 2, "muonq_1", ("parallelism=fsdp",))]
    with ThreadPoolExecutor(max_workers=2) as pool:
        same, adamw_same, to_ddp, from_ddp = pool.map(lambda job: _resumed(fsdp_tmp, shakespeare_data, *job[:3], *job[3]), jobs)
    assert sorted(same) == list(later)
    assert all(same[s] == fsdp[s] for s in later), (same, fsdp)  # bit-identical on CPU
    adamw_fsdp = losses(curves["adamw", "fsdp"])
    assert all(adamw_same[s] == adamw_fsdp[s] for s in later), (adamw_same, adamw_fsdp)
    assert all(math.isclose(to_ddp[s], single[s], rel_tol=REL_TOL) for s in later), (to_ddp, single)
    assert all(math.isclose(from_ddp[s], fsdp[s], rel_tol=REL_TOL) for s in later), (from_ddp, fsdp)

    evaluated = {}
    for run in ("muonq_2", "muonq_1"):
        out = fsdp_tmp / f"eval_{run}.json"
        proc = run_tool("muonq.evaluate", f"checkpoint={fsdp_tmp / 'ckpt' / run}", f"data_dir={shakespeare_data}",
                        "batch_size=4", "tasks=none", f"out={out}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        evaluated[run] = json.loads(out.read_text())["val_loss"]
    assert math.isclose(evaluated["muonq_2"], evaluated["muonq_1"], rel_tol=REL_TOL), evaluated


def test_adamw8bit_trains_and_resumes_under_fsdp(fsdp_tmp, shakespeare_data):
    """torchao's 8-bit AdamW over FSDP row shards (its step left uncompiled: compiling takes ~45 s
    per shape on a CPU): 2 ranks follow one process, each rank checkpoints its rows' 8-bit state as
    torchao keeps it, and the step-5 checkpoint resumes bit for bit at 2 ranks and follows one
    process on one DDP process."""
    env = {"TORCHDYNAMO_DISABLE": "1"}
    save = ("logging_params.save_checkpoint=true", f"logging_params.save_ckpt_step={SAVE_AT}")
    jobs = [(1, ()), (2, ("parallelism=fsdp", *save))]
    with ThreadPoolExecutor(max_workers=2) as pool:
        single, fsdp = (losses(rows) for rows in pool.map(
            lambda job: _run(fsdp_tmp, shakespeare_data, "adamw8bit", job[0], *job[1], env=env), jobs))
    worst = max(abs(fsdp[s] - single[s]) / single[s] for s in single)
    # 1.55e-5 (Zen 5, 2026-12-06): a last-bit difference in a gradient can flip an 8-bit code
    print(f"adamw8bit: largest relative loss difference {worst:.2e}")
    assert sorted(fsdp) == list(range(1, STEPS + 1)) and worst < REL_TOL and fsdp[STEPS] < fsdp[1]
    step = fsdp_tmp / "ckpt" / "adamw8bit_2" / f"step_{SAVE_AT:06d}"
    import torchao.optim  # noqa: F401  (lets torch.load(weights_only=True) read its state classes)

    state = torch.load(step / shard_file(1), weights_only=True)["optimizers"]["adamw"]["state"]
    assert type(state["model.embed_tokens.weight"]["exp_avg"]).__name__ == "OptimState8bit"
    jobs = [(2, ("parallelism=fsdp",)), (1, ())]
    with ThreadPoolExecutor(max_workers=2) as pool:
        same, to_ddp = pool.map(lambda job: _resumed(fsdp_tmp, shakespeare_data, "adamw8bit", job[0], "adamw8bit_2",
                                                     *job[1], env=env), jobs)
    later = range(SAVE_AT + 1, STEPS + 1)
    assert sorted(same) == sorted(to_ddp) == list(later)
    assert all(same[s] == fsdp[s] for s in later), (same, fsdp)  # bit-identical on CPU
    assert all(math.isclose(to_ddp[s], single[s], rel_tol=REL_TOL) for s in later), (to_ddp, single)


def test_activation_checkpointing_and_per_block_compile_compose_with_fsdp(curves, fsdp_tmp, shakespeare_data):
    """Both applied per transformer block before fully_shard: the run follows the plain FSDP curve
    (compiled kernels may round differently; recomputation alone is bit-exact, see test_models)."""
    rows = _run(fsdp_tmp, shakespeare_data, "muonq", 2, "parallelism=fsdp", "recipe.training_params.activation_checkpointing=true",
                "recipe.training_params.compile=true", tag="_ac_compiled")
    plain, got = losses(curves["muonq", "fsdp"]), losses(rows)
    assert sorted(got) == sorted(plain)
    assert all(math.isclose(got[s], plain[s], rel_tol=REL_TOL) for s in plain), (got, plain)


@pytest.mark.parametrize("extra, world_size, message", [
    ((), 1, "parallelism: fsdp shards over ranks and needs more than one process"),
    (("optimizer_params.zero=false",), 2, "optimizer_params.zero: false (replicated optimizer state) does not apply"),
    (("parallelism.dp_shard=3",), 2, "parallelism.dp_shard: 3 ranks per shard group do not divide the 2 processes"),
])
def test_fsdp_config_rejects(extra, world_size, message):
    """Found by the config validation that preflight runs on every rank before anything is written
    (that path, one line and nothing written, is tested end to end in test_reliability)."""
    from muonq.config import ConfigError, compose_config, validate

    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(compose_config([*COMMON, "parallelism=fsdp", *extra]), world_size=world_size)


# -- in process: owner-only state and parameters against a single process ---------------------------

MODEL = dict(model_type="llama", n_embd=64, n_layer=2, n_head=2, intermediate_size=160, vocab_size=32)


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, 32, (4, 17), generator=torch.Generator().manual_seed(step))
    return tokens[:, :-1], tokens[:, 1:]


def _named(model):
    hidden = model.hidden_matrices()
    ids = {id(p) for _, p in hidden}
    return hidden, [(n, p) for n, p in model.named_parameters() if id(p) not in ids]


def _train(model, opt, steps: range = range(3)) -> None:
    for step in steps:
        opt.set_lr_multiplier(1.0 - 0.2 * step)
        x, y = _batch(step)
        model(x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _owned_run(rank: int, world: int, names: list[str]) -> dict:
    """3 steps of each optimizer in ``names`` over FSDP shards: final parameters and owners."""
    from muonq.optim.owned import OwnedMuonOptimizer

    results = {}
    for case in names:
        name, config = CASES[case]
        torch.manual_seed(0)
        model = _sharded_model(config, rank, world)
        hidden, others = _named(model)
        # one matrix per round for muonq (the overlapped path), one round for the others
        opt = OwnedMuonOptimizer(preset(name, weight_decay=0.1, matmul_dtype="float32"), hidden, others, rank=rank,
                                 world_size=world, round_bytes=1 if case == "muonq" else 2**30,
                                 qkv_blocks=model.qkv_blocks())
        assert opt.optimizers["muon"].matmul_dtype == "float32"  # the spec's choice reaches the owners' Muon
        assert len(opt._rounds) == (len(hidden) if case == "muonq" else 1)
        muon = opt.optimizers["muon"]
        assert {n: muon.row_blocks(proxy) for (n, _), proxy in zip(hidden, opt._proxies) if muon.row_blocks(proxy) > 1} \
            == model.qkv_blocks()
        _train(model, opt)
        hidden_names = [n for n, _ in hidden]
        assert opt.muon_state_names(hidden_names) == [n for n in hidden_names if opt.owners[n] == rank]
        for n, proxy in zip(hidden_names, opt._proxies):  # a non-owner holds an empty proxy
            assert (proxy.numel() > 0) == (opt.owners[n] == rank)
        results[case] = {"params": {n: p.full_tensor().detach() for n, p in model.named_parameters()},
                         "owners": opt.owners}
    return results


# A 257-token vocabulary: the embedding and head split 129 / 128 rows over 2 ranks, so torchao keeps
# their 4-bit AdamW state in blocks of 128 quantized on rank 1 (8192 elements, whole blocks) and in
# fp32 on rank 0 (8256 elements: a partial block); the whole tensors (16448 elements) would be fp32 too.
MODEL_4BIT = {**MODEL, "vocab_size": 257}


def _adamw4_resume(rank: int, world: int, tmp: str) -> dict:
    """muonq with 4-bit AdamW state over FSDP shards: 2 steps, this rank's checkpoint shard, 2 more
    steps; then a new model and optimizer from the saved parameters and shards, the same 2 steps."""
    from muonq.optim.owned import OwnedMuonOptimizer, row_range

    os.environ["TORCHDYNAMO_DISABLE"] = "1"  # torchao compiles its step: ~50 s per shape on a CPU

    def build():
        torch.manual_seed(0)
        model = _sharded_model(MODEL_4BIT, rank, world)
        hidden, others = _named(model)
        return model, OwnedMuonOptimizer(preset("muonq", adamw_bits=4, adamw_block_size=128, matmul_dtype="float32"), hidden, others,
                                         rank=rank, world_size=world)

    model, opt = build()
    _train(model, opt, range(2))
    torch.save(opt.state_dict(), Path(tmp) / shard_file(rank))
    saved = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    _train(model, opt, range(2, 4))
    adamw = opt.optimizers["adamw"].state
    kinds = {n: type(adamw[p]["exp_avg"].to_local()).__name__ for p, n in opt._names.items() if p in adamw}
    straight = {n: p.full_tensor().detach() for n, p in model.named_parameters()}
    dist.barrier()  # every shard is written
    model, opt = build()
    with torch.no_grad():
        for n, p in model.named_parameters():
            start, end = row_range(p)
            p.to_local().copy_(saved[n][start:end])
    opt.load_state_dict([torch.load(Path(tmp) / shard_file(r), weights_only=True) for r in range(world)])
    _train(model, opt, range(2, 4))
    every_kind = [None] * world
    dist.all_gather_object(every_kind, kinds)
    return {"kinds": every_kind, "saved": saved, "straight": straight,
            "resumed": {n: p.full_tensor().detach() for n, p in model.named_parameters()}}


# 33 tokens: the embedding and head split 17 / 16 rows over 2 ranks
MODEL_ODD = {**MODEL, "vocab_size": 33}


def _model_rows(rank: int, world: int, tmp: str) -> dict:
    """Each rank writes its rows of a model whose rows split unevenly; a differently initialised
    sharded model then takes its rows back from both files."""
    from muonq.train.model_rows import load_weights, local_rows

    torch.manual_seed(0)
    model = _sharded_model(MODEL_ODD, rank, world)
    torch.save(local_rows(model, rank=rank, shards=world), Path(tmp) / model_shard_file(rank))
    dist.barrier()
    torch.manual_seed(1)
    fresh = _sharded_model(MODEL_ODD, rank, world)
    load_weights(fresh, [torch.load(Path(tmp) / model_shard_file(r), weights_only=True, mmap=True) for r in reversed(range(world))])
    return {"saved": {n: p.full_tensor().detach() for n, p in model.named_parameters()},
            "loaded": {n: p.full_tensor().detach() for n, p in fresh.named_parameters()}}


def _sharded_model(config: dict, rank: int, world: int) -> torch.nn.Module:
    from muonq.train.distributed import DistInfo
    from muonq.train.parallelize import shard_fsdp

    model = build_model(ModelConfig(**config))
    info = DistInfo(rank=rank, local_rank=rank, world_size=world, device=torch.device("cpu"))
    shard_fsdp(model, info, None)  # CPU: no mixed precision, so no recipe needed
    return model


def _rank(rank: int, world: int, port: int, names: list[str], tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {"owned": _owned_run(rank, world, names), "adamw4": _adamw4_resume(rank, world, tmp),
                   "rows": _model_rows(rank, world, tmp)}
        if rank == 0:
            torch.save(results, Path(tmp) / "fsdp.pt")
    finally:
        dist.destroy_process_group()
    # Now and then a rank aborted after this point, at interpreter exit ("terminate called without an
    # active exception" from a C++ thread, no Python frame left; 2 of 5 fresh-clone CI runs on
    # 2026-12-06, about 1 in 10 runs of this fixture under load). The results are on disk: leave
    # without the exit-time destructors.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# Largest absolute parameter difference after 3 steps: 6.0e-8 (muonq), 6.0e-8 (grasp; 4.9e-7 on an
# Intel Xeon with AMX, 2026-12-03), 1.07e-5 (muon8bit: a last-bit difference in the gradient can flip
# an 8-bit momentum code), measured 2026-12-01 on Zen 3. Both sides run fp32 matmuls: in bf16 (auto,
# on a CPU with native bf16) those last-bit differences flip bf16 roundings inside Newton-Schulz,
# ~1e-4. muonq-gpt (Xeon, 2026-12-03): 2.0e-6 with c_attn split and 2.8e-6 fused, so the gap comes
# from the GPT model's gradients under FSDP, not from the split.
PARAM_TOL = {"muonq": 1e-6, "muon8bit": 1e-4, "grasp": 1e-6, "muonq-gpt": 1e-5}
GPT_MODEL = dict(model_type="gpt", n_embd=64, n_layer=2, n_head=2, vocab_size=32, block_size=16)
# case -> (preset, model); muonq-gpt: GPT's fused c_attn stepped as three matrices on its owner
CASES = {"muonq": ("muonq", MODEL), "muon8bit": ("muon8bit", MODEL), "grasp": ("grasp", MODEL),
         "muonq-gpt": ("muonq", GPT_MODEL)}


@pytest.fixture(scope="module")
def in_process(tmp_path_factory) -> dict:
    """2 spawned gloo ranks, each computing the whole batch (so FSDP's average is the single-process
    gradient): the PARAM_TOL optimizers' runs, then the 4-bit AdamW save and resume."""
    tmp = tmp_path_factory.mktemp("fsdp_in_process")
    mp.spawn(_rank, args=(2, 29000 + os.getpid() % 1000, list(PARAM_TOL), str(tmp)), nprocs=2, join=True)
    return {**torch.load(tmp / "fsdp.pt", weights_only=True), "tmp": tmp}


def test_owner_only_state_and_same_parameters(in_process):
    """Muon state only on each matrix's owner, and the parameters of a single process after 3 steps."""
    from muonq.optim.build import build_optimizer

    got = in_process["owned"]
    worst = {}
    for case in PARAM_TOL:
        name, config = CASES[case]
        assert set(got[case]["owners"].values()) == {0, 1}
        torch.manual_seed(0)
        model = build_model(ModelConfig(**config))
        hidden, others = _named(model)
        named = dict(hidden)
        opt = build_optimizer(preset(name, weight_decay=0.1, matmul_dtype="float32"), hidden=[p for _, p in hidden],
                              others=[p for _, p in others],
                              qkv_blocks={named[n]: k for n, k in model.qkv_blocks().items()})
        _train(model, opt)
        worst[case] = max(float((got[case]["params"][n] - p.detach()).abs().max()) for n, p in model.named_parameters())
    print("largest parameter difference:", worst)
    assert all(worst[n] < PARAM_TOL[n] for n in PARAM_TOL), worst


def test_4bit_adamw_state_saves_and_resumes_under_fsdp(in_process, monkeypatch):
    """Each rank keeps torchao's state of its rows, 4-bit or fp32 by their count (the 1-D gains stay
    fp32), and writes it as it is: a new optimizer at the same world size takes its rows back and
    continues bit for bit; one process puts the rows together (dequantized: the whole tensors are
    fp32 state for torchao) and follows the sharded run."""
    import torchao.optim  # noqa: F401  (lets torch.load(weights_only=True) read its state classes)

    from muonq.optim.zero import build_sharded_optimizer

    got = in_process["adamw4"]
    assert [kinds["lm_head.weight"] for kinds in got["kinds"]] == ["Tensor", "OptimState4bit"]
    assert [kinds["model.embed_tokens.weight"] for kinds in got["kinds"]] == ["Tensor", "OptimState4bit"]
    assert got["kinds"][0]["model.norm.weight"] == "Tensor"
    assert got["resumed"].keys() == got["straight"].keys()
    assert all(torch.equal(got["resumed"][n], got["straight"][n]) for n in got["straight"])
    shards = [torch.load(in_process["tmp"] / shard_file(r), weights_only=True) for r in (0, 1)]
    assert [s["row_starts"]["lm_head.weight"] for s in shards] == [0, 129]
    assert shards[0]["owners"]["lm_head.weight"] == [0, 1]

    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")  # torchao compiles its step: ~50 s per shape on a CPU
    torch.manual_seed(0)
    model = build_model(ModelConfig(**MODEL_4BIT))
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(got["saved"][n])
    hidden, others = _named(model)
    opt = build_sharded_optimizer(preset("muonq", adamw_bits=4, adamw_block_size=128, matmul_dtype="float32"), named_hidden=hidden,
                                  named_others=others, rank=0, world_size=1)
    opt.load_state_dict([shards[r] for r in opt.shards_to_read(shards[0]["owners"])])
    for key in ("exp_avg", "exp_avg_sq"):  # rank 0's fp32 rows as saved, rank 1's dequantized
        pieces = [shard["optimizers"]["adamw"]["state"]["lm_head.weight"][key] for shard in shards]
        assert [type(piece).__name__ for piece in pieces] == ["Tensor", "OptimState4bit"]
        whole = opt.optimizers["adamw"].state[model.lm_head.weight][key]
        assert type(whole) is torch.Tensor and torch.equal(whole, torch.cat([pieces[0], pieces[1].dequantize()]))
    _train(model, opt, range(2, 4))
    # measured 1.8e-4 (Zen 5, 2026-12-06): the sharded run keeps rank 1's rows in 4 bits, one
    # process keeps the whole head's state in fp32 (torchao's choice for 16448 elements)
    worst = max(float((p.detach() - got["straight"][n]).abs().max()) for n, p in model.named_parameters())
    assert worst < 1e-3
    with pytest.raises(ValueError, match=r"the checkpoint lacks rows \d+-\d+ of the exp_avg of "):
        fresh = build_sharded_optimizer(preset("muonq", adamw_bits=4, adamw_block_size=128, matmul_dtype="float32"), named_hidden=hidden,
                                        named_others=others, rank=0, world_size=1)
        fresh.load_state_dict([shards[0], {**shards[1], "optimizers": {k: {**v, "state": {}} for k, v in
                                                                         shards[1]["optimizers"].items()}}])


def test_model_rows_written_by_their_ranks_load_anywhere(in_process, tmp_path):
    """Rows that split unevenly (17 / 16) go back into a sharded model exactly; one process puts
    the whole model together from the same files; a missing file or another shape is refused."""
    from muonq.train.model_rows import load_weights

    got = in_process["rows"]
    assert all(torch.equal(got["loaded"][n], got["saved"][n]) for n in got["saved"])
    files = [torch.load(in_process["tmp"] / model_shard_file(r), weights_only=True) for r in (0, 1)]
    assert [f["tensors"]["lm_head.weight"]["rows"].shape[0] for f in files] == [17, 16]
    whole = build_model(ModelConfig(**MODEL_ODD))
    load_weights(whole, files)
    assert all(torch.equal(p.detach(), got["saved"][n]) for n, p in whole.named_parameters())
    with pytest.raises(ValueError, match="lacks rows of model.embed_tokens.weight"):
        load_weights(build_model(ModelConfig(**MODEL_ODD)), files[:1])
    with pytest.raises(ValueError, match=re.escape("model.embed_tokens.weight is (33, 64) in the checkpoint, (32, 64)")):
        load_weights(build_model(ModelConfig(**MODEL)), files)
