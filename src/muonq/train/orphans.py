"""torchrun workers end when their launcher dies.

torchrun starts every worker in a session of its own, so when torchrun itself is SIGKILLed (by a
user, a scheduler, the OOM killer) no signal reaches the workers: they would train on unsupervised
and keep writing checkpoints that a rerun then races with.

:func:`end_with_launcher` starts a daemon thread that polls ``os.getppid()``; when the parent is
no longer the launcher the worker started under (the launcher died and the worker was re-parented
to init or a subreaper), the worker SIGKILLs itself, as torchrun would have done to it. Polling was
chosen over Linux's ``prctl(PR_SET_PDEATHSIG)``: that signal fires when the *thread* that forked
the worker ends, not the launcher process, so a launcher that spawns from a helper thread would kill
healthy workers; it is also Linux only. The poll is one system call every :data:`POLL_S`, and the
thread needs the GIL only for that moment (torch's operations and collectives release it).

SIGKILL, not a graceful stop with a checkpoint: the peers end the same way, nobody is left to
supervise a stop, and the newest complete checkpoint is on disk (a write cut short is left as a
``.partial`` folder that loading ignores). A launcher that died before the worker started the
thread (a moment at startup) goes unnoticed.
"""

from __future__ import annotations

import os
import signal
import threading
import time

POLL_S = 0.5


def _watch(launcher: int) -> None:
    while os.getppid() == launcher:
        time.sleep(POLL_S)
    try:
        os.write(2, f"error: the launcher (pid {launcher}) is gone; ending this worker (pid {os.getpid()})\n".encode())
    except OSError:  # the console went with the launcher
        pass
    os.kill(os.getpid(), signal.SIGKILL)


def end_with_launcher() -> None:
    """Under torchrun (its agent sets ``TORCHELASTIC_RUN_ID``), end this worker when the agent dies.
    A plain ``python run_hydra.py`` keeps running when its shell goes (``nohup``, ``&``)."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        threading.Thread(target=_watch, args=(os.getppid(),), name="end-with-launcher", daemon=True).start()
