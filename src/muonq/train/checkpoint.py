"""Atomic, checksummed checkpoints: one folder per step, one or more files per folder.

Layout: ``<dir>/step_000100/`` holds the files that ranks wrote (``main.pt`` from rank 0,
``optim_rank00000.pt``, ``optim_rank00001.pt`` ...: one optimizer shard per ZeRO-1 or FSDP rank, see
:mod:`muonq.optim.shard_format`, and under FSDP ``model_rank00000.pt`` ...: each rank's rows of the
model, see :mod:`muonq.train.model_rows`) and ``manifest.json`` (step, files, sha256 of each, plus what the writer
adds: the optimizer's owner map). Files are written into ``step_000100.partial/`` and the folder is renamed only
after the manifest is complete, so a kill at any moment leaves either a whole checkpoint or a
``.partial`` folder that loading ignores. Loading verifies the checksums and falls back to the
previous checkpoint, with a warning, when one is corrupt; every file read from a step folder
must be listed in its manifest, so nothing is loaded unverified.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from pickle import UnpicklingError
from typing import Any

import torch

from muonq.errors import UserError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MAIN = "main.pt"  # rank 0's file: model, loader, RNG, counters, config
_STEP_DIR = re.compile(r"^step_(\d{6,})$")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _manifest(folder: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(the manifest of the step folder ``folder``, None) or (None, why it cannot be used)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return None, f"no {MANIFEST}"
    except (OSError, ValueError) as err:
        return None, f"unreadable {MANIFEST} ({err})"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        return None, f"{MANIFEST} holds no file checksums"
    if MAIN not in files:
        return None, f"{MANIFEST} does not list {MAIN}"
    return manifest, None


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of the step folder ``folder``; a missing or malformed one is a :class:`UserError`."""
    manifest, problem = _manifest(folder)
    if manifest is None:
        raise UserError(f"checkpoint {folder}: {problem}")
    return manifest


def verify_folder(folder: Path) -> str | None:
    """None if the step folder ``folder`` is complete and every file matches its manifest, else
    what is wrong."""
    manifest, problem = _manifest(folder)
    if manifest is None:
        return problem
    match = _STEP_DIR.match(folder.name)
    if match and manifest.get("step") != int(match.group(1)):
        return f"its {MANIFEST} is of step {manifest.get('step')}"
    for name, digest in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            return f"missing file {name}"
        if _sha256(path) != digest:
            return f"checksum mismatch in {name}"
    return None


def read_file(path: Path, map_location: str | torch.device = "cpu", *, mmap: bool = False) -> Any:
    """torch.load (tensors and plain containers only; ``mmap``: tensors stay in the file until
    used); a file torch cannot read is a :class:`UserError`."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except (RuntimeError, EOFError, OSError, UnpicklingError) as err:  # what torch raises for foreign bytes
        # not torch's own text: it suggests weights_only=False, which would run the file's code
        raise UserError(f"{path} is not a readable checkpoint file ({type(err).__name__})") from err


def read_listed(folder: Path, name: str, map_location: str | torch.device = "cpu", *, mmap: bool = False) -> Any:
    """File ``name`` of the step folder ``folder``, which its manifest must list (the manifest's
    checksums are verified when the folder is chosen, so nothing is read unverified)."""
    if name not in read_manifest(folder)["files"]:
        raise UserError(f"checkpoint {folder}: {name} is not listed in its {MANIFEST}")
    return read_file(folder / name, map_location, mmap=mmap)


def write_file(path: Path, payload: dict[str, Any]) -> None:
    """torch.save through a temp file in the same folder, fsynced, then renamed."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        torch.save(payload, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class CheckpointManager:
    def __init__(self, directory: str | os.PathLike, *, keep_last: int = 2) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.directory = Path(directory)
        self.keep_last = keep_last

    def step_dir(self, step: int) -> Path:
        return self.directory / f"step_{step:06d}"

    def partial_dir(self, step: int) -> Path:
        return self.directory / f"step_{step:06d}.partial"

    # -- writing: begin (rank 0) -> write_part (every rank) -> commit (rank 0) --------------------
    def begin(self, step: int) -> Path:
        partial = self.partial_dir(step)
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        return partial

    def write_part(self, step: int, name: str, payload: dict[str, Any]) -> None:
        write_file(self.partial_dir(step) / name, payload)

    def commit(self, step: int, *, extra: dict[str, Any] | None = None) -> Path:
        partial, final = self.partial_dir(step), self.step_dir(step)
        files = sorted(p.name for p in partial.iterdir() if p.suffix == ".pt")
        manifest = {"step": step, "files": {name: _sha256(partial / name) for name in files}, **(extra or {})}
        tmp = partial / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, partial / MANIFEST)
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        _fsync_dir(self.directory)
        self._prune()
        return final

    def save(self, step: int, payload: dict[str, Any], *, name: str = MAIN) -> Path:
        """Single-writer save: begin, one file, commit."""
        self.begin(step)
        self.write_part(step, name, payload)
        return self.commit(step)

    def _prune(self) -> None:
        for step in self.steps()[: -self.keep_last]:
            shutil.rmtree(self.step_dir(step), ignore_errors=True)

    # -- reading ---------------------------------------------------------------------------------
    def steps(self) -> list[int]:
        """Committed checkpoint steps, oldest first (verification happens on load)."""
        if not self.directory.is_dir():
            return []
        found = [_STEP_DIR.match(p.name) for p in self.directory.iterdir() if p.is_dir()]
        return sorted(int(m.group(1)) for m in found if m)

    def verify(self, step: int) -> str | None:
        """None if the checkpoint of ``step`` is complete and intact, else what is wrong."""
        return verify_folder(self.step_dir(step))

    def newest_intact(self) -> tuple[int | None, list[str]]:
        """(the newest intact step or None, each newer checkpoint rejected on the way with its
        reason); every rejected one is also logged as a warning."""
        rejected = []
        for step in reversed(self.steps()):
            problem = self.verify(step)
            if problem is None:
                return step, rejected
            log.warning("checkpoint %s is corrupt (%s); trying the previous one", self.step_dir(step), problem)
            rejected.append(f"{self.step_dir(step).name} ({problem})")
        return None, rejected

    def load(self, step: int, name: str = MAIN, map_location: str | torch.device = "cpu", *,
             mmap: bool = False) -> dict[str, Any]:
        """A file of a verified checkpoint; one its manifest does not list is refused."""
        return read_listed(self.step_dir(step), name, map_location, mmap=mmap)

    def manifest(self, step: int) -> dict[str, Any]:
        return read_manifest(self.step_dir(step))


def every_checkpoint_rejected(directory: Path, rejected: list[str]) -> str:
    """What to say of a checkpoint folder none of whose checkpoints can be loaded."""
    return f"every checkpoint in {directory} is corrupt or incomplete: {'; '.join(rejected)}"
