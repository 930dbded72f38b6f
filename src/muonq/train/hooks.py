"""Extension points of the training loop, and the plugins that use them.

Callbacks on ``trainer.hooks``:

* ``after_backward(trainer, step)``: after the forward and backward passes of optimizer step
  ``step`` (1-based; the gradients of the whole accumulation window are in ``.grad``), before the
  gradient norm, the non-finite verdict and the optimizer. It may read or change the gradients.

A plugin is a function ``install(trainer)`` that registers callbacks. The environment variable
``MUONQ_PLUGINS`` names plugins as comma-separated ``package.module:function``; every process
(every torchrun rank) imports and calls each once, when its trainer is built. The module must be
importable there (``run_hydra.py``'s folder, the repository root, is on ``sys.path``). The tests
inject faults into real runs this way (``tests/faults.py``); a profiler or a gradient probe can
use it without living in the loop.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from muonq.errors import UserError

PLUGINS_ENV = "MUONQ_PLUGINS"

AfterBackward = Callable[[Any, int], None]


@dataclass
class Hooks:
    after_backward: list[AfterBackward] = field(default_factory=list)

    def run_after_backward(self, trainer: Any, step: int) -> None:
        for callback in self.after_backward:
            callback(trainer, step)


def load_plugins(trainer: Any, spec: str | None = None) -> None:
    """Call every plugin that ``spec`` (default: ``$MUONQ_PLUGINS``) names with ``trainer``."""
    spec = os.environ.get(PLUGINS_ENV, "") if spec is None else spec
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        module_name, _, function_name = item.partition(":")
        if not module_name or not function_name:
            raise UserError(f"{PLUGINS_ENV}: {item!r} is not module:function")
        try:
            install = getattr(importlib.import_module(module_name), function_name)
        except (ImportError, AttributeError) as err:
            raise UserError(f"{PLUGINS_ENV}: cannot load {item!r} ({type(err).__name__}: {err})") from err
        install(trainer)
