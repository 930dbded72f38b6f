"""Training the runs of a comparison: plan them (each config composed and validated before any
training), launch each as a subprocess of run_hydra.py, and reuse a run that finished earlier with
the same arguments and the same composed config."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from muonq.cli import UsageError
from muonq.commands import entry_command
from muonq.compare.runs import RunResult, load_run
from muonq.compare.table import fmt
from muonq.errors import UserError


@dataclass(frozen=True)
class Planned:
    """One run of a comparison: its optimizer, folder, Hydra overrides and composed config."""

    optimizer: str
    run_dir: Path
    overrides: list[str]
    config: dict


def _given(overrides: list[str], key: str) -> bool:
    return any(o.lstrip("+~").split("=", 1)[0] == key for o in overrides)


def plan_runs(recipe: str, optimizers: list[str], steps: int | None, extra: list[str], runs_root: Path,
              *, world_size: int = 1) -> list[Planned]:
    """Each run of the comparison; the config of each is composed and validated."""
    from muonq.config import ConfigError, compose_config, validate
    from muonq.data import check_dataset, dataset_dir, resolve_data_dir
    from muonq.train.schedule import budget_steps, total_steps

    base = compose_config([f"recipe={recipe}", *extra])
    tp = base.recipe.training_params
    budget = budget_steps(tp.tokens_processed, base.recipe.dataset.total_tokens_B)
    if steps is None:
        steps = total_steps(base)
    if steps < 1:
        raise UsageError(f"steps must be >= 1, got {steps}")
    common = [f"recipe={recipe}", f"recipe.training_params.max_steps={steps}"]
    if budget < steps:  # raise the token budget so max_steps decides (half a step of slack for rounding)
        common.append(f"recipe.dataset.total_tokens_B={(steps + 0.5) * tp.tokens_processed / 1e9!r}")
    if not _given(extra, "logging_params.val_step"):
        common.append(f"logging_params.val_step={max(1, steps // 10)}")
    if not _given(extra, "logging_params.log_step"):
        common.append(f"logging_params.log_step={max(1, min(10, steps // 20))}")
    user_name = next((o.split("=", 1)[1] for o in extra if o.split("=", 1)[0] == "run_name"), None)
    extra = [o for o in extra if o.split("=", 1)[0] != "run_name"]

    data = dataset_dir(resolve_data_dir(base.data_dir), base.recipe.dataset.name, base.recipe.dataset.tokenizer)
    if not data.is_dir() and base.recipe.dataset.name == "tiny_shakespeare":
        from muonq.data.prepare import prepare

        print(f"preparing the embedded corpus in {data} (once)")
        prepare("tiny_shakespeare", base.recipe.dataset.tokenizer, data_dir=data.parent, progress=False)
    check_dataset(data, seq_len=tp.context_length, model_vocab_size=base.recipe.model.vocab_size)

    planned = []
    for opt in optimizers:
        name = f"{user_name}_{opt}" if user_name else f"{recipe}_{opt}"
        overrides = [*common, f"optimizer_params={opt}", *extra, f"run_name={name}"]
        cfg = compose_config(overrides)
        try:
            validate(cfg, world_size=world_size)
        except ConfigError as err:
            raise UserError(f"{opt}: {err}") from err
        planned.append(Planned(opt, runs_root / opt, overrides, OmegaConf.to_container(cfg, resolve=True)))
    return planned


def finished_same(run_dir: Path, run: Planned, threads: int | None, nproc: int) -> bool:
    """Whether ``run_dir`` holds a finished run of ``run``: the same overrides and launch, and the
    same composed config (an edited preset or recipe YAML retrains)."""
    marker = run_dir / "compare_args.json"
    if not (run_dir / "summary.json").is_file() or not marker.is_file():
        return False
    recorded = json.loads(marker.read_text())
    same = recorded.get("overrides") == run.overrides and recorded.get("config") == run.config
    return same and recorded.get("threads") == threads and recorded.get("nproc", 1) == nproc


def run_one(run: Planned, *, verbose: bool, threads: int | None = None, nproc: int = 1) -> float:
    """Train one run in a subprocess; returns its wall time. Raises RuntimeError on failure."""
    import shutil

    opt, run_dir, overrides = run.optimizer, run.run_dir, run.overrides

    if run_dir.exists():
        shutil.rmtree(run_dir)  # an unfinished or different earlier run: metrics.jsonl would append
    run_dir.mkdir(parents=True)
    cmd = entry_command(nproc, f"hydra.run.dir={run_dir.absolute()}", *overrides)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    start = time.perf_counter()
    with open(run_dir / "console.log", "w") as console:
        console.write(shlex.join(cmd) + "\n")
        console.flush()
        if verbose:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stdout.write(line)
                console.write(line)
            code = proc.wait()
        else:
            code = subprocess.run(cmd, stdout=console, stderr=subprocess.STDOUT, env=env).returncode
    elapsed = time.perf_counter() - start
    if code != 0:
        tail = (run_dir / "console.log").read_text().strip().splitlines()[-3:]
        raise RuntimeError(f"exit {code}: " + " / ".join(line.strip() for line in tail))
    marker = {"optimizer": opt, "overrides": overrides, "threads": threads, "nproc": nproc, "wall_s": round(elapsed, 1),
              "config": run.config}
    (run_dir / "compare_args.json").write_text(json.dumps(marker, indent=1))
    return elapsed


def run_all(planned: list[Planned], *, rerun: bool, verbose: bool, threads: int | None,
            nproc: int) -> tuple[list[RunResult], dict[str, str]]:
    """Train (or reuse) each planned run in order; returns the finished runs and, per failed one, why."""
    results, failed = [], {}
    for i, run in enumerate(planned, 1):
        opt, run_dir = run.optimizer, run.run_dir
        if not rerun and finished_same(run_dir, run, threads, nproc):
            print(f"[{i}/{len(planned)}] {opt}: finished earlier in {run_dir}, reused (rerun=true to train again)")
        else:
            print(f"[{i}/{len(planned)}] {opt}: training in {run_dir} ...", flush=True)
            try:
                run_one(run, verbose=verbose, threads=threads, nproc=nproc)
            except RuntimeError as err:
                failed[opt] = str(err)
                print(f"[{i}/{len(planned)}] {opt}: FAILED ({err}); log: {run_dir / 'console.log'}", file=sys.stderr)
                continue
        result = load_run(run_dir)
        results.append(result)
        print(f"[{i}/{len(planned)}] {opt}: final val loss {fmt(result.final_val_loss, '.4f')}, "
              f"{fmt(result.tokens_per_s, ',.0f')} tok/s, {fmt(result.wall_s, '.1f')} s", flush=True)
    return results, failed
