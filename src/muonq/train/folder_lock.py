"""One run per checkpoint folder: two runs writing the same ``step_NNNNNN/`` folders would
interleave and prune each other's checkpoints.

The lock is ``flock`` on ``<folder>/run.lock``, which holds the holder's PID, host, start time and
output folder for the messages. ``flock`` rather than a PID file: the kernel drops the lock when
its process dies in any way (SIGKILL, OOM, a crash), so a dead run never blocks the next one, and
no PID can be mistaken for a live run after reuse; on NFS the server's lock manager does the same
for a client that went away. A run that finds the file still naming a holder (one that died
without releasing) takes it over and says so. Release unlinks the file while still holding the
lock; a run that locked the old, unlinked file sees that the path no longer names it and retries.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import socket
from pathlib import Path

from muonq.errors import UserError

log = logging.getLogger("muonq")

LOCK_FILE = "run.lock"


def describe(holder: str) -> str:
    """The holder recorded in a lock file, in words."""
    try:
        info = json.loads(holder)
        return f"pid {info['pid']} on {info['host']}, started {info['started']}, output {info['run_dir']}"
    except (ValueError, KeyError, TypeError):
        return "a run that has not yet recorded itself"


class FolderLock:
    """The lock of one checkpoint folder, held by this process until :meth:`release`."""

    def __init__(self, folder: Path, fd: int, made: list[Path]) -> None:
        self.folder, self._fd, self._made = folder, fd, made

    @classmethod
    def take(cls, folder: Path, *, run_dir: Path) -> FolderLock:
        """Lock ``folder`` (made if missing) for this run, or raise a :class:`UserError` naming the
        live run that holds it."""
        made = [p for p in (folder, *folder.parents) if not p.exists()]  # innermost first
        path = folder / LOCK_FILE
        while True:
            folder.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except FileNotFoundError:  # a run that made the folder removed it as it ended
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode(errors="replace")
                os.close(fd)
                raise UserError(f"checkpoint folder {folder} is in use by another run ({describe(holder)}); "
                                "wait for it to end, or set logging_params.checkpoint_dir to another folder") from None
            except OSError as err:  # a filesystem without file locks
                os.close(fd)
                raise UserError(f"checkpoint folder {folder}: cannot lock {LOCK_FILE} ({err}); put "
                                "logging_params.checkpoint_dir on a filesystem with file locks") from err
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder released (unlinked) it between our open and our lock
        previous = os.pread(fd, 4096, 0).decode(errors="replace")
        if previous:
            log.warning("checkpoint folder %s: taking over the lock of a run that ended without releasing it (%s)",
                        folder, describe(previous))
        me = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "run_dir": str(run_dir),
                         "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}).encode()
        os.pwrite(fd, me, 0)
        os.ftruncate(fd, len(me))
        os.fsync(fd)
        return cls(folder, fd, made)

    def release(self) -> None:
        """Unlink the lock file, then unlock; the folders this run made go too while they are empty
        (a run without checkpoints leaves nothing behind)."""
        (self.folder / LOCK_FILE).unlink(missing_ok=True)
        os.close(self._fd)
        for folder in self._made:
            try:
                folder.rmdir()
            except OSError:  # it holds checkpoints, another run's lock or other files: keep it
                break
