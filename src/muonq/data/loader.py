"""Reading shards for training: dataset checks, a resumable shuffled loader, fixed validation batches.

Each shard is cut into non-overlapping windows of ``seq_len + 1`` tokens (a window never
crosses a shard; a shard's last ``len % (seq_len + 1)`` tokens are unused). An epoch visits
the shards in a seeded order and each shard's windows in a seeded order (epoch mixed into the
seed), so memory stays at one permutation per open shard however large the dataset. Global
micro-batch ``k`` is the k-th run of ``batch_size`` windows; rank ``r`` reads micro-batches
``r, r + world_size, ...``: ranks are disjoint and together read each window once per epoch.
"""

from __future__ import annotations

import collections
import json
import pathlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from muonq.data.paths import creation_command
from muonq.data.shards import META_FILE, PROGRESS_FILE, SPLITS, VERSION, ShardHeader, list_shards, open_tokens, read_header
from muonq.errors import MissingInputError, UserError

_OPEN_SHARDS = 4  # memory maps kept open (a batch touches one or two shards)


@dataclass(frozen=True)
class DatasetMeta:
    vocab_size: int  # for shards without meta.json (llm.c, original MuonQ): largest id seen + 1
    eos_id: int | None
    tokenizer: str
    train_tokens: int
    val_tokens: int
    bos_id: int | None = None
    format: str = "muonq"  # "muonq", "llm.c" or "muonq-original"
    eos_policy: str = "append"  # EOS after ("append") or before ("prepend") each document


def check_dataset(path: pathlib.Path, *, seq_len: int, model_vocab_size: int) -> DatasetMeta:
    """Fast consistency checks before training; errors name the file and the problem."""
    path = pathlib.Path(path)
    meta_path = path / META_FILE
    if not meta_path.exists() and (path / PROGRESS_FILE).exists():
        raise MissingInputError(
            f"{path} is incomplete (its preparation was interrupted); finish it with `{creation_command(path)}`"
        )
    headers = {split: _split_headers(path, split) for split in SPLITS}
    formats = {h.format for found in headers.values() for h in found}
    if len(formats) > 1:
        raise UserError(f"{path} mixes shard formats {sorted(formats)}")
    fmt = formats.pop()
    if meta_path.exists():
        meta = _read_meta(meta_path, headers)
    elif fmt == "muonq":
        raise MissingInputError(f"{path} has no {META_FILE}: its preparation did not finish; rerun `{creation_command(path)}`")
    else:
        meta = _foreign_meta(fmt, headers)
    if meta.vocab_size > model_vocab_size:
        raise UserError(
            f"{path}: the data's vocab ({meta.vocab_size} ids, tokenizer {meta.tokenizer}) is larger than the model's "
            f"vocab_size {model_vocab_size}; pick a recipe/tokenizer that match"
        )
    for split, found in headers.items():
        longest = max(h.num_tokens for h in found)
        if longest < seq_len + 1:
            raise UserError(
                f"{path}: every {split} shard is shorter than seq_len + 1 = {seq_len + 1} tokens (longest: {longest})"
            )
    return meta


def _missing_dataset(path: pathlib.Path) -> UserError:
    """Why the dataset folder ``path`` (``{data root}/{name}-{tag}``) is not there."""
    root = path.parent
    if root.is_file():
        return UserError(f"the data folder {root} (data_dir or DATA_DIR) is a file; it must be the folder that holds "
                         f"the prepared datasets, such as {path.name}/")
    if (root / META_FILE).is_file():  # data_dir names one prepared dataset instead of the folder above it
        return UserError(f"the data folder {root} (data_dir or DATA_DIR) is itself a prepared dataset (it holds "
                         f"{META_FILE}); set it to the folder that holds the datasets, {root.parent}")
    return MissingInputError(f"dataset folder {path} not found; create it with `{creation_command(path)}`")


def _split_headers(path: pathlib.Path, split: str) -> list[ShardHeader]:
    if not path.is_dir():
        raise _missing_dataset(path)
    headers = [read_header(p) for p in list_shards(path, split)]
    if not headers:
        raise MissingInputError(f"{path} has no {split} shards ({split}_NNNNNN.bin); create them with `{creation_command(path)}`")
    return headers


def _read_meta(meta_path: pathlib.Path, headers: dict[str, list[ShardHeader]]) -> DatasetMeta:
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{meta_path}: not valid JSON ({err})") from err
    try:
        return _meta_from_json(meta_path, meta, headers)
    except (KeyError, TypeError, AttributeError) as err:  # valid JSON of the wrong shape
        raise UserError(f"{meta_path}: not a MuonQ meta.json (missing or malformed {err!r})") from err


