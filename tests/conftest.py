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
    """Run the real entry point (python, or torchrun with gloo) and read back its metrics.jsonl."""
    import json

    args = [f"hydra.run.dir={out_dir}", f"data_dir={data_dir}", *overrides]
    if nproc == 1:
        cmd = [sys.executable, str(REPO / "run_hydra.py"), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               str(REPO / "run_hydra.py"), *args]
    proc = subprocess.run(cmd, cwd=out_dir.parent, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    metrics_file = out_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()] if metrics_file.exists() else []
    return proc, rows


def losses(rows: list[dict]) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
