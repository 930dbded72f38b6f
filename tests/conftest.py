"""Shared test setup: offline everything, a repo-root cwd for Hydra, CPU-friendly threads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def repo_root() -> Path:
    return REPO


TINY = (  # a 2-layer, 64-wide LLaMA over 64-token windows: ~0.1 s per step on 2 cores
    "recipe.model.n_embd=64", "recipe.model.n_layer=2", "recipe.model.n_head=2", "recipe.model.intermediate_size=160",
    "recipe.training_params.context_length=64", "recipe.training_params.batch_size=4",
    "recipe.training_params.tokens_processed=512", "logging_params.val_tokens_processed=2048",
    "logging_params.final_full_val=false", "logging_params.log_step=1", "logging_params.val_step=0",
)


@pytest.fixture(scope="session")
def shakespeare_data(tmp_path_factory) -> Path:
    """The embedded corpus, prepared once per session with the default bpe-8192 tokenizer."""
    from muonq.data.prepare import prepare

    data_dir = tmp_path_factory.mktemp("data")
    prepare("tiny_shakespeare", "bpe-8192", data_dir=data_dir, progress=False)
    return data_dir


def run_training(out_dir: Path, data_dir: Path, *overrides: str, nproc: int = 1, timeout: int = 600,
                 env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """Run the real entry point (python, or torchrun with gloo) and read back its metrics.jsonl.

    One OpenMP thread by default, as torchrun gives its workers: the tests' models are small, and
    threads that spin-wait on shared cores make a step many times slower."""
    import json

    from muonq.commands import entry_command

    cmd = entry_command(nproc, f"hydra.run.dir={out_dir}", f"data_dir={data_dir}", *overrides)
    proc = subprocess.run(cmd, cwd=out_dir.parent, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    metrics_file = out_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()] if metrics_file.exists() else []
    return proc, rows


def run_tool(module: str, *args: object, timeout: int = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a tool's real command line, ``python -m <module> key=value ...``, from the repo root
    (one OpenMP thread by default, as :func:`run_training`)."""
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def losses(rows: list[dict]) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


# The training-quality runs shared by test_variants (each variant against its full-precision
# reference) and test_train (Muon and AdamW learn beyond a unigram model): llama-tiny with 4 x 128
# tokens per step (a quarter of the recipe's batch), 150 steps, lr 0.006, seed 0, two runs at a time
# with one torch thread each: 40-90 s per run, 3.9 min for the ten on two idle cores of an AMD EPYC
# without AVX512 (measured 2026-12-03; ~5 min for nine on 2026-12-02; the recipe's full batch took
# ~14 min there).
SLOW_STEPS = 150
SLOW_RUN = ("recipe=llama-tiny", f"recipe.training_params.max_steps={SLOW_STEPS}", "recipe.training_params.batch_size=4",
            "recipe.training_params.tokens_processed=512", "optimizer_params.args.lr=0.006",
            "logging_params.val_step=0", "logging_params.final_full_val=false",
            "logging_params.val_tokens_processed=32768", "logging_params.log_step=50")


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory, shakespeare_data) -> dict[str, dict]:
    """Every optimizer trained once with SLOW_RUN: name -> {"loss": final val loss, "out": run dir}."""
    from concurrent.futures import ThreadPoolExecutor

    from muonq.config import OPTIMIZERS

    def train(name: str) -> tuple[str, dict]:
        out = tmp_path_factory.mktemp(name) / "out"
        proc, rows = run_training(out, shakespeare_data, *SLOW_RUN, f"optimizer_params={name}", timeout=1800)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return name, {"loss": [r["val/final_loss"] for r in rows if "val/final_loss" in r][0], "out": out}

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(train, OPTIMIZERS))
