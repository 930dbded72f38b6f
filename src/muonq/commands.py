"""The command line that starts a training run: ``python run_hydra.py ...`` on one process, or
``torchrun --standalone --nproc-per-node=N run_hydra.py ...`` (as ``python -m torch.distributed.run``,
so it is the torch of this interpreter) on N."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RUN_HYDRA = REPO / "run_hydra.py"


def entry_command(nproc: int, *args: str) -> list[str]:
    """argv for run_hydra.py with ``args`` (Hydra overrides), on ``nproc`` local processes."""
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc-per-node={nproc}"]
    return [*launcher, str(RUN_HYDRA), *args]
