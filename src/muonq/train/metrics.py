"""Rank-0 metrics: console lines, a log file per run under ``logs/``, a JSONL file, and Weights & Biases;
what a training log line averages over; the optimizer-state report."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from muonq import metric_names as M
from muonq.environment import wandb_mode
from muonq.optim.state_bytes import FP32_MUON_BYTES_PER_ELEMENT, state_ratio_vs_fp32
from muonq.run_log import LOG_DIR, new_log_file
from muonq.train import distributed as dist_utils

log = logging.getLogger("muonq")


class MetricsLogger:
    """Writes every metric line once, from rank 0 only; other ranks get a silent instance."""

    def __init__(
        self,
        *,
        enabled: bool,
        run_name: str,
        run_dir: Path,
        log_dir: Path = LOG_DIR,
        wandb_kwargs: dict[str, Any] | None = None,
        config: dict[str, Any] | None = None,
        resume_id: str | None = None,
    ) -> None:
        self.enabled = enabled
        self.run = None
        self._jsonl = None
        self._file_handler: logging.Handler | None = None
        self.log_file: Path | None = None
        if not enabled:
            log.setLevel(logging.WARNING)
            return
        log.setLevel(logging.INFO)
        if not any(isinstance(h, logging.StreamHandler) for h in log.handlers + logging.getLogger().handlers):
            handler = logging.StreamHandler(sys.stdout)
            handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S"))
            log.addHandler(handler)
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_file = new_log_file(run_name, log_dir)
        self._file_handler = logging.FileHandler(self.log_file)
        self._file_handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%Y-%m-%d %H:%M:%S"))
        log.addHandler(self._file_handler)
        run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        self._start_wandb(run_name, run_dir, wandb_kwargs or {}, config or {}, resume_id)

    def _start_wandb(self, run_name: str, run_dir: Path, kwargs: dict[str, Any], config: dict[str, Any], resume_id: str | None) -> None:
        mode = wandb_mode()
        if mode == "disabled":
            return
        import wandb

        kwargs = dict(kwargs)
        kwargs.setdefault("name", run_name)
        kwargs.setdefault("project", "MuonQ")
        kwargs.setdefault("mode", mode)
        if resume_id:
            kwargs.update(id=resume_id, resume="allow")
        self.run = wandb.init(config=config, **kwargs)
        log.info("W&B run %s (%s mode)", self.run.id, mode)

    @property
    def wandb_id(self) -> str | None:
        return self.run.id if self.run is not None else None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **metrics}
        self._jsonl.write(json.dumps(record) + "\n")
        if self.run is not None:
            self.run.log(metrics, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.run is not None:
            self.run.finish()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._file_handler is not None:
            log.removeHandler(self._file_handler)
            self._file_handler.close()


class LogWindow:
    """The steps since the last log line: the summed loss of the applied ones (on the device, so
    adding it never waits), how many there were, their tokens and the time since the line."""

    def __init__(self, device: torch.device, *, tokens_per_step: int, every: int, total_steps: int) -> None:
        self.loss_sum = torch.zeros((), device=device)
        self.tokens_per_step, self.every, self.total_steps = tokens_per_step, every, total_steps
        self.applied = self.steps = self.tokens = 0
        self.t_last = time.perf_counter()

    def should_log(self, step: int) -> bool:
        """A line every ``logging_params.log_step`` steps and after the last."""
        return step % self.every == 0 or step == self.total_steps

    def add(self, loss: torch.Tensor, *, applied: bool) -> None:
        """One optimizer step; a skipped one (``applied=False``) counts for time, not for the loss."""
        if applied:
            self.loss_sum += loss
            self.applied += 1
        self.steps += 1
        self.tokens += self.tokens_per_step

    def restart_clock(self) -> None:
        """Leave out of the throughput what just ran besides training (validation, a checkpoint)."""
        self.t_last = time.perf_counter()

    def throughput(self) -> tuple[float, float]:
        """(tokens per second, seconds per step) since the last line."""
        elapsed = time.perf_counter() - self.t_last
        return self.tokens / elapsed, elapsed / self.steps

    def mean_loss(self) -> float | None:
        """The mean loss of the applied steps over every rank (a collective when distributed: the
        same on every rank, since skips are agreed), or None when every step was skipped."""
        if not self.applied:
            return None
        return float(dist_utils.all_reduce_mean(self.loss_sum / self.applied))

    def reset(self) -> None:
        self.loss_sum.zero_()
        self.applied = self.steps = self.tokens = 0
        self.t_last = time.perf_counter()


def state_bytes_metrics(report: dict[str, Any], *, rank: int, distributed: bool, hidden_numel: int, other_numel: int,
                        sharding: str = "ZeRO-1") -> tuple[dict[str, float], str]:
    """The optimizer-state metrics and their console line, from ``ShardedOptimizer.state_report()``;
    ``hidden_numel`` / ``other_numel``: the model's elements in hidden matrices / everything else
    (what fp32 Muon + fp32 AdamW would hold state for)."""
    per_rank, total = report["per_rank"], report["total"]
    metrics: dict[str, float] = {M.STATE_BYTES_TOTAL: total, M.STATE_BYTES_RANK: per_rank[rank],
                                 M.STATE_BYTES_RANK_MAX: max(per_rank)}
    for name, nbytes in report["per_optimizer"].items():
        metrics[M.state_bytes_of(name)] = nbytes
    ratio = state_ratio_vs_fp32(total, hidden_numel=hidden_numel, other_numel=other_numel)
    metrics[M.STATE_RATIO_VS_FP32] = ratio
    if len(per_rank) > 1:
        where = f"{sharding} over {len(per_rank)} ranks: " + ", ".join(M.format_bytes(b) for b in per_rank)
    else:
        where = "replicated on every rank (optimizer_params.zero=false)" if distributed else "one rank"
    line = f"optimizer state: {M.format_bytes(total)} total ({M.format_ratio(ratio)} than fp32 Muon + fp32 AdamW), {where}"
    if "muon" in report["per_optimizer"]:
        muon, n_muon = report["per_optimizer"]["muon"], report["numel"]["muon"]
        per_elem = muon / max(1, n_muon)
        muon_ratio = FP32_MUON_BYTES_PER_ELEMENT / per_elem if per_elem else float("nan")
        metrics[M.MUON_BYTES_PER_PARAM] = per_elem
        metrics[M.MUON_RATIO_VS_FP32] = muon_ratio
        line += (f"; Muon: {M.format_bytes(muon)} over {n_muon} params = {per_elem:.3f} bytes/param, "
                 f"{muon_ratio:.2f}x less than fp32 Muon")
    return metrics, line
