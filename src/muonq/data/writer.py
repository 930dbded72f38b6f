"""Cut one split's token stream into shards, remembering enough to resume after an interruption."""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from muonq.data.shards import shard_name, write_shard


@dataclass
class SplitState:
    """What of a split is on disk. Documents are numbered by their ordinal in the source."""

    shards: list[str] = field(default_factory=list)
    tokens: int = 0
    documents: int = 0  # documents with at least one token on disk
    resume_doc: int = 0  # first document not entirely on disk ...
    resume_offset: int = 0  # ... and how many of its tokens are
    closed_at: int | None = None  # split full: documents from this ordinal on are not taken


class SplitWriter:
    """Buffers one split's tokens and writes a shard every ``shard_tokens``.

    After a resume the source is replayed from an earlier document; whatever is already on
    disk (documents before ``resume_doc`` and the first ``resume_offset`` tokens of it) is
    dropped, so the shards come out exactly as in an uninterrupted run.
    """

    def __init__(
        self,
        folder: pathlib.Path,
        split: str,
        *,
        first_index: int,
        shard_tokens: int,
        vocab_size: int,
        eos_id: int,
        state: SplitState,
        on_flush: Callable[[], None],
        max_shards: int | None = None,
        max_tokens: int | None = None,
    ) -> None:
        self.folder, self.split, self.first_index = folder, split, first_index
        self.shard_tokens, self.max_shards, self.max_tokens = shard_tokens, max_shards, max_tokens
        self.vocab_size, self.eos_id = vocab_size, eos_id
        self.state, self.on_flush = state, on_flush
        self.documents = state.documents
        self._buffer = np.empty(shard_tokens, dtype=np.uint32)  # pages are committed only as they fill
        self._fill = 0

    @property
    def tokens(self) -> int:
        return self.state.tokens + self._fill

    @property
    def full(self) -> bool:
        return self.state.closed_at is not None or (self.max_tokens is not None and self.tokens >= self.max_tokens)

    def accepts(self, ordinal: int, length: int) -> bool:
        """Whether document ``ordinal`` of ``length`` tokens belongs here; a split capped at
        ``max_shards`` closes at the first whole document that no longer fits."""
        if self.state.closed_at is not None:
            return ordinal < self.state.closed_at
        if self.max_shards is None or self.tokens + length <= self.max_shards * self.shard_tokens:
            return True
        self._close(ordinal)
        return False

    def add(self, ordinal: int, tokens: np.ndarray) -> int:
        """Append one document's tokens; returns how many were newly taken."""
        state = self.state
        if ordinal < state.resume_doc or self.full:
            return 0
        offset = state.resume_offset if ordinal == state.resume_doc else 0
        tokens = tokens[offset:]
        if self.max_tokens is not None:
            tokens = tokens[: self.max_tokens - self.tokens]
        if offset == 0 and len(tokens):
            self.documents += 1
        pos = 0
        while pos < len(tokens):
            take = min(len(tokens) - pos, self.shard_tokens - self._fill)
            self._buffer[self._fill : self._fill + take] = tokens[pos : pos + take]
            self._fill += take
            pos += take
            if self._fill == self.shard_tokens:
                finished = pos == len(tokens)
                if self.max_shards is not None and len(state.shards) + 1 >= self.max_shards:
                    assert finished, "accepts() admits only documents that fit whole"
                    state.closed_at = ordinal + 1
                self._flush(ordinal + 1 if finished else ordinal, 0 if finished else offset + pos)
        return len(tokens)

    def finish(self) -> None:
        """Write the last, partial shard."""
        if self._fill:
            self._flush(self.state.resume_doc, self.state.resume_offset)
        self.state.documents = self.documents

    def _close(self, ordinal: int) -> None:
        self.state.closed_at = ordinal
        if self._fill:
            self._flush(ordinal, 0)
        else:
            self.state.resume_doc, self.state.resume_offset = ordinal, 0
            self.on_flush()

    def _flush(self, resume_doc: int, resume_offset: int) -> None:
        state = self.state
        name = shard_name(self.split, self.first_index + len(state.shards))
        write_shard(self.folder / name, self._buffer[: self._fill], vocab_size=self.vocab_size, eos_id=self.eos_id)
        state.shards.append(name)
        state.tokens += self._fill
        state.documents = self.documents
        state.resume_doc, state.resume_offset = resume_doc, resume_offset
        self._fill = 0
        self.on_flush()
