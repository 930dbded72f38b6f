"""The binary shard format: a 256 x int32 header, then the tokens. Reading, writing, listing.

MuonQ shards (magic 20251123, version 1): header[2] token count, [3] bytes per token (2 or 4),
[4] vocab size, [5] EOS id; tokens are uint16 when the vocab has <= 65535 ids, else uint32.
The reader also takes the shards users already have (token count always at header[2]):
llm.c / modded-nanogpt (20240520 v1 uint16, 20240801 v7 uint32) and the original MuonQ
repository's (20250401 v1 uint16, EOS *before* each document).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from muonq.errors import UserError

MAGIC = 20251123
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
SPLITS = ("train", "val")
META_FILE = "meta.json"  # written last by prepare(): a MuonQ dataset without it is incomplete
PROGRESS_FILE = "progress.json"  # present while prepare() runs or after it was interrupted
TEMP_SUFFIX = ".tmp"
# Reader-visible shards; writers' temp files (".<name>.<pid>.tmp") never match.
_SHARD_RE = re.compile(r"^(?:.+_)?(train|val)_(\d{6})\.bin$")


@dataclass(frozen=True)
class _Format:
    name: str
    version: int
    dtype: np.dtype | None  # None: from the header (MuonQ's own format)
    eos_policy: str  # where the EOS separator sits relative to each document


_FORMATS = {
    MAGIC: _Format("muonq", VERSION, None, "append"),
    20240520: _Format("llm.c", 1, np.dtype(np.uint16), "prepend"),
    20240801: _Format("llm.c", 7, np.dtype(np.uint32), "prepend"),
    20250401: _Format("muonq-original", 1, np.dtype(np.uint16), "prepend"),
}


@dataclass(frozen=True)
class ShardHeader:
    path: pathlib.Path
    format: str  # "muonq", "llm.c" or "muonq-original"
    num_tokens: int
    dtype: np.dtype
    vocab_size: int | None  # only MuonQ shards record these two
    eos_id: int | None
    eos_policy: str


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65535), else uint32."""
    if vocab_size < 1:
        raise ValueError(f"vocab size must be positive, got {vocab_size}")
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


def parse_header(raw: bytes, *, file_size: int, path: pathlib.Path) -> ShardHeader:
    """Validate a header against the file size; a :class:`UserError` names the file and the problem."""
    if len(raw) < HEADER_BYTES:
        raise UserError(f"{path}: truncated header ({len(raw)} of {HEADER_BYTES} bytes)")
    header = np.frombuffer(raw[:HEADER_BYTES], dtype="<i4")
    magic, version, count = (int(v) for v in header[:3])
    fmt = _FORMATS.get(magic)
    if fmt is None:
        known = ", ".join(f"{m} ({f.name} v{f.version})" for m, f in _FORMATS.items())
        raise UserError(f"{path}: unknown magic number {magic}; expected one of {known}")
    if version != fmt.version:
        raise UserError(f"{path}: {fmt.name} shard version {version} is not supported (expected {fmt.version})")
    if count < 0:
        raise UserError(f"{path}: negative token count {count} in header")
    vocab_size = eos_id = None
    dtype = fmt.dtype
    if dtype is None:
        itemsize, vocab_size, eos_id = (int(v) for v in header[3:6])
        if vocab_size < 1:
            raise UserError(f"{path}: vocab size {vocab_size} in header must be positive")
        dtype = token_dtype(vocab_size)
        if itemsize != dtype.itemsize:
            raise UserError(f"{path}: header says {itemsize} bytes per token, vocab {vocab_size} needs {dtype.itemsize}")
        if not 0 <= eos_id < vocab_size:
            raise UserError(f"{path}: EOS id {eos_id} outside the vocab [0, {vocab_size})")
    expected = HEADER_BYTES + count * dtype.itemsize
    if file_size != expected:
        raise UserError(
            f"{path}: file is {file_size} bytes but its header promises {count} tokens ({expected} bytes): "
            "truncated or corrupt shard"
        )
    return ShardHeader(path, fmt.name, count, dtype, vocab_size, eos_id, fmt.eos_policy)


def read_header(path: str | os.PathLike) -> ShardHeader:
    path = pathlib.Path(path)
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
        size = os.fstat(f.fileno()).st_size
    return parse_header(raw, file_size=size, path=path)


def open_tokens(header: ShardHeader) -> np.ndarray:
    """The shard's tokens, memory-mapped read-only (an empty array for an empty shard)."""
    if header.num_tokens == 0:
        return np.empty(0, dtype=header.dtype)
    return np.memmap(header.path, dtype=header.dtype, mode="r", offset=HEADER_BYTES, shape=(header.num_tokens,))


@contextlib.contextmanager
def atomic_writer(path: pathlib.Path) -> Iterator[BinaryIO]:
    """Write to a hidden temp file in the same folder, then rename over ``path``.

    An interruption leaves at most the temp file, which readers ignore and the next
    ``prepare`` removes, never a partial file under the final name.
    """
    temp = path.with_name(f".{path.name}.{os.getpid()}{TEMP_SUFFIX}")
    try:
        with open(temp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def remove_temp_files(folder: pathlib.Path) -> None:
    for temp in folder.glob(f".*{TEMP_SUFFIX}"):
        temp.unlink(missing_ok=True)


def write_shard(path: pathlib.Path, tokens: np.ndarray, *, vocab_size: int, eos_id: int) -> None:
    """Write a MuonQ shard atomically, after checking every id against the vocab."""
    dtype = token_dtype(vocab_size)
    if not 0 <= eos_id < vocab_size:
        raise UserError(f"{path.name}: the tokenizer's EOS id {eos_id} is outside its vocab [0, {vocab_size})")
    if tokens.size >= 2**31:
        raise ValueError(f"{path.name}: {tokens.size} tokens do not fit the int32 count; use smaller shards")
    if tokens.size:
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= vocab_size:
            bad = high if high >= vocab_size else low
            raise UserError(f"{path.name}: token id {bad} outside the tokenizer's vocab [0, {vocab_size})")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:6] = (MAGIC, VERSION, tokens.size, dtype.itemsize, vocab_size, eos_id)
    with atomic_writer(path) as f:
        f.write(header.tobytes())
        f.write(np.ascontiguousarray(tokens, dtype=dtype.newbyteorder("<")).data)


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.bin"


def list_shards(folder: pathlib.Path, split: str) -> list[pathlib.Path]:
    """The split's shards in index order (any ``prefix_`` allowed, as in llm.c's ``fineweb_train_000001.bin``)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    found = []
    for path in folder.iterdir():
        match = _SHARD_RE.match(path.name)
        if match and match.group(1) == split:
            found.append((int(match.group(2)), path.name, path))
    return [path for _, _, path in sorted(found)]
