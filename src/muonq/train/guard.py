"""What keeps a run safe to stop: preemption signals and rank agreement.

* :class:`StopSignals` turns SIGTERM / SIGINT into a flag that the training loop reads at the
  next optimizer-step boundary, where it saves a checkpoint and stops with :data:`EXIT_PREEMPTED`
  (:mod:`muonq.train.preemption`). A repeat of the signal more than :data:`REPEAT_GRACE_S` after
  the first exits at once (no checkpoint); a repeat within that window is the same event
  delivered twice (a terminal's Ctrl-C reaches torchrun and its workers, then torchrun forwards
  it) and is ignored.
* :func:`agree` makes every rank take the same decision (skip a non-finite step, stop) with one
  small all-reduce per step, so no rank waits in a collective that its peers never enter. It reads
  the verdict before the optimizer runs: one host synchronisation per step.
* :class:`LateVerdict` is the same agreement read one step late (``nonfinite=abort``): the flags
  travel to the host in the background and are read when the device is long past them, so the step
  never waits for the device; a non-finite step is then found after the optimizer applied it.

Faults for tests (a NaN gradient, a rank that raises) are installed from outside the loop, through
the trainer's plugin hook (:mod:`muonq.train.hooks`).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from muonq.exit_codes import EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_PREEMPTED  # noqa: F401 (re-exported)

REPEAT_GRACE_S = 1.0


class NonFiniteError(RuntimeError):
    """A non-finite loss, gradient or weight ended the run (exit code :data:`EXIT_NONFINITE`)."""


class StopRequested(Exception):
    """The run stopped at a step boundary after a signal; a checkpoint of ``step`` was saved."""

    def __init__(self, message: str, *, step: int, signal_name: str) -> None:
        super().__init__(message)
        self.step = step
        self.signal_name = signal_name


class StopSignals:
    """Context manager: while active, SIGTERM and SIGINT set :attr:`received` instead of killing.

    Handlers can only be installed from the main thread; elsewhere this is a no-op.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: str | None = None
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self.received is None:
            self.received, self._first_at = name, now
            # os.write: safe inside a signal handler (logging may hold its lock right now)
            os.write(2, f"\n{name} received: saving a checkpoint at the end of this step, then stopping "
                        f"(send it again to exit at once without one)\n".encode())
        elif now - self._first_at > REPEAT_GRACE_S:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def agree(*flags: bool, device: torch.device) -> tuple[bool, ...]:
    """Each flag ORed over all ranks (one all-reduce of a few numbers; local in one process)."""
    if not _distributed():
        return tuple(bool(f) for f in flags)
    t = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in t.tolist())


class LateVerdict:
    """One step's verdict (is its loss or gradient norm non-finite on any rank, has any rank been
    asked to stop), started without waiting and read later with :meth:`read`.

    The flags are ORed over ranks by an all-reduce and copied to pinned host memory behind the
    step's work on the device stream; :meth:`read` waits for that copy only, which has long
    finished when it is called a step later.
    """

    def __init__(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, stop: bool) -> None:
        self.step = step
        values = torch.stack([loss.detach().float().reshape(()), grad_norm.detach().float().reshape(())])
        bad = (~torch.isfinite(values)).any().float()
        flags = torch.stack([bad, torch.full_like(bad, float(stop))])
        if _distributed():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # queued on the device, not waited for
        payload = torch.cat([flags, bad.reshape(1), values])
        self._event: torch.cuda.Event | None = None
        if payload.is_cuda:
            self._host = torch.empty(payload.shape, dtype=payload.dtype, pin_memory=True)
            self._host.copy_(payload, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = payload

    def read(self) -> tuple[bool, bool, str | None]:
        """(non-finite on some rank, stop requested on some rank, this rank's loss and gradient
        norm when they are the non-finite ones, else None)."""
        if self._event is not None:
            self._event.synchronize()
        bad, stop, local_bad, loss, grad_norm = self._host.tolist()
        return bad > 0, stop > 0, f"loss {loss:.4g}, gradient norm {grad_norm:.4g}" if local_bad > 0 else None


def first_report(local: str | None) -> str | None:
    """The first non-None ``local`` over ranks, prefixed by its rank when distributed."""
    if not _distributed():
        return local
    reports: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(reports, local)
    return next((f"rank {r}: {rep}" for r, rep in enumerate(reports) if rep is not None), None)

