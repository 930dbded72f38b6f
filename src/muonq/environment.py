"""What a run reads from its environment: ``.env`` and the W&B credentials (no torch import)."""

from __future__ import annotations

import functools
import os
from pathlib import Path


@functools.cache
def load_dotenv_once() -> None:
    """Read ``.env`` (searched upwards from the working directory) once; the environment wins, and
    its values are never logged or copied into configs."""
    from dotenv import find_dotenv, load_dotenv

    found = find_dotenv(usecwd=True)
    if found:
        load_dotenv(found, override=False)


def wandb_logged_in() -> bool:
    """An API key in the environment, or a ``wandb login`` entry in ``~/.netrc``."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def wandb_mode() -> str:
    """W&B's mode: as set in ``WANDB_MODE``; online when credentials exist, else offline."""
    return os.environ.get("WANDB_MODE") or ("online" if wandb_logged_in() else "offline")
