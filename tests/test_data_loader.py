"""Loader: batches, seeded order, exact resume (1 and 2 ranks), validation windows, dataset checks."""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np
import pytest
import torch

from muonq.data import DatasetMeta, TokenLoader, check_dataset, dataset_dir, resolve_data_dir, tokenizer_tag, validation_batches
from muonq.data.paths import creation_command
from muonq.data.shards import write_shard

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

VOCAB = 2**24  # uint32 shards whose tokens are globally unique: a window is named by its first token
SEQ = 15  # windows of 16 tokens
TRAIN_SIZES = (1000, 500, 333, 40)  # 62 + 31 + 20 + 2 = 115 windows
VAL_SIZES = (170, 90)  # 10 + 5 windows


def make_dataset(folder: pathlib.Path, train_sizes=TRAIN_SIZES, val_sizes=VAL_SIZES, *, vocab: int = VOCAB) -> pathlib.Path:
    folder.mkdir(parents=True)
    start = 0
    splits = {}
    for split, sizes, first in (("val", val_sizes, 0), ("train", train_sizes, 1)):
        names = []
        for i, size in enumerate(sizes):
            name = f"{split}_{first + i:06d}.bin"
            write_shard(folder / name, np.arange(start, start + size, dtype=np.uint32) % vocab, vocab_size=vocab, eos_id=0)
            names.append(name)
            start += size
        splits[split] = {"tokens": sum(sizes), "documents": 1, "shards": names}
    meta = {"format_version": 1, "vocab_size": vocab, "eos_id": 0, "bos_id": None, "tokenizer": "synthetic", "splits": splits}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture
def data(tmp_path: pathlib.Path) -> pathlib.Path:
    return make_dataset(tmp_path / "synthetic-bpe-8192")


def window_ids(x: torch.Tensor) -> list[int]:
    return x[:, 0].tolist()


