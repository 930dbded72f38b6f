"""Rank-0 metrics: console lines, a log file under ``logs/``, a JSONL file, and Weights & Biases."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from muonq.environment import wandb_mode

log = logging.getLogger("muonq")


class MetricsLogger:
    """Writes every metric line once, from rank 0 only; other ranks get a silent instance."""

    def __init__(
        self,
        *,
        enabled: bool,
        run_name: str,
        run_dir: Path,
        log_dir: Path = Path("logs"),
        wandb_kwargs: dict[str, Any] | None = None,
        config: dict[str, Any] | None = None,
        resume_id: str | None = None,
    ) -> None:
        self.enabled = enabled
        self.run = None
        self._jsonl = None
        self._file_handler: logging.Handler | None = None
        if not enabled:
            log.setLevel(logging.WARNING)
            return
        log.setLevel(logging.INFO)
        if not any(isinstance(h, logging.StreamHandler) for h in log.handlers + logging.getLogger().handlers):
            handler = logging.StreamHandler(sys.stdout)
            handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S"))
            log.addHandler(handler)
        log_dir.mkdir(parents=True, exist_ok=True)
        self._file_handler = logging.FileHandler(log_dir / f"{run_name}.log")
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
