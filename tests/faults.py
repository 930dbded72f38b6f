"""Faults injected into real training runs (``python run_hydra.py`` / torchrun subprocesses).

The trainer loads this module in every process through its plugin hook
(``MUONQ_PLUGINS=tests.faults:install``, see ``muonq.train.hooks``), and :func:`install` reads
what to inject from the environment the test gave the subprocess:

* ``MUONQ_INJECT_NAN_STEP=3`` (or ``3,5``): at those 1-based optimizer steps rank 0 overwrites the
  gradient of the model's first hidden matrix with NaN after the backward pass, as an overflow would;
* ``MUONQ_INJECT_INF_WEIGHT_STEP=3``: at that step every rank sets the model's first hidden matrix
  to +inf after the backward pass, so the step's loss and gradients are finite but the weights the
  optimizer leaves are not, as an overflowing update would;
* ``MUONQ_INJECT_RAISE=STEP:RANK``: that rank raises a RuntimeError during that step, as a crashing
  rank would.

Tests build the environment with :func:`nan_at`, :func:`inf_weights_at` and :func:`raise_at`.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from muonq.train.hooks import PLUGINS_ENV

NAN_STEP_ENV = "MUONQ_INJECT_NAN_STEP"
INF_WEIGHT_STEP_ENV = "MUONQ_INJECT_INF_WEIGHT_STEP"
RAISE_ENV = "MUONQ_INJECT_RAISE"
PLUGIN = "tests.faults:install"  # importable in the run: run_hydra.py's folder is on sys.path


def nan_at(*steps: int) -> dict[str, str]:
    """The subprocess environment for a NaN gradient on rank 0 at ``steps``."""
    return {PLUGINS_ENV: PLUGIN, NAN_STEP_ENV: ",".join(str(s) for s in steps)}


def inf_weights_at(step: int) -> dict[str, str]:
    """The subprocess environment for weights that become infinite during ``step``."""
    return {PLUGINS_ENV: PLUGIN, INF_WEIGHT_STEP_ENV: str(step)}


def raise_at(step: int, rank: int) -> dict[str, str]:
    """The subprocess environment for ``rank`` raising during ``step``."""
    return {PLUGINS_ENV: PLUGIN, RAISE_ENV: f"{step}:{rank}"}


def _nan_steps() -> frozenset[int]:
    raw = os.environ.get(NAN_STEP_ENV, "").strip()
    if not raw:
        return frozenset()
    try:
        return frozenset(int(s) for s in raw.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"{NAN_STEP_ENV}={raw!r}: expected comma-separated step numbers") from None


def _raise_at() -> tuple[int, int] | None:
    raw = os.environ.get(RAISE_ENV, "").strip()
    if not raw:
        return None
    try:
        step, rank = (int(v) for v in raw.split(":"))
    except ValueError:
        raise ValueError(f"{RAISE_ENV}={raw!r}: expected STEP:RANK") from None
    return step, rank


def install(trainer: Any) -> None:
    """Register the faults the environment asks for as ``after_backward`` callbacks."""
    nan_steps, raise_step = _nan_steps(), _raise_at()
    inf_step = int(os.environ.get(INF_WEIGHT_STEP_ENV, "0") or 0)

    def poison_gradient(trainer: Any, step: int) -> None:
        if step in nan_steps and trainer.dist.is_main:
            _, param = next(iter(trainer.model.hidden_matrices()))
            if param.grad is not None:
                param.grad.fill_(float("nan"))

    def overflow_weights(trainer: Any, step: int) -> None:
        if step == inf_step:
            _, param = next(iter(trainer.model.hidden_matrices()))
            with torch.no_grad():
                param.fill_(float("inf"))

    def crash(trainer: Any, step: int) -> None:
        if raise_step == (step, trainer.dist.rank):
            raise RuntimeError(f"{RAISE_ENV}: injected fault on rank {trainer.dist.rank} at step {step}")

    if nan_steps:
        trainer.hooks.after_backward.append(poison_gradient)
    if inf_step:
        trainer.hooks.after_backward.append(overflow_weights)
    if raise_step is not None:
        trainer.hooks.after_backward.append(crash)
