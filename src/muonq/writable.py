"""Can a run write where it is told to? Checked before anything is created.

A folder that does not exist yet is writable when its nearest existing ancestor is a folder this
process may create entries in; a file anywhere on the way (``checkpoint_dir`` under a file, a
file called ``logs``) or a read-only ancestor makes it unwritable. Nothing is created here, so a
failed check leaves the disk as it was.
"""

from __future__ import annotations

import os
from pathlib import Path

from muonq.errors import UserError

__all__ = ["check_writable_dir"]


def check_writable_dir(path: str | os.PathLike, what: str) -> None:
    """Raise :class:`UserError` naming ``what`` (a config key or a folder's role) unless ``path``
    is a folder, or can be created as one, that this process may write into."""
    path = Path(path).absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == path else f"is under {existing}, which is a file"
        raise UserError(f"{what}: {path} {where}; it must be a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == path else f" ({existing} exists and is not writable)"
        raise UserError(f"{what}: cannot write to {path}{where}")
