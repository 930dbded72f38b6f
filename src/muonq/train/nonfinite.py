"""What a non-finite loss or gradient does to a run: ``recipe.training_params.nonfinite``.

* ``stop``: the step is not applied; a checkpoint of the last good step is saved and the run
  stops (:class:`NonFiniteError`).
* ``skip``: the step is not applied, counted (``skipped_steps``) and training goes on.
* ``abort``: the verdict is read a step late (:class:`~muonq.train.guard.LateVerdict`), so the step
  never waits for the device; a non-finite step has then been applied and the run stops without
  saving. The verdict is also read where the run reads the device anyway: before a log line, a
  validation or a checkpoint, at a stop and at the end (:meth:`NonFinitePolicy.settle`).

``stop`` and ``skip`` decide before the optimizer step, agreed over ranks in one all-reduce that
also carries the stop-signal flag. Every rank takes the same decision at the same step.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from muonq.train import guard
from muonq.train.checkpointer import Checkpointer, TrainState

log = logging.getLogger("muonq")


class NonFiniteError(RuntimeError):
    """Raised when the loss or a gradient is not finite and the policy is ``stop`` or ``abort``."""


class NonFinitePolicy:
    """One policy. ``locate()`` names the first parameter with a non-finite gradient on this rank;
    ``discard_grads()`` drops the step's gradients."""

    def __init__(self, *, device: torch.device, checkpointer: Checkpointer, state: TrainState,
                 locate: Callable[[], str], discard_grads: Callable[[], None], is_main: bool) -> None:
        self.device, self.checkpointer, self.state = device, checkpointer, state
        self.locate, self.discard_grads, self.is_main = locate, discard_grads, is_main

    def before_optimizer_step(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor,
                              stop_requested: bool) -> tuple[bool, bool]:
        """For optimizer step ``step`` (1-based), after its backward pass: (apply it, some rank
        was asked to stop). ``stop_requested``: this rank's stop-signal flag, agreed here."""
        local_bad = not bool(torch.isfinite(grad_norm) & torch.isfinite(loss))
        bad, stopping = guard.agree(local_bad, stop_requested, device=self.device)
        if bad:
            where = guard.first_report(self.locate() if local_bad else None)
            self.discard_grads()
            self.reject(step, where)
        return not bad, stopping

    def reject(self, step: int, where: str | None) -> None:
        """Step ``step`` was non-finite on some rank (``where``: the first report) and not applied."""
        raise NotImplementedError

    def settle(self) -> bool:
        """Read a verdict still pending (``abort``): raise if its step was non-finite, else
        whether some rank was asked to stop. Nothing is pending with ``stop`` or ``skip``."""
        return False


class StopPolicy(NonFinitePolicy):
    def reject(self, step: int, where: str | None) -> None:
        self.checkpointer.ensure_saved()
        raise NonFiniteError(
            f"step {step}: non-finite loss or gradient (first in {where}); "
            f"checkpoint of step {self.state.step} saved in {self.checkpointer.step_dir(self.state.step)}; "
            "lower the learning rate, or resume with recipe.training_params.nonfinite=skip"
        )


class SkipPolicy(NonFinitePolicy):
    def reject(self, step: int, where: str | None) -> None:
        self.state.skipped_steps += 1
        if self.is_main:
            log.warning("step %d: non-finite loss/gradient (first in %s); step skipped (%d so far)",
                        step, where, self.state.skipped_steps)


class AbortPolicy(NonFinitePolicy):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.pending: guard.LateVerdict | None = None

    def before_optimizer_step(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor,
                              stop_requested: bool) -> tuple[bool, bool]:
        # the previous step's verdict: the device finished it while this step's forward and
        # backward were being queued, so reading it does not wait
        stopping = self.settle()
        self.pending = guard.LateVerdict(step, loss, grad_norm, stop_requested)
        return True, stopping

    def settle(self) -> bool:
        if self.pending is None:
            return False
        verdict, self.pending = self.pending, None
        bad, stop, local = verdict.read()
        if bad:
            where = guard.first_report(local)
            saved_at = self.checkpointer.saved_at
            resume = (f"the newest checkpoint is step {saved_at} in {self.checkpointer.step_dir(saved_at)} "
                      "(rerun with resume=true)" if saved_at is not None else "no checkpoint was saved")
            raise NonFiniteError(
                f"step {verdict.step}: non-finite loss or gradient ({where}); with "
                f"recipe.training_params.nonfinite=abort the optimizer had already applied it, so this state "
                f"is not saved; {resume}; lower the learning rate, or use nonfinite=stop or skip"
            )
        return stop


POLICIES: dict[str, type[NonFinitePolicy]] = {"stop": StopPolicy, "skip": SkipPolicy, "abort": AbortPolicy}