def _meta_from_json(meta_path: pathlib.Path, meta: dict, headers: dict[str, list[ShardHeader]]) -> DatasetMeta:
    version, splits = meta["format_version"], meta["splits"]
    vocab_size, eos_id, tokenizer = meta["vocab_size"], meta["eos_id"], meta["tokenizer"]
    if version != VERSION:
        raise UserError(f"{meta_path}: format_version {version} is not supported (expected {VERSION})")
    for split, found in headers.items():
        names = [h.path.name for h in found]
        if names != splits[split]["shards"]:
            raise UserError(f"{meta_path} lists {split} shards {splits[split]['shards']} but the folder has {names}")
        tokens = sum(h.num_tokens for h in found)
        if tokens != splits[split]["tokens"]:
            raise UserError(f"{meta_path}: {split} shards hold {tokens} tokens, meta.json says {splits[split]['tokens']}")
        for h in found:
            if h.vocab_size is not None and h.vocab_size != vocab_size:
                raise UserError(f"{h.path}: header vocab {h.vocab_size} differs from meta.json's {vocab_size}")
    if not isinstance(vocab_size, int) or vocab_size <= 0:
        raise UserError(f"{meta_path}: vocab_size must be a positive integer, got {vocab_size!r}")
    return DatasetMeta(
        vocab_size=vocab_size, eos_id=eos_id, tokenizer=tokenizer, train_tokens=splits["train"]["tokens"],
        val_tokens=splits["val"]["tokens"], bos_id=meta.get("bos_id"), format="muonq",
        eos_policy=meta.get("eos_policy", "append"),
    )  # fmt: skip


def _foreign_meta(fmt: str, headers: dict[str, list[ShardHeader]]) -> DatasetMeta:
    """llm.c / original MuonQ shards record no vocab: take the largest id in the val shards and
    the first train shard (a bounded scan, so the check stays fast on 100-shard datasets)."""
    sample = headers["val"] + headers["train"][:1]
    largest = max((int(open_tokens(h).max()) for h in sample if h.num_tokens), default=0)
    return DatasetMeta(
        vocab_size=largest + 1, eos_id=None, tokenizer=f"unknown ({fmt} shards without {META_FILE})",
        train_tokens=sum(h.num_tokens for h in headers["train"]), val_tokens=sum(h.num_tokens for h in headers["val"]),
        format=fmt, eos_policy=sample[0].eos_policy,
    )  # fmt: skip


def require_windows(path: pathlib.Path, split: str, *, seq_len: int, windows: int, what: str, hint: str) -> None:
    """Raise :class:`UserError` unless ``split`` holds ``windows`` windows of ``seq_len + 1`` tokens
    (``what`` says what needs them, naming the config keys; ``hint`` what to change)."""
    try:
        _Windows(path, split, seq_len).require(windows, what)
    except UserError as err:
        raise UserError(f"{err}; {hint}") from None


