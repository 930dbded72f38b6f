"""One run folder (a Hydra run dir holding metrics.jsonl) read into a :class:`RunResult`."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from muonq import metric_names as names
from muonq.errors import MissingInputError


@dataclass
class RunResult:
    label: str
    run_dir: str
    optimizer: str | None = None
    recipe: str | None = None
    steps: int | None = None
    tokens: int | None = None
    final_train_loss: float | None = None
    final_val_loss: float | None = None
    final_val_full: bool | None = None  # the final validation covered the whole split
    tokens_per_s: float | None = None  # median over the logged intervals, the first one excluded
    peak_memory_bytes: int | None = None
    state_bytes: int | None = None  # all optimizer state (Muon matrices + AdamW parameters), summed over ranks
    state_ratio_vs_fp32: float | None = None  # fp32 Muon + fp32 AdamW bytes on this model / state_bytes
    muon_state_bytes: int | None = None  # the Muon matrices' momentum alone, summed over ranks
    muon_ratio_vs_fp32: float | None = None  # fp32 Muon bytes / this run's Muon-matrix bytes
    wall_s: float | None = None
    val_curve: list[tuple[int, float]] = field(default_factory=list)  # (tokens, val loss)
    train_curve: list[tuple[int, float]] = field(default_factory=list)  # (tokens, train loss)

    @property
    def val_ppl(self) -> float | None:
        return math.exp(min(self.final_val_loss, 50.0)) if self.final_val_loss is not None else None


def _read_yaml(path: Path) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else None


def _get(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl rows; a resumed run appends, so a later row for the same step and keys wins."""
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill
                continue
    return rows


def _series(rows: list[dict[str, Any]], key: str) -> dict[int, dict[str, Any]]:
    return {int(r["step"]): r for r in rows if key in r and r[key] is not None}


def load_run(run_dir: str | os.PathLike, label: str | None = None) -> RunResult:
    """The numbers of one run folder (a Hydra run dir holding metrics.jsonl)."""
    run_dir = Path(run_dir)
    metrics_file = run_dir / "metrics.jsonl"
    if not metrics_file.is_file():
        raise MissingInputError(f"{run_dir}: no metrics.jsonl (not a run folder, or the run never started)")
    rows = read_metrics(metrics_file)
    config = _read_yaml(run_dir / ".hydra" / "config.yaml") or {}
    hydra = _read_yaml(run_dir / ".hydra" / "hydra.yaml") or {}
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    optimizer = _get(config, "optimizer_params.name")
    recipe = _get(hydra, "hydra.runtime.choices.recipe")
    name = config.get("run_name") or _get(config, "logging_params.wandb.name")
    result = RunResult(label=label or name or optimizer or run_dir.name, run_dir=str(run_dir), optimizer=optimizer, recipe=recipe)

    train = _series(rows, names.TRAIN_LOSS)
    val = _series(rows, names.VAL_LOSS)
    final = [r for r in rows if r.get(names.VAL_FINAL_LOSS) is not None]
    if train:
        last = train[max(train)]
        result.final_train_loss = float(last[names.TRAIN_LOSS])
        result.train_curve = [(int(r.get(names.TRAIN_TOKENS, s)), float(r[names.TRAIN_LOSS])) for s, r in sorted(train.items())]
    if final:
        result.final_val_loss = float(final[-1][names.VAL_FINAL_LOSS])
        result.final_val_full = _get(config, "logging_params.final_full_val")
    result.val_curve = [(int(r.get(names.TRAIN_TOKENS, s)), float(r[names.VAL_LOSS])) for s, r in sorted(val.items())]
    steps = [int(r["step"]) for r in rows if "step" in r]
    result.steps = summary.get("steps", max(steps) if steps else None)
    tokens = [int(r[names.TRAIN_TOKENS]) for r in rows if names.TRAIN_TOKENS in r]
    result.tokens = max(tokens) if tokens else None

    speeds = [float(r[names.PERF_TOKENS_PER_S]) for _, r in sorted(_series(rows, names.PERF_TOKENS_PER_S).items())]
    if speeds:
        kept = speeds[1:] if len(speeds) >= 3 else speeds  # the first interval holds the warm-up
        result.tokens_per_s = _median(kept)
    memory = [int(r[names.PERF_PEAK_MEMORY_BYTES]) for r in rows if r.get(names.PERF_PEAK_MEMORY_BYTES) is not None]
    result.peak_memory_bytes = max(memory) if memory else None
    state = [r for r in rows if r.get(names.STATE_BYTES_TOTAL) is not None]
    if state:
        row = state[-1]
        result.state_bytes = int(row[names.STATE_BYTES_TOTAL])
        muon_key = names.state_bytes_of("muon")
        if row.get(muon_key) is not None:
            result.muon_state_bytes = int(row[muon_key])
        result.muon_ratio_vs_fp32 = _finite(row.get(names.MUON_RATIO_VS_FP32))
        result.state_ratio_vs_fp32 = _finite(row.get(names.STATE_RATIO_VS_FP32))
    if summary.get("wall_s") is not None:
        result.wall_s = float(summary["wall_s"])
    elif len(rows) >= 2 and "time" in rows[0]:
        result.wall_s = float(rows[-1]["time"] - rows[0]["time"])
    return result


def _finite(value: Any) -> float | None:
    """A logged ratio, or None when absent or not finite (NaN: no state)."""
    return float(value) if value is not None and math.isfinite(float(value)) else None


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


def unique_labels(results: list[RunResult]) -> None:
    """Label runs by optimizer when that names each one, else by run name (made unique)."""
    optimizers = [r.optimizer for r in results]
    if all(optimizers) and len(set(optimizers)) == len(optimizers):
        for r in results:
            r.label = r.optimizer
        return
    seen: dict[str, int] = {}
    for r in results:
        seen[r.label] = seen.get(r.label, 0) + 1
    for r in results:
        if seen[r.label] > 1:
            r.label = f"{r.label} ({Path(r.run_dir).name})"
