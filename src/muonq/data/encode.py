"""Parallel tokenization: document batches in, token batches out, in input order."""

from __future__ import annotations

import collections
import multiprocessing
import os
import pathlib
import signal
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from muonq.data.sources import Document
from muonq.data.tokenizers import Tokenizer, load_tokenizer

BATCH_CHARS = 1 << 18  # ~256 KB of text per task: small enough to balance workers, big enough to amortize IPC
BATCH_DOCS = 4096


@dataclass(frozen=True)
class DocumentBatch:
    first: int  # source ordinal of texts[0]
    texts: list[str]
    splits: list[str]


@dataclass(frozen=True)
class TokenizedBatch:
    first: int
    splits: list[str]
    tokens: np.ndarray  # uint32; every document followed by one EOS
    lengths: np.ndarray  # tokens per document, EOS included

    def documents(self) -> Iterator[tuple[int, str, np.ndarray]]:
        """(ordinal, split, tokens) of each document."""
        ends = np.cumsum(self.lengths)
        for i, (split, end, length) in enumerate(zip(self.splits, ends, self.lengths, strict=True)):
            yield self.first + i, split, self.tokens[end - length : end]


def document_batches(documents: Iterable[Document], *, first: int) -> Iterator[DocumentBatch]:
    """Group consecutive documents (numbered from ``first``) into batches of ~BATCH_CHARS."""
    texts: list[str] = []
    splits: list[str] = []
    chars = 0
    for doc in documents:
        texts.append(doc.text)
        splits.append(doc.split)
        chars += len(doc.text)
        if chars >= BATCH_CHARS or len(texts) >= BATCH_DOCS:
            yield DocumentBatch(first, texts, splits)
            first += len(texts)
            texts, splits, chars = [], [], 0
    if texts:
        yield DocumentBatch(first, texts, splits)


def encode(tokenizer: Tokenizer, batch: DocumentBatch) -> TokenizedBatch:
    ids = tokenizer.encode_batch(batch.texts)
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    tokens = np.empty(int(lengths.sum()), dtype=np.uint32)
    pos = 0
    for x in ids:
        tokens[pos : pos + len(x)] = x
        pos += len(x)
        tokens[pos] = tokenizer.eos_id
        pos += 1
    return TokenizedBatch(batch.first, batch.splits, tokens, lengths)


_worker_tokenizer: Tokenizer | Exception | None = None


def _init_worker(spec: str, folder: pathlib.Path) -> None:
    global _worker_tokenizer
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled once, by the parent
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process
    try:
        _worker_tokenizer = load_tokenizer(spec, folder=folder)
    except Exception as err:  # a failing initializer makes Pool respawn workers forever: report it per task
        _worker_tokenizer = err


def _encode_in_worker(batch: DocumentBatch) -> TokenizedBatch:
    if isinstance(_worker_tokenizer, Exception):
        raise _worker_tokenizer
    assert _worker_tokenizer is not None, "worker not initialized"
    return encode(_worker_tokenizer, batch)


class Encoder:
    """Tokenizes batches in ``num_proc`` worker processes (in-process for 1), preserving order.

    ``Pool.imap`` reads its input ahead without bound (all of a 100B-token stream would end up
    in memory), so at most ``2 * num_proc`` batches are in flight here.

    While the pool runs, Ctrl-C (SIGINT) is deferred to the next batch boundary of :meth:`map`,
    where it raises KeyboardInterrupt: raised anywhere else it can land inside the pool's own
    bookkeeping with a queue lock held, and the pool's shutdown then waits on that lock forever.
    """

    def __init__(self, tokenizer: Tokenizer, *, spec: str, folder: pathlib.Path, num_proc: int) -> None:
        """``tokenizer`` serves in-process; workers load their own from ``spec`` and ``folder``."""
        if num_proc < 1:
            raise ValueError(f"num_proc must be >= 1, got {num_proc}")
        self.tokenizer, self.spec, self.folder, self.num_proc = tokenizer, spec, folder, num_proc
        self._pool = None
        self._interrupted = False
        self._deferring = False
        self._previous_handler: object = None

    def __enter__(self) -> Encoder:
        if self.num_proc > 1:
            if threading.current_thread() is threading.main_thread():
                self._previous_handler = signal.signal(signal.SIGINT, self._defer_interrupt)
                self._deferring = True
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("fork" if "fork" in methods else None)
            self._pool = context.Pool(self.num_proc, initializer=_init_worker, initargs=(self.spec, self.folder))
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None
        if self._deferring:  # None: a handler not set from Python; the default is the nearest
            previous = self._previous_handler
            signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)
            self._deferring = False
        if self._interrupted and exc[0] is None:  # Ctrl-C after the last batch boundary
            raise KeyboardInterrupt

    def _defer_interrupt(self, signum: int, frame: object) -> None:
        self._interrupted = True

    def _raise_if_interrupted(self) -> None:
        if self._interrupted:
            raise KeyboardInterrupt

    def map(self, batches: Iterable[DocumentBatch]) -> Iterator[TokenizedBatch]:
        if self._pool is None:
            for batch in batches:
                yield encode(self.tokenizer, batch)
            return
        pending: collections.deque = collections.deque()
        for batch in batches:
            self._raise_if_interrupted()
            pending.append(self._pool.apply_async(_encode_in_worker, (batch,)))
            if len(pending) >= 2 * self.num_proc:
                yield pending.popleft().get()
                self._raise_if_interrupted()
        while pending:
            yield pending.popleft().get()
            self._raise_if_interrupted()
