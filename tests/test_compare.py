"""muonq.compare: runs optimizers one after another, writes a table and plots that match the logs."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys

import pytest

from muonq.compare.runs import load_run, read_metrics
from muonq.metric_names import STATE_BYTES_TOTAL, STATE_RATIO_VS_FP32, format_bytes, format_ratio

from .conftest import TINY

# TINY without its cadences: compare picks val_step = steps / 10 and log_step itself.
OVERRIDES = [o for o in TINY if not o.startswith(("logging_params.val_step", "logging_params.log_step"))]
OPTIMIZERS = ["adamw", "muon"]
STEPS = 10


def parse_table(markdown: str) -> dict[str, dict[str, str]]:
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells))
    return rows


@pytest.fixture(scope="module")
def report(tmp_path_factory, shakespeare_data):
    root = tmp_path_factory.mktemp("compare")
    out = root / "report"
    cmd = [sys.executable, "-m", "muonq.compare", "recipe=llama-tiny", f"optimizers=[{','.join(OPTIMIZERS)}]",
           f"steps={STEPS}", f"out={out}", "threads=1", f"data_dir={shakespeare_data}", *OVERRIDES]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "WANDB_MODE": "disabled"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return {"out": out, "cmd": cmd, "root": root, "stdout": proc.stdout}


def test_report_files_and_valid_images(report) -> None:
    from PIL import Image

    out = report["out"]
    assert (out / "report.md").is_file() and (out / "report.json").is_file()
    text = (out / "report.md").read_text()
    for name in ("val_loss.png", "train_loss.png", "state_memory.png", "tokens_per_s.png"):
        path = out / name
        assert path.is_file(), name
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] > 200 and image.size[1] > 100
        assert f"]({name})" in text  # embedded in the report
    assert "python -m muonq.compare" in text and f"steps={STEPS}" in text
    for opt in OPTIMIZERS:
        assert (out / "runs" / opt / "metrics.jsonl").is_file()
        config = (out / "runs" / opt / ".hydra" / "config.yaml").read_text()
        assert f"run_name: llama-tiny_{opt}" in config


def test_table_numbers_match_run_logs(report) -> None:
    out = report["out"]
    table = parse_table((out / "report.md").read_text())
    assert list(table) == OPTIMIZERS
    for opt in OPTIMIZERS:
        rows = read_metrics(out / "runs" / opt / "metrics.jsonl")
        summary = json.loads((out / "runs" / opt / "summary.json").read_text())
        cells = table[opt]
        final_val = [r["val/final_loss"] for r in rows if "val/final_loss" in r][-1]
        assert final_val == summary["final_val_loss"]
        assert cells["final val loss"] == f"{final_val:.4f}"
        assert cells["val ppl"] == f"{math.exp(final_val):.2f}"
        last_train = [r["train/loss"] for r in rows if "train/loss" in r][-1]
        assert cells["final train loss"] == f"{last_train:.4f}"
        speeds = [r["perf/tokens_per_s"] for r in rows if "perf/tokens_per_s" in r]
        assert cells["tokens/s"] == f"{statistics.median(speeds[1:] if len(speeds) >= 3 else speeds):,.0f}"
        assert cells["wall time"] == f"{summary['wall_s']:.1f} s"
        state = [r for r in rows if STATE_BYTES_TOTAL in r][-1]
        assert json.loads((out / "report.json").read_text())["runs"][OPTIMIZERS.index(opt)]["state_bytes"] == state[STATE_BYTES_TOTAL]
        assert cells["optimizer state"] == format_bytes(state[STATE_BYTES_TOTAL])
        assert cells["vs fp32 Muon + AdamW"] == format_ratio(state[STATE_RATIO_VS_FP32])
        # the same steps, tokens and validation points for every optimizer
        assert summary["steps"] == STEPS
        vals = [r["step"] for r in rows if "val/loss" in r]
        assert vals == list(range(1, STEPS + 1))  # val_step = max(1, steps // 10), plus the final one
    assert table["muon"]["vs fp32 Muon"] == "1.00x smaller"
    assert table["muon"]["Δ val vs muon"] == "+0.00%"
    assert table["adamw"]["Muon-matrix state"] == "—"
    # the whole optimizer against fp32 Muon + fp32 AdamW: fp32 Muon is the reference itself; AdamW
    # keeps 8 bytes instead of Muon's 4 on every hidden-matrix element
    assert table["muon"]["vs fp32 Muon + AdamW"] == "1.00x smaller"
    assert table["adamw"]["vs fp32 Muon + AdamW"].endswith("x larger")


def test_from_runs_reproduces_the_table(report, tmp_path) -> None:
    out = report["out"]
    again = tmp_path / "again"
    proc = subprocess.run([sys.executable, "-m", "muonq.compare", "--from-runs",
                           *(str(out / "runs" / opt) for opt in OPTIMIZERS), f"out={again}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    first = parse_table((out / "report.md").read_text())
    second = parse_table((again / "report.md").read_text())
    assert first == second
    assert (again / "val_loss.png").is_file()


def test_rerun_reuses_finished_runs(report) -> None:
    proc = subprocess.run(report["cmd"], cwd=report["root"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "WANDB_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("reused") == len(OPTIMIZERS)


def test_a_finished_run_is_reused_only_with_the_same_composed_config(tmp_path) -> None:
    """An edited preset YAML changes the composed config but not the overrides: that run retrains."""
    from muonq.compare.orchestrate import Planned, finished_same

    run_dir = tmp_path / "muonq"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text("{}")
    run = Planned("muonq", run_dir, ["optimizer_params=muonq"], {"optimizer_params": {"args": {"rank": 16}}})
    marker = {"optimizer": "muonq", "overrides": run.overrides, "threads": 1, "nproc": 1, "config": run.config}
    (run_dir / "compare_args.json").write_text(json.dumps(marker))
    assert finished_same(run_dir, run, 1, 1)
    edited = Planned("muonq", run_dir, run.overrides, {"optimizer_params": {"args": {"rank": 20}}})
    assert not finished_same(run_dir, edited, 1, 1)
    assert not finished_same(run_dir, run, 2, 1)
    del marker["config"]  # written before the config was recorded
    (run_dir / "compare_args.json").write_text(json.dumps(marker))
    assert not finished_same(run_dir, run, 1, 1)


def test_load_run_reads_a_cluster_run_layout(report) -> None:
    """A run folder is read from its own files: the label comes from the run name in .hydra."""
    result = load_run(report["out"] / "runs" / "muon")
    assert result.label == "llama-tiny_muon" and result.optimizer == "muon" and result.recipe == "llama-tiny"
    assert result.val_curve and result.val_curve[-1][1] == result.final_val_loss


def test_bad_optimizer_fails_before_training(tmp_path, shakespeare_data) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "muonq.compare", "optimizers=[adamw,nosuch]", "steps=2", f"out={tmp_path / 'r'}",
         f"data_dir={shakespeare_data}"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "nosuch" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "r" / "runs").exists()
