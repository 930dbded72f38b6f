"""Training progress on the console: a tqdm bar on a terminal, else a plain line now and then.

A bar redraws itself with carriage returns, which a log file or ``tee`` (as ``run.sh`` uses) turns
into one unreadable line, so when stderr is not a terminal rank 0 prints
``progress <run>: step 120/3000 (4.0%), 2.31 steps/s, 0:20:45 left`` every
``logging_params.progress_every_s`` seconds and after the last step instead.
"""

from __future__ import annotations

import datetime
import sys
import time
from typing import Protocol, TextIO

from tqdm import tqdm


class Progress(Protocol):
    def update(self, n: int = 1) -> object: ...

    def close(self) -> None: ...


class ProgressLine:
    """The plain-line form of a tqdm bar (``update`` / ``close``)."""

    def __init__(self, *, total: int, initial: int, desc: str, every_s: float, stream: TextIO | None = None) -> None:
        self.total, self.n, self.desc, self.every_s = total, initial, desc, every_s
        self.stream = stream or sys.stderr
        self._first, self._started = initial, time.perf_counter()
        self._last = self._started

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self._last >= self.every_s or self.n >= self.total:
            self._last = now
            rate = (self.n - self._first) / max(now - self._started, 1e-9)
            left = datetime.timedelta(seconds=round((self.total - self.n) / rate)) if rate > 0 else "?"
            print(f"progress {self.desc}: step {self.n}/{self.total} ({100 * self.n / self.total:.1f}%), "
                  f"{rate:.2f} steps/s, {left} left", file=self.stream, flush=True)

    def close(self) -> None:
        """Nothing to tear down (tqdm's bar has a line to clear)."""


def progress(*, show: bool, total: int, initial: int, desc: str, every_s: float) -> Progress:
    """A bar when ``show`` and stderr is a terminal, a :class:`ProgressLine` when only ``show``,
    else a silent bar (ranks other than 0)."""
    if show and not sys.stderr.isatty():
        return ProgressLine(total=total, initial=initial, desc=desc, every_s=every_s)
    return tqdm(total=total, initial=initial, disable=not show, dynamic_ncols=True, desc=desc, leave=False,
                mininterval=2.0)
