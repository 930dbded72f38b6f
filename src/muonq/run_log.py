"""Where a run's log file goes: ``logs/<run name>_<start time>.log``, one file per run.

Runs of the same name (a rerun, a resume, a sweep job) each get their own file instead of being
appended into one; two runs that start in the same second get ``-2``, ``-3``, ... suffixes.
"""

from __future__ import annotations

import time
from pathlib import Path

LOG_DIR = Path("logs")


def new_log_file(run_name: str, log_dir: Path = LOG_DIR) -> Path:
    """A path under ``log_dir`` that no other run has used (the folder is not created here)."""
    stem = f"{run_name}_{time.strftime('%Y-%m-%d_%H-%M-%S')}"
    path, n = log_dir / f"{stem}.log", 1
    while path.exists():
        n += 1
        path = log_dir / f"{stem}-{n}.log"
    return path