def valid_window_starts(sizes: tuple[int, ...], offset: int) -> set[int]:
    starts, base = set(), offset
    for size in sizes:
        starts |= {base + w * (SEQ + 1) for w in range(size // (SEQ + 1))}
        base += size
    return starts


def test_batches_are_windows_with_shifted_targets(data: pathlib.Path) -> None:
    loader = TokenLoader(data, "train", batch_size=4, seq_len=SEQ, seed=1)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (4, SEQ) and x.dtype == y.dtype == torch.int64
    torch.testing.assert_close(x[:, 1:], y[:, :-1])
    torch.testing.assert_close(y[:, -1], x[:, 0] + SEQ)  # consecutive tokens inside one window


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_are_disjoint_and_cover_each_epoch_once(data: pathlib.Path, world: int) -> None:
    batch = 4
    loaders = [TokenLoader(data, "train", batch_size=batch, seq_len=SEQ, rank=r, world_size=world, seed=5) for r in range(world)]
    steps = sum(TRAIN_SIZES[i] // (SEQ + 1) for i in range(4)) // (batch * world)
    epochs = []
    for _ in range(2):
        seen = [w for _ in range(steps) for loader in loaders for w in window_ids(loader.next_batch()[0])]
        assert len(seen) == len(set(seen)) == steps * batch * world
        assert set(seen) <= valid_window_starts(TRAIN_SIZES, sum(VAL_SIZES))
        assert all(loader.epoch == len(epochs) for loader in loaders)
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # a new order each epoch
    loaders[0].next_batch()
    assert loaders[0].epoch == 2


def test_order_is_seeded(data: pathlib.Path) -> None:
    def first(seed: int) -> list[int]:
        loader = TokenLoader(data, "train", batch_size=8, seq_len=SEQ, seed=seed)
        return [w for _ in range(5) for w in window_ids(loader.next_batch()[0])]

    assert first(3) == first(3)
    assert first(3) != first(4)


@pytest.mark.parametrize("world", [1, 2])
def test_exact_resume(data: pathlib.Path, world: int) -> None:
    """A loader restored from state_dict reads exactly what the uninterrupted one reads, across epochs."""
    def make(rank: int) -> TokenLoader:
        return TokenLoader(data, "train", batch_size=3, seq_len=SEQ, rank=rank, world_size=world, seed=11)

    for cut in (0, 7, 19, 25):  # 19 steps per epoch for world 2 (38 for world 1)
        runs = [make(r) for r in range(world)]
        reference = [[r.next_batch() for _ in range(45)] for r in runs]
        runs = [make(r) for r in range(world)]
        for r in runs:
            for _ in range(cut):
                r.next_batch()
        states = [r.state_dict() for r in runs]
        assert all(s == states[0] for s in states)  # one state for every rank
        resumed = [make(r) for r in range(world)]
        for loader in resumed:
            loader.load_state_dict(json.loads(json.dumps(states[0])))  # as stored in a checkpoint
        for rank, loader in enumerate(resumed):
            for step in range(cut, 45):
                x, y = loader.next_batch()
                torch.testing.assert_close(x, reference[rank][step][0])
                torch.testing.assert_close(y, reference[rank][step][1])


def test_resume_rejects_another_stream(data: pathlib.Path) -> None:
    state = TokenLoader(data, "train", batch_size=4, seq_len=SEQ, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed=1, this loader seed=2"):
        TokenLoader(data, "train", batch_size=4, seq_len=SEQ, seed=2).load_state_dict(state)
    loader = TokenLoader(data, "train", batch_size=4, seq_len=SEQ, seed=1)
    loader.next_batch()
    with pytest.raises(ValueError, match="same global batch"):
        TokenLoader(data, "train", batch_size=3, seq_len=SEQ, seed=1).load_state_dict(loader.state_dict())


def test_bad_loader_arguments(data: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="fewer than one global batch"):
        TokenLoader(data, "val", batch_size=16, seq_len=SEQ)
    with pytest.raises(ValueError, match="rank must be in"):
        TokenLoader(data, "train", batch_size=2, seq_len=SEQ, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        TokenLoader(data, "train", batch_size=0, seq_len=SEQ)
    with pytest.raises(ValueError, match="split must be one of"):
        TokenLoader(data, "test", batch_size=2, seq_len=SEQ)


def test_open_memory_maps_stay_bounded(tmp_path: pathlib.Path) -> None:
    data = make_dataset(tmp_path / "many-gpt2", train_sizes=(64,) * 40, val_sizes=(64,))
    loader = TokenLoader(data, "train", batch_size=2, seq_len=SEQ, seed=0)
    for _ in range(100):
        loader.next_batch()
    fds = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    for _ in range(3000):  # ~37 epochs over 40 shards
        loader.next_batch()
    assert len(loader._windows._open) <= 4
    if fds is not None:  # each open map holds one descriptor; evicted maps release theirs
        assert len(os.listdir("/proc/self/fd")) <= fds


def test_validation_batches_are_fixed_and_split_across_ranks(data: pathlib.Path) -> None:
    def run(rank: int, world: int, max_tokens: int) -> list[list[int]]:
        batches = validation_batches(data, batch_size=2, seq_len=SEQ, max_tokens=max_tokens, rank=rank, world_size=world)
        return [window_ids(x) for x, _ in batches]

    whole = run(0, 1, 0)
    assert whole == run(0, 1, 0)  # the same windows on every call
    assert len(whole) == 7  # 15 windows // 2
    assert [w for b in whole for w in b] == sorted(valid_window_starts(VAL_SIZES, 0))[:14]  # file order
    assert len(run(0, 1, 4 * 2 * SEQ)) == 4  # max_tokens counts predicted tokens
    assert len(run(0, 1, 1)) == 1  # at least one batch
    ranks = [run(r, 2, 0) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 3  # same number of batches on every rank
    flat = [w for r in ranks for b in r for w in b]
    assert len(flat) == len(set(flat)) == 12
    assert set(flat) == {w for b in whole[:6] for w in b}  # together: the single-process windows
    with pytest.raises(ValueError, match="fewer than one global batch"):
        validation_batches(data, batch_size=8, seq_len=SEQ, max_tokens=0, world_size=2)


def test_check_dataset_reports_meta(data: pathlib.Path) -> None:
    meta = check_dataset(data, seq_len=SEQ, model_vocab_size=VOCAB)
    assert meta == DatasetMeta(
        vocab_size=VOCAB, eos_id=0, tokenizer="synthetic", train_tokens=sum(TRAIN_SIZES), val_tokens=sum(VAL_SIZES)
    )


def test_check_dataset_errors(data: pathlib.Path, tmp_path: pathlib.Path) -> None:
    with pytest.raises(FileNotFoundError, match="python process_data.py --name fineweb100B --tokenizer llama2"):
        check_dataset(dataset_dir(tmp_path, "fineweb100B", "llama2"), seq_len=SEQ, model_vocab_size=32000)
    # a data root that is a file, or that names one prepared dataset instead of the folder above it
    (tmp_path / "afile").write_text("")
    with pytest.raises(ValueError, match=rf"the data folder {tmp_path}/afile \(data_dir or DATA_DIR\) is a file"):
        check_dataset(dataset_dir(tmp_path / "afile", "synthetic", "bpe-8192"), seq_len=SEQ, model_vocab_size=VOCAB)
    with pytest.raises(ValueError, match=rf"{data} \(data_dir or DATA_DIR\) is itself a prepared dataset \(it holds "
                                         rf"meta.json\); set it to the folder that holds the datasets, {tmp_path}$"):
        check_dataset(dataset_dir(data, "synthetic", "bpe-8192"), seq_len=SEQ, model_vocab_size=VOCAB)
    with pytest.raises(ValueError, match="larger than the model's vocab_size 32000"):
        check_dataset(data, seq_len=SEQ, model_vocab_size=32000)
    with pytest.raises(ValueError, match=r"every train shard is shorter than seq_len \+ 1 = 1025"):
        check_dataset(data, seq_len=1024, model_vocab_size=VOCAB)
    shard = data / "train_000002.bin"
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(ValueError, match="train_000002.bin: file is .* truncated or corrupt"):
        check_dataset(data, seq_len=SEQ, model_vocab_size=VOCAB)
    shard.write_bytes(b"\0" * 2048)
    with pytest.raises(ValueError, match="train_000002.bin: unknown magic number 0"):
        check_dataset(data, seq_len=SEQ, model_vocab_size=VOCAB)
    shard.unlink()
    with pytest.raises(ValueError, match="lists train shards"):
        check_dataset(data, seq_len=SEQ, model_vocab_size=VOCAB)
    (data / "meta.json").unlink()
    with pytest.raises(FileNotFoundError, match="no meta.json: its preparation did not finish"):
        check_dataset(data, seq_len=SEQ, model_vocab_size=VOCAB)


def test_check_dataset_without_val(tmp_path: pathlib.Path) -> None:
    folder = tmp_path / "d-gpt2"
    folder.mkdir()
    write_shard(folder / "train_000001.bin", np.arange(100, dtype=np.uint32), vocab_size=256, eos_id=0)
    with pytest.raises(FileNotFoundError, match="has no val shards"):
        check_dataset(folder, seq_len=SEQ, model_vocab_size=256)


@pytest.mark.parametrize(
    ("magic", "version", "dtype"), [(20240520, 1, np.uint16), (20240801, 7, np.uint32), (20250401, 1, np.uint16)]
)
def test_foreign_shards_train_without_meta(tmp_path: pathlib.Path, magic: int, version: int, dtype: type) -> None:
    """llm.c / modded-nanogpt / original MuonQ folders: EOS before each document, no meta.json."""
    folder = tmp_path / "fineweb10B-gpt2"
    folder.mkdir()
    rng = np.random.default_rng(0)
    streams = {}
    for split, index, n in (("val", 0, 300), ("train", 1, 700), ("train", 2, 500)):
        tokens = rng.integers(0, 50256, n).astype(dtype)
        tokens[::50] = 50256  # EOS before each 49-token document
        header = np.zeros(256, dtype="<i4")
        header[:3] = (magic, version, n)
        (folder / f"fineweb_{split}_{index:06d}.bin").write_bytes(header.tobytes() + tokens.tobytes())
        streams.setdefault(split, []).append(tokens)
    meta = check_dataset(folder, seq_len=SEQ, model_vocab_size=50257)
    assert (meta.vocab_size, meta.eos_id, meta.train_tokens, meta.val_tokens) == (50257, None, 1200, 300)
    assert meta.eos_policy == "prepend" and meta.format in ("llm.c", "muonq-original")
    x, y = next(validation_batches(folder, batch_size=2, seq_len=SEQ, max_tokens=0))
    val = streams["val"][0].astype(np.int64)
    np.testing.assert_array_equal(x.numpy(), val[:32].reshape(2, 16)[:, :-1])
    np.testing.assert_array_equal(y.numpy(), val[:32].reshape(2, 16)[:, 1:])
    loader = TokenLoader(folder, "train", batch_size=4, seq_len=SEQ)
    train = [s.astype(np.int64) for s in streams["train"]]
    windows = {tuple(s[w * 16 : (w + 1) * 16]) for s in train for w in range(len(s) // 16)}
    for _ in range(5):
        x, y = loader.next_batch()
        for row_x, row_y in zip(x.numpy(), y.numpy(), strict=True):
            assert tuple(row_x) + (row_y[-1],) in windows


def test_paths(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert tokenizer_tag("llama2") == "Llama-2-7b-hf"
    assert [tokenizer_tag(t) for t in ("gpt2", "mistral-v1", "bpe-8192")] == ["gpt2", "mistral-v1", "bpe-8192"]
    assert tokenizer_tag("/models/tok/spm.model") == "spm" and tokenizer_tag("./my_tokenizer/") == "my_tokenizer"
    assert tokenizer_tag("meta-llama/Llama-2-7b-hf") == "Llama-2-7b-hf"
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "root"))
    assert resolve_data_dir() == tmp_path / "root"
    assert resolve_data_dir(tmp_path / "x") == tmp_path / "x"
    assert dataset_dir(None, "fineweb100B", "llama2") == tmp_path / "root" / "fineweb100B-Llama-2-7b-hf"
    monkeypatch.delenv("DATA_DIR")
    monkeypatch.chdir(tmp_path)
    assert resolve_data_dir() == tmp_path / "data"
    command = creation_command(tmp_path / "data" / "my-data-bpe-4096")
    assert command == "python process_data.py --name my-data --tokenizer bpe-4096"
    assert creation_command(tmp_path / "elsewhere" / "fineweb10B-gpt2").endswith(f"--data-dir {tmp_path / 'elsewhere'}")
    with pytest.raises(ValueError, match="plain name"):
        dataset_dir(None, "a/b", "gpt2")
