"""What a non-finite loss or gradient does to a run: ``recipe.training_params.nonfinite``.

* ``stop``: the step is not applied; a checkpoint of the last good step is saved and the run
  stops (:class:`NonFiniteError`).
* ``skip``: the step is not applied, counted (``skipped_steps``) and training goes on; after
  ``max_consecutive_skips`` skipped steps in a row, or at the end of a run none of whose steps
  was applied, the run stops (the weights, not one batch, are broken).
* ``abort``: the verdict is read a step late (:class:`~muonq.train.guard.LateVerdict`), so the step
  never waits for the device; a non-finite step has then been applied and the run stops without
  saving. The verdict is also read where the run reads the device anyway: before a log line, a
  validation or a checkpoint, at a stop and at the end (:meth:`NonFinitePolicy.settle`).

``stop`` and ``skip`` decide before the optimizer step, agreed over ranks in one all-reduce that
also carries the stop-signal flag. Every rank takes the same decision at the same step.

A step's gradient depends on the weights it starts from and its batch, not on the learning rate:
resuming from the checkpoint of the last good step with a lower learning rate recomputes the
same non-finite gradient. The messages therefore send a lower learning rate to a checkpoint
older than the weights that failed (:func:`lower_lr_advice`), and ``skip`` to the newest one.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from muonq.train import guard
from muonq.train.checkpointer import Checkpointer, TrainState
from muonq.train.guard import NonFiniteError

__all__ = ["POLICIES", "NonFiniteError", "NonFinitePolicy", "lower_lr_advice"]

log = logging.getLogger("muonq")


def lower_lr_advice(checkpointer: Checkpointer, weights_step: int) -> str:
    """How to retry with a lower learning rate when the weights of ``weights_step`` (the last
    applied update) give a non-finite gradient: from a checkpoint before that step, or from scratch."""
    if weights_step == 0:
        return "these are the initial weights, which no learning rate changes: check the data and recipe.model"
    steps = checkpointer.manager.steps()
    earlier = [s for s in steps if s < weights_step]
    if not earlier:
        return f"to retry with a lower learning rate, start over (no checkpoint before step {weights_step} is kept)"
    if earlier[-1] == steps[-1]:
        return f"to retry with a lower learning rate, rerun with resume=true and one (it resumes from step {steps[-1]})"
    return (f"to retry with a lower learning rate, resume from step {earlier[-1]} ({checkpointer.step_dir(earlier[-1])}): "
            f"move the newer step_* folders out of {checkpointer.manager.directory}, then rerun with resume=true")


class NonFinitePolicy:
    """One policy. ``locate()`` names the first parameter with a non-finite gradient on this rank;
    ``discard_grads()`` drops the step's gradients."""

    def __init__(self, *, device: torch.device, checkpointer: Checkpointer, state: TrainState,
                 locate: Callable[[], str], discard_grads: Callable[[], None], is_main: bool,
                 max_consecutive_skips: int) -> None:
        self.device, self.checkpointer, self.state = device, checkpointer, state
        self.locate, self.discard_grads, self.is_main = locate, discard_grads, is_main
        self.max_consecutive_skips = max_consecutive_skips
        self.applied_at: int | None = None  # the step of the last update applied (None: before the first step)
        self.first_step: int | None = None  # this run's first step

    def before_optimizer_step(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor,
                              stop_requested: bool) -> tuple[bool, bool]:
        """For optimizer step ``step`` (1-based), after its backward pass: (apply it, some rank
        was asked to stop). ``stop_requested``: this rank's stop-signal flag, agreed here."""
        if self.first_step is None:  # after a resume: the weights are those of the checkpoint's step
            self.first_step, self.applied_at = step, step - 1
        local_bad = not bool(torch.isfinite(grad_norm) & torch.isfinite(loss))
        bad, stopping = guard.agree(local_bad, stop_requested, device=self.device)
        if bad:
            where = guard.first_report(self.locate() if local_bad else None)
            self.discard_grads()
            self.reject(step, where)
        else:
            self.applied_at = step
        return not bad, stopping

    def reject(self, step: int, where: str | None) -> None:
        """Step ``step`` was non-finite on some rank (``where``: the first report) and not applied."""
        raise NotImplementedError

    def settle(self) -> bool:
        """Read a verdict still pending (``abort``): raise if its step was non-finite, else
        whether some rank was asked to stop. Nothing is pending with ``stop`` or ``skip``."""
        return False

    def at_end(self) -> None:
        """After the last step (its verdict read): raise if the run trained nothing."""


class StopPolicy(NonFinitePolicy):
    def reject(self, step: int, where: str | None) -> None:
        self.checkpointer.ensure_saved()
        raise NonFiniteError(
            f"step {step}: non-finite loss or gradient (first in {where}); "
            f"checkpoint of step {self.state.step} saved in {self.checkpointer.step_dir(self.state.step)}; "
            f"to skip step {step} and go on, rerun with resume=true recipe.training_params.nonfinite=skip; "
            f"a lower learning rate does not change step {step}'s gradient, which comes from the weights of "
            f"step {self.applied_at}: {lower_lr_advice(self.checkpointer, self.applied_at)}"
        )


class SkipPolicy(NonFinitePolicy):
    def reject(self, step: int, where: str | None) -> None:
        self.state.skipped_steps += 1
        in_a_row = step - self.applied_at
        if in_a_row >= self.max_consecutive_skips:
            raise NonFiniteError(
                f"step {step}: {in_a_row} non-finite steps in a row skipped (steps {self.applied_at + 1}-{step}, the "
                f"last in {where}), recipe.training_params.max_consecutive_skips={self.max_consecutive_skips}: the "
                f"weights of step {self.applied_at} fail on every batch; {self._after()}"
            )
        if self.is_main:
            log.warning("step %d: non-finite loss/gradient (first in %s); step skipped (%d so far)",
                        step, where, self.state.skipped_steps)

    def at_end(self) -> None:
        if self.first_step is not None and self.applied_at < self.first_step:
            raise NonFiniteError(
                f"every step of this run ({self.first_step}-{self.state.step}) was non-finite and skipped: nothing "
                f"was trained; {self._after()}"
            )

    def _after(self) -> str:
        saved = self.checkpointer.saved_at
        newest = "nothing was saved" if saved is None else f"the newest checkpoint is step {saved}"
        return f"{newest}; {lower_lr_advice(self.checkpointer, self.applied_at)}"


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
            skip = (f"the newest checkpoint is step {saved_at} in {self.checkpointer.step_dir(saved_at)}: to skip "
                    f"step {verdict.step}, rerun with resume=true recipe.training_params.nonfinite=skip"
                    if saved_at is not None else "no checkpoint was saved")
            raise NonFiniteError(
                f"step {verdict.step}: non-finite loss or gradient ({where}); with "
                f"recipe.training_params.nonfinite=abort the optimizer had already applied it, so this state "
                f"is not saved; {skip}; {lower_lr_advice(self.checkpointer, verdict.step - 1)}"
            )
        return stop


POLICIES: dict[str, type[NonFinitePolicy]] = {"stop": StopPolicy, "skip": SkipPolicy, "abort": AbortPolicy}
