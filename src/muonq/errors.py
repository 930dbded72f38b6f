"""The errors a user causes and can fix, as opposed to bugs.

Bad input (a config value, a dataset folder, a tokenizer name, a checkpoint that does not fit the
run, a device that is not there, a command-line argument) raises :class:`UserError` (or
:class:`MissingInputError` for a file or folder that is not there) with a message that names the
key or the file and says what to do. The entry points (``run_hydra.py`` through
:mod:`muonq.launch`, ``process_data.py``, ``python -m muonq.evaluate`` / ``export`` / ``compare``)
print such an error as one line and exit with a non-zero code (2 for training runs and the tools,
1 for ``process_data.py``); anything else is a bug and keeps its traceback.

Internal invariants (shapes inside model or optimizer code, states only a bug reaches) are
``assert`` statements; argument checks of the library's own API (a model constructor given a bad
``ModelConfig``, an optimizer given a bad hyper-parameter) stay plain ``ValueError`` for direct
callers, since for runs the config validation rejects those values first, naming the key.

``UserError`` is a ``ValueError`` and ``MissingInputError`` also a ``FileNotFoundError``, so code
that catches those keeps working. This module imports nothing (no torch), so entry points can
import it cheaply.
"""

from __future__ import annotations

__all__ = ["AgreedUserError", "MissingInputError", "UserError"]


class UserError(ValueError):
    """Bad input the user can fix; the entry points print its message as one line (exit 2)."""


class MissingInputError(UserError, FileNotFoundError):
    """A file or folder the user must provide (a dataset, a shard, a checkpoint) is not there."""


class AgreedUserError(UserError):
    """A :class:`UserError` that every rank of a job raises alike (a verdict rank 0 broadcast, or
    the content of a checkpoint rank 0 verified and every rank reads): printed once per node."""
