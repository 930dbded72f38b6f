"""Where data lives: the data root, dataset folder names, the download cache.

A dataset folder is ``$DATA_DIR/{name}-{tokenizer tag}``; the tag is what the original MuonQ
used (``fineweb100B-Llama-2-7b-hf``), so folders users already have keep working.
"""

from __future__ import annotations

import functools
import os
import pathlib
import re
import shlex

from muonq.environment import load_dotenv_once
from muonq.errors import UserError

LLAMA2_HUB_ID = "meta-llama/Llama-2-7b-hf"
# CLI tokenizer names whose folder tag is not the name itself.
_TAG_OF_ALIAS = {"llama2": pathlib.PurePosixPath(LLAMA2_HUB_ID).name}
_ALIAS_OF_TAG = {tag: alias for alias, tag in _TAG_OF_ALIAS.items()}
_FILE_SUFFIXES = (".model", ".json")
# name-tag, where the tag is a known tag with dashes or a dash-free basename.
_FOLDER_RE = re.compile(r"^(?P<name>.+?)-(?P<tag>Llama-2-7b-hf|mistral-v1|bpe-\d+|[^-]+)$")



def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The data root: ``data_dir`` if given, else ``$DATA_DIR`` (``.env`` honoured), else ./data."""
    if data_dir is None or str(data_dir) == "":
        load_dotenv_once()
        data_dir = os.environ.get("DATA_DIR") or "data"
    return pathlib.Path(data_dir).expanduser().absolute()


def tokenizer_tag(tokenizer: str) -> str:
    """Folder tag of a tokenizer: ``llama2`` -> ``Llama-2-7b-hf``, a path -> its basename."""
    if not tokenizer or not tokenizer.strip():
        raise UserError("tokenizer name is empty")
    if tokenizer in _TAG_OF_ALIAS:
        return _TAG_OF_ALIAS[tokenizer]
    base = pathlib.PurePath(tokenizer.rstrip("/\\")).name
    suffix = pathlib.PurePath(base).suffix
    return base[: -len(suffix)] if suffix in _FILE_SUFFIXES else base


def dataset_dir(data_dir: str | os.PathLike | None, name: str, tokenizer: str) -> pathlib.Path:
    """``{data root}/{name}-{tokenizer tag}``."""
    if not name or any(sep in name for sep in "/\\"):
        raise UserError(f"dataset name {name!r} must be a non-empty plain name (no path separators)")
    return resolve_data_dir(data_dir) / f"{name}-{tokenizer_tag(tokenizer)}"


def creation_command(folder: pathlib.Path) -> str:
    """The ``process_data.py`` command that writes ``folder`` (the inverse of :func:`dataset_dir`)."""
    match = _FOLDER_RE.match(folder.name)
    name, tag = match.group("name", "tag") if match else (folder.name, "bpe-8192")
    command = ["python", "process_data.py", "--name", name, "--tokenizer", _ALIAS_OF_TAG.get(tag, tag)]
    if folder.parent.absolute() != resolve_data_dir():
        command += ["--data-dir", str(folder.parent)]
    return shlex.join(command)


def cache_dir() -> pathlib.Path:
    """Download cache: ``$MUONQ_CACHE``, else ``$XDG_CACHE_HOME/muonq``, else ``~/.cache/muonq``."""
    if os.environ.get("MUONQ_CACHE"):
        return pathlib.Path(os.environ["MUONQ_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (pathlib.Path(xdg).expanduser() if xdg else pathlib.Path.home() / ".cache") / "muonq"
