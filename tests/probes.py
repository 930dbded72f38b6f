"""Observers installed into real training runs through the plugin hook (``MUONQ_PLUGINS``).

* ``tests.probes:report_release``: when the trainer's model object is freed, the process prints
  ``model released; process group alive`` (or ``...; process group gone``) to stderr, so a test
  can check that a finished run frees its model, DDP's reducer and the optimizer before it
  destroys the process group, and not at interpreter exit.
"""

from __future__ import annotations

import sys
import weakref
from typing import Any

import torch.distributed as dist

RELEASE_PLUGIN = "tests.probes:report_release"


def _report() -> None:
    state = "alive" if dist.is_initialized() else "gone"
    print(f"model released; process group {state}", file=sys.stderr, flush=True)


def report_release(trainer: Any) -> None:
    weakref.finalize(trainer.model, _report)
