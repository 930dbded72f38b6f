"""Preemption: a SIGTERM / SIGINT (:class:`~muonq.train.guard.StopSignals`) becomes a checkpoint
and :class:`~muonq.train.guard.StopRequested` at a step boundary, on every rank at the same step.

This rank's flag (:attr:`Preemption.requested`) travels with each step's non-finite verdict, so
agreeing on it costs no collective of its own; after the last step it is agreed alone
(:meth:`Preemption.agreed`), before the final validation.
"""

from __future__ import annotations

import torch

from muonq.train import guard
from muonq.train.checkpointer import Checkpointer


class Preemption:
    def __init__(self, signals: guard.StopSignals, checkpointer: Checkpointer, *, total_steps: int,
                 device: torch.device) -> None:
        self.signals, self.checkpointer = signals, checkpointer
        self.total_steps, self.device = total_steps, device

    @property
    def requested(self) -> bool:
        """This rank received a stop signal."""
        return self.signals.received is not None

    def agreed(self) -> bool:
        """Some rank received a stop signal (a collective when distributed)."""
        return guard.agree(self.requested, device=self.device)[0]

    def stop(self) -> guard.StopRequested:
        """Save the current step (unless on disk already) and say how to continue."""
        done = self.checkpointer.state.step
        self.checkpointer.ensure_saved()
        sig = self.signals.received or "a signal on another rank"
        return guard.StopRequested(
            f"{sig}: stopped after step {done}/{self.total_steps} with a checkpoint in "
            f"{self.checkpointer.step_dir(done)}; rerun the same command with resume=true (or resume=auto) "
            "to continue", step=done, signal_name=sig,
        )
