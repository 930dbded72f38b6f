"""Shard format: MuonQ shards, the foreign formats the reader accepts, malformed headers."""

from __future__ import annotations

import os
import pathlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from muonq.data.shards import (
    HEADER_BYTES,
    MAGIC,
    list_shards,
    open_tokens,
    parse_header,
    read_header,
    token_dtype,
    write_shard,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def write_foreign(path: pathlib.Path, magic: int, version: int, tokens: np.ndarray) -> None:
    """A shard as llm.c / modded-nanogpt / the original MuonQ write it: count at [2], nothing else."""
    header = np.zeros(256, dtype="<i4")
    header[:3] = (magic, version, len(tokens))
    path.write_bytes(header.tobytes() + tokens.tobytes())


@pytest.mark.parametrize(("vocab", "dtype"), [(8192, np.uint16), (65535, np.uint16), (65536, np.uint32), (128256, np.uint32)])
def test_roundtrip_picks_width_from_vocab(tmp_path: pathlib.Path, vocab: int, dtype: type) -> None:
    tokens = np.array([0, 1, vocab - 1, 7, vocab // 2], dtype=np.uint32)
    path = tmp_path / "train_000001.bin"
    write_shard(path, tokens, vocab_size=vocab, eos_id=vocab - 1)
    header = read_header(path)
    assert (header.format, header.dtype, header.num_tokens) == ("muonq", np.dtype(dtype), 5)
    assert (header.vocab_size, header.eos_id, header.eos_policy) == (vocab, vocab - 1, "append")
    assert path.stat().st_size == HEADER_BYTES + 5 * np.dtype(dtype).itemsize
    np.testing.assert_array_equal(open_tokens(header), tokens)
    assert token_dtype(vocab) == np.dtype(dtype)


def test_write_rejects_ids_outside_vocab(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="token id 70000 outside the tokenizer's vocab"):
        write_shard(tmp_path / "train_000001.bin", np.array([1, 70000], dtype=np.uint32), vocab_size=65536, eos_id=0)
    assert not list(tmp_path.iterdir())  # nothing written, not even a temp file


@pytest.mark.parametrize(
    ("magic", "version", "dtype", "fmt", "name"),
    [
        (20240520, 1, np.uint16, "llm.c", "fineweb_train_000001.bin"),  # llm.c gpt-2 / modded-nanogpt
        (20240801, 7, np.uint32, "llm.c", "fineweb_train_000001.bin"),  # llm.c llama-3
        (20250401, 1, np.uint16, "muonq-original", "train_000001.bin"),  # the original MuonQ repo
    ],
)
def test_reads_foreign_shards(tmp_path: pathlib.Path, magic: int, version: int, dtype: type, fmt: str, name: str) -> None:
    tokens = np.array([50256, 10, 20, 30, 50256, 40], dtype=dtype)
    write_foreign(tmp_path / name, magic, version, tokens)
    [path] = list_shards(tmp_path, "train")
    header = read_header(path)
    assert (header.format, header.dtype, header.num_tokens, header.eos_policy) == (fmt, np.dtype(dtype), 6, "prepend")
    assert header.vocab_size is None and header.eos_id is None
    np.testing.assert_array_equal(open_tokens(header), tokens)


def test_list_shards_orders_and_ignores_temp_files(tmp_path: pathlib.Path) -> None:
    names = ["train_000002.bin", "train_000001.bin", "val_000000.bin", ".train_000003.bin.99.tmp", "notes.txt", "train_1.bin"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in list_shards(tmp_path, "train")] == ["train_000001.bin", "train_000002.bin"]
    assert [p.name for p in list_shards(tmp_path, "val")] == ["val_000000.bin"]
    with pytest.raises(ValueError, match="split must be one of"):
        list_shards(tmp_path, "test")


@pytest.mark.parametrize(
    ("header", "payload", "message"),
    [
        ((12345, 1, 0), 0, "unknown magic number 12345"),
        ((MAGIC, 2, 0, 2, 100, 0), 0, "version 2 is not supported"),
        ((20240520, 7, 0), 0, "version 7 is not supported"),
        ((MAGIC, 1, 10, 2, 100, 0), 18, "truncated or corrupt"),
        ((MAGIC, 1, 10, 2, 100, 0), 22, "truncated or corrupt"),
        ((MAGIC, 1, 1, 4, 100, 0), 4, "bytes per token"),
        ((MAGIC, 1, 1, 2, 100, 100), 2, "EOS id 100 outside"),
        ((MAGIC, 1, -5, 2, 100, 0), 0, "negative token count"),
    ],
)
def test_bad_headers_name_file_and_problem(tmp_path: pathlib.Path, header: tuple, payload: int, message: str) -> None:
    raw = np.zeros(256, dtype="<i4")
    raw[: len(header)] = header
    path = tmp_path / "val_000000.bin"
    path.write_bytes(raw.tobytes() + b"\0" * payload)
    with pytest.raises(ValueError, match=message) as err:
        read_header(path)
    assert str(path) in str(err.value)


def test_short_file_is_a_truncated_header(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "train_000001.bin"
    path.write_bytes(b"\x01" * 100)
    with pytest.raises(ValueError, match="truncated header"):
        read_header(path)


_MAGICS = st.sampled_from([MAGIC, 20240520, 20240801, 20250401]) | st.integers(-(2**31), 2**31 - 1)
_INT32 = st.integers(-(2**31), 2**31 - 1)


@settings(max_examples=400, deadline=None)
@given(
    magic=_MAGICS,
    version=st.sampled_from([1, 7]) | _INT32,
    count=st.integers(-10, 100) | _INT32,
    itemsize=st.sampled_from([2, 4]) | _INT32,
    vocab=st.sampled_from([1, 8192, 65535, 65536, 2**20]) | _INT32,
    eos=st.integers(-2, 10) | _INT32,
    payload=st.integers(0, 500),
    cut=st.integers(0, HEADER_BYTES + 8),
)
def test_parse_header_never_misreads(magic, version, count, itemsize, vocab, eos, payload, cut) -> None:
    """Any header either parses into something consistent with the file size or raises ValueError."""
    raw = np.zeros(256, dtype="<i4")
    raw[:6] = (magic, version, count, itemsize, vocab, eos)
    data = raw.tobytes()[: HEADER_BYTES - cut] if cut < HEADER_BYTES else raw.tobytes()
    size = len(data) + payload
    try:
        header = parse_header(data, file_size=size, path=pathlib.Path("x.bin"))
    except ValueError:
        return
    assert len(data) == HEADER_BYTES
    assert size == HEADER_BYTES + header.num_tokens * header.dtype.itemsize
    assert header.num_tokens >= 0 and header.dtype in (np.dtype(np.uint16), np.dtype(np.uint32))
    if header.format == "muonq":
        assert 0 <= header.eos_id < header.vocab_size and header.dtype == token_dtype(header.vocab_size)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tokens=st.lists(st.integers(0, 65535), max_size=64), keep=st.integers(0, 2000))
def test_any_truncation_of_a_real_shard_is_caught(tmp_path: pathlib.Path, tokens: list[int], keep: int) -> None:
    path = tmp_path / "train_000001.bin"
    write_shard(path, np.array(tokens, dtype=np.uint32), vocab_size=65536, eos_id=0)
    full = path.read_bytes()
    path.write_bytes(full[:keep])
    if keep >= len(full):
        np.testing.assert_array_equal(open_tokens(read_header(path)), tokens)
    else:
        with pytest.raises(ValueError, match="truncated"):
            read_header(path)