class _Windows:
    """A split's shards as windows of ``seq_len + 1`` tokens, read through a few open memory maps."""

    def __init__(self, path: pathlib.Path, split: str, seq_len: int) -> None:
        path = pathlib.Path(path)
        self.headers = _split_headers(path, split)
        self.path, self.split, self.size = path, split, seq_len + 1
        self.counts = np.array([h.num_tokens // self.size for h in self.headers], dtype=np.int64)
        self.total = int(self.counts.sum())
        self._open: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()

    def require(self, windows: int, what: str) -> None:
        if self.total < windows:
            raise UserError(
                f"the {self.split} split of {self.path} has {self.total} windows of seq_len + 1 = {self.size} tokens, "
                f"fewer than {what} ({windows})"
            )

    def _tokens(self, shard: int) -> np.ndarray:
        if shard in self._open:
            self._open.move_to_end(shard)
        else:
            self._open[shard] = open_tokens(self.headers[shard])
            if len(self._open) > _OPEN_SHARDS:
                self._open.popitem(last=False)  # the map closes once unreferenced
        return self._open[shard]

    def gather(self, order: np.ndarray, start: int, count: int, window_ids: Callable[[int], np.ndarray | None]) -> np.ndarray:
        """Windows ``start .. start + count`` of the sequence that visits shards in ``order`` and
        each shard's windows in ``window_ids(shard)`` order (None: file order), as (count, seq_len + 1)."""
        ends = np.cumsum(self.counts[order])
        k = int(np.searchsorted(ends, start, side="right"))
        rows = []
        while count > 0:
            shard = int(order[k])
            low = start - int(ends[k] - self.counts[shard])
            take = min(count, int(self.counts[shard]) - low)
            ids = window_ids(shard)
            ids = np.arange(low, low + take) if ids is None else ids[low : low + take]
            offsets = ids[:, None] * self.size + np.arange(self.size)
            rows.append(np.asarray(self._tokens(shard)[offsets]))
            start, count, k = start + take, count - take, k + 1
        return rows[0] if len(rows) == 1 else np.concatenate(rows)


def _as_batch(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(rows[:, :-1].astype(np.int64)), torch.from_numpy(rows[:, 1:].astype(np.int64))


def _check_layout(*, batch_size: int, seq_len: int, rank: int, world_size: int) -> None:
    # argument checks for direct callers (plain ValueError); a run's values were checked by config validation
    for key, value in (("batch_size", batch_size), ("seq_len", seq_len), ("world_size", world_size)):
        if value < 1:
            raise ValueError(f"{key} must be >= 1, got {value}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")


class TokenLoader:
    """Shuffled training batches whose whole state is a few integers (see the module docstring)."""

    def __init__(
        self, path: pathlib.Path, split: str, *, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1, seed: int = 0
    ) -> None:
        _check_layout(batch_size=batch_size, seq_len=seq_len, rank=rank, world_size=world_size)
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self._windows = _Windows(path, split, seq_len)
        self._step = batch_size * world_size  # windows per global micro-batch
        self._windows.require(self._step, f"one global batch (batch_size {batch_size} x world_size {world_size})")
        self.batch_size, self.seq_len, self.rank, self.world_size, self.seed = batch_size, seq_len, rank, world_size, seed
        self._epoch = 0
        self._position = 0  # windows of this epoch already read (by all ranks)
        self._order_epoch = -1
        self._order = np.empty(0, dtype=np.int64)
        self._perms: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()

    @property
    def epoch(self) -> int:
        return self._epoch

    def _rng(self, kind: int, shard: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self._epoch, kind, shard])

    def _window_perm(self, shard: int) -> np.ndarray:
        if shard not in self._perms:
            self._perms[shard] = self._rng(1, shard).permutation(int(self._windows.counts[shard]))
            if len(self._perms) > _OPEN_SHARDS:
                self._perms.popitem(last=False)
        return self._perms[shard]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), int64 of shape (batch_size, seq_len); targets are inputs shifted by one."""
        if self._position + self._step > self._windows.total:  # the remainder of an epoch is dropped
            self._epoch, self._position = self._epoch + 1, 0
        if self._order_epoch != self._epoch:
            self._order = self._rng(0, 0).permutation(len(self._windows.counts))
            self._order_epoch = self._epoch
            self._perms.clear()
        start = self._position + self.rank * self.batch_size
        rows = self._windows.gather(self._order, start, self.batch_size, self._window_perm)
        self._position += self._step
        return _as_batch(rows)

    def state_dict(self) -> dict[str, int]:
        """The same on every rank; ``position`` counts windows read by all ranks this epoch."""
        return {
            "epoch": self._epoch, "position": self._position, "seed": self.seed, "seq_len": self.seq_len,
            "windows": self._windows.total,
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, int]) -> None:
        mine = {"seed": self.seed, "seq_len": self.seq_len, "windows": self._windows.total}
        for key, value in mine.items():
            if state.get(key) != value:
                raise UserError(f"loader state has {key}={state.get(key)}, this loader {key}={value}: not the same data stream")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self._windows.total or position % self._step:
            raise UserError(
                f"loader state epoch={epoch} position={position} does not fit batch_size x world_size = {self._step} "
                f"and {self._windows.total} windows; resume with the same global batch"
            )
        self._epoch, self._position = epoch, position


def validation_batches(
    path: pathlib.Path, *, batch_size: int, seq_len: int, max_tokens: int, rank: int = 0, world_size: int = 1
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The first windows of the val split in file order: the same batches on every call.

    ``max_tokens`` (0: the whole split) counts predicted tokens across all ranks; at least one
    global batch is read. Every rank yields the same number of batches, from disjoint windows.
    """
    _check_layout(batch_size=batch_size, seq_len=seq_len, rank=rank, world_size=world_size)
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
    windows = _Windows(path, "val", seq_len)
    step = batch_size * world_size
    windows.require(step, f"one global batch (batch_size {batch_size} x world_size {world_size})")
    steps = windows.total // step
    if max_tokens:
        steps = min(steps, max(1, max_tokens // (step * seq_len)))
    order = np.arange(len(windows.counts))

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for k in range(steps):
            yield _as_batch(windows.gather(order, k * step + rank * batch_size, batch_size, lambda shard: None))

    return batches()
