"""Text -> tokenized shards under ``$DATA_DIR/{name}-{tag}``: the pipeline behind process_data.py.

Layout: ``val_000000.bin`` (the validation split, whole documents, at most one shard),
``train_000001.bin``, ``train_000002.bin``, ... (documents may continue across train shards),
``meta.json`` (written last: its presence marks a complete dataset) and, for ``bpe-N``, the
trained ``tokenizer.json``. While running, ``progress.json`` records what is on disk, so a
rerun of the same command resumes instead of starting over.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import pathlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from typing import Any

from tqdm import tqdm

from muonq.data.encode import Encoder, document_batches
from muonq.data.paths import dataset_dir, tokenizer_tag
from muonq.data.shards import MAGIC, META_FILE, PROGRESS_FILE, VERSION, atomic_writer, list_shards, remove_temp_files, token_dtype
from muonq.data.sources import EMBEDDED_NAME, LocalFiles, Source, open_source
from muonq.data.tokenizers import BPE_FILE, Tokenizer, bpe_vocab_size, load_tokenizer, train_bpe
from muonq.data.writer import SplitState, SplitWriter
from muonq.errors import UserError

EOS_POLICY = "append"  # one EOS token after every document; BOS never added
BPE_TRAIN_CHARS = 200_000_000  # a BPE is trained on at most this much train-split text
# The train split must hold one window of the smallest recipe (llama-tiny, gpt-tiny: context_length
# 128, so 129 tokens); training checks the exact size against its own context length.
MIN_TRAIN_TOKENS = 129


def prepare(
    name: str = EMBEDDED_NAME,
    tokenizer: str = "bpe-8192",
    *,
    data_dir: str | os.PathLike | None = None,
    input: str | Sequence[str] | None = None,
    num_proc: int | None = None,
    max_tokens: int | None = None,
    shard_tokens: int = 100_000_000,
    val_fraction: float = 0.05,
    progress: bool = True,
) -> pathlib.Path:
    """Tokenize a corpus into shards and return the dataset folder.

    ``input``: local parquet / jsonl / txt globs (else ``name`` picks the embedded corpus or a
    hub dataset). ``max_tokens`` caps the train split. ``val_fraction`` of the documents go to
    validation (for the embedded corpus: whole works, at least 2), at most one shard of them.
    """
    if shard_tokens < 1 or shard_tokens >= 2**31:
        raise UserError(f"shard_tokens must be in [1, 2**31), got {shard_tokens}")
    if max_tokens is not None and max_tokens < 1:
        raise UserError(f"max_tokens must be positive, got {max_tokens}")
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    num_proc = num_proc or os.cpu_count() or 1
    say = print if progress else lambda *args: None
    patterns = [input] if isinstance(input, str) else list(input or [])
    config = {
        "name": name, "input": patterns, "tokenizer": tokenizer, "shard_tokens": shard_tokens,
        "val_fraction": val_fraction, "max_tokens": max_tokens, "format_version": VERSION,
    }  # fmt: skip
    folder = dataset_dir(data_dir, name, tokenizer)
    if (folder / META_FILE).exists():
        meta = _read_json(folder / META_FILE)
        _check_same_config(meta.get("config", {}), config, folder)
        splits = meta["splits"]
        tokens = f"{splits['train']['tokens']:,} train + {splits['val']['tokens']:,} val tokens"
        say(f"{folder} is already complete ({tokens}); nothing to do")
        return folder

    saved = _load_progress(folder, config) if folder.is_dir() else None
    states = saved or {"val": SplitState(), "train": SplitState()}
    # Replay from the earliest document a split still needs (a full split needs none).
    restart = min(state.resume_doc for state in states.values() if state.closed_at is None)
    source = open_source(name, input=patterns, val_fraction=val_fraction)
    _refuse_empty_files(source)
    documents = source.documents(restart)
    first = next(documents, None)  # surfaces an unreachable source before anything is written
    if first is None and restart == 0:
        raise UserError(f"{source.description}: no documents")
    documents = itertools.chain([] if first is None else [first], documents)
    tok = _tokenizer(tokenizer, folder=folder, source=source, train=saved is None)
    folder.mkdir(parents=True, exist_ok=True)  # only now: a source or tokenizer that fails leaves nothing behind
    remove_temp_files(folder)

    def save_progress() -> None:
        _write_json(folder / PROGRESS_FILE, {"config": config, **{split: asdict(state) for split, state in states.items()}})

    common = dict(shard_tokens=shard_tokens, vocab_size=tok.vocab_size, eos_id=tok.eos_id, on_flush=save_progress)
    val = SplitWriter(folder, "val", first_index=0, max_shards=1, state=states["val"], **common)
    train = SplitWriter(folder, "train", first_index=1, max_tokens=max_tokens, state=states["train"], **common)
    save_progress()
    if saved is not None:
        say(f"resuming {folder}: {len(states['train'].shards)} train shards on disk, replaying from document {restart}")

    started, new_tokens = time.perf_counter(), 0
    try:
        with Encoder(tok, spec=tokenizer, folder=folder, num_proc=num_proc) as encoder, tqdm(
            total=max_tokens, unit="tok", unit_scale=True, desc=folder.name, disable=not progress
        ) as bar:
            batches = document_batches(documents, first=restart)
            with contextlib.closing(encoder.map(batches)) as tokenized:
                for batch in tokenized:
                    added = _route(batch.documents(), val=val, train=train)
                    new_tokens += added
                    bar.update(added)
                    if train.full:
                        break
        val.finish()
        train.finish()
    except KeyboardInterrupt:
        say(f"\ninterrupted: finished shards are kept; rerun the same command to resume {folder}")
        raise
    elapsed = time.perf_counter() - started
    if train.tokens < MIN_TRAIN_TOKENS:
        _discard(folder, states, tokenizer_trained=saved is None)
        text = train.tokens - train.documents  # every document ends with one EOS token
        raise UserError(
            f"{_inputs(source)}: {'no text' if text <= 0 else f'only {text} tokens of text'} for the train split "
            f"({train.tokens} tokens with the end-of-document tokens), fewer than one training window of "
            f"{MIN_TRAIN_TOKENS} tokens; nothing was written"
        )

    meta = _meta(config, source=source, tok=tok, states=states, val=val, train=train)
    _write_json(folder / META_FILE, meta)
    (folder / PROGRESS_FILE).unlink(missing_ok=True)
    _report(folder, meta, elapsed=elapsed, new_tokens=new_tokens, say=say)
    return folder


def _inputs(source: Source) -> str:
    """The input files of ``source`` (a few of them), else its description."""
    if not isinstance(source, LocalFiles):
        return source.description
    names = [str(p) for p in source.files[:3]]
    more = f" and {len(source.files) - 3} more files" if len(source.files) > 3 else ""
    return ", ".join(names) + more


def _refuse_empty_files(source: Source) -> None:
    """Empty input files (0 bytes) fail before anything is tokenized or written."""
    if isinstance(source, LocalFiles) and all(p.stat().st_size == 0 for p in source.files):
        raise UserError(f"{_inputs(source)}: {'every input file is' if len(source.files) > 1 else 'the input file is'} "
                        "empty (0 bytes); nothing was written")


def _discard(folder: pathlib.Path, states: dict[str, SplitState], *, tokenizer_trained: bool) -> None:
    """Remove what this preparation wrote into ``folder`` (and the folder, when that empties it)."""
    for state in states.values():
        for name in state.shards:
            (folder / name).unlink(missing_ok=True)
    (folder / PROGRESS_FILE).unlink(missing_ok=True)
    if tokenizer_trained:
        (folder / BPE_FILE).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        folder.rmdir()


def _route(documents: Iterator[tuple[int, str, Any]], *, val: SplitWriter, train: SplitWriter) -> int:
    """Send each document to its split; validation documents go to train once val is full."""
    added = 0
    for ordinal, split, tokens in documents:
        writer = val if split == "val" and val.accepts(ordinal, len(tokens)) else train
        added += writer.add(ordinal, tokens)
        if train.full:
            break
    return added


def _tokenizer(spec: str, *, folder: pathlib.Path, source: Source, train: bool) -> Tokenizer:
    """Load the tokenizer; ``bpe-N`` is (re)trained on the train split unless resuming."""
    vocab = bpe_vocab_size(spec)
    if vocab is None or not train:
        return load_tokenizer(spec, folder=folder)
    texts = (doc.text for doc in source.documents() if doc.split == "train")
    sample = _take_chars(texts, BPE_TRAIN_CHARS)
    folder.mkdir(parents=True, exist_ok=True)
    return train_bpe(sample, vocab_size=vocab, path=folder / BPE_FILE)


def _take_chars(texts: Iterator[str], limit: int) -> Iterator[str]:
    total = 0
    for text in texts:
        yield text
        total += len(text)
        if total >= limit:
            return


def _check_same_config(saved: dict[str, Any], config: dict[str, Any], folder: pathlib.Path) -> None:
    differ = [f"{k}: {saved.get(k)!r} there, {v!r} now" for k, v in config.items() if saved.get(k) != v]
    if differ:
        raise UserError(
            f"{folder} was prepared with other settings ({'; '.join(differ)}); delete it to rebuild, or use another --data-dir"
        )


def _load_progress(folder: pathlib.Path, config: dict[str, Any]) -> dict[str, SplitState] | None:
    path = folder / PROGRESS_FILE
    if not path.exists():
        if list_shards(folder, "train") or list_shards(folder, "val"):
            raise UserError(
                f"{folder} holds shards but no {META_FILE} or {PROGRESS_FILE}; delete them or use another --data-dir"
            )
        return None
    saved = _read_json(path)
    _check_same_config(saved["config"], config, folder)
    return {split: SplitState(**saved[split]) for split in ("val", "train")}


def _read_json(path: pathlib.Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({err}); delete {path.parent} to rebuild it") from err


def _write_json(path: pathlib.Path, data: dict[str, Any]) -> None:
    with atomic_writer(path) as f:
        f.write((json.dumps(data, indent=2) + "\n").encode())


def _meta(
    config: dict[str, Any], *, source: Source, tok: Tokenizer, states: dict[str, SplitState], val: SplitWriter, train: SplitWriter
) -> dict[str, Any]:
    return {
        "format": "muonq-shards",
        "format_version": VERSION,
        "magic": MAGIC,
        "config": config,
        "source": source.description,
        "tokenizer": config["tokenizer"],
        "tokenizer_tag": tokenizer_tag(config["tokenizer"]),
        "tokenizer_name": tok.name,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "bos_id": tok.bos_id,
        "dtype": token_dtype(tok.vocab_size).name,
        "eos_policy": EOS_POLICY,
        "splits": {
            split: {"tokens": writer.tokens, "documents": writer.documents, "shards": states[split].shards}
            for split, writer in (("val", val), ("train", train))
        },
    }


def _report(folder: pathlib.Path, meta: dict[str, Any], *, elapsed: float, new_tokens: int, say: Any) -> None:
    splits = meta["splits"]
    files = [folder / name for split in splits.values() for name in split["shards"]]
    size = sum(f.stat().st_size for f in files)
    say(f"wrote {folder}")
    for split in ("val", "train"):
        s = splits[split]
        say(f"  {split:5s}: {s['documents']:,} documents, {s['tokens']:,} tokens, {len(s['shards'])} shards")
    if not splits["val"]["tokens"]:
        say("  warning: no validation documents (raise --val-fraction or --shard-tokens); training needs a val split")
    say(
        f"  total: {sum(s['documents'] for s in splits.values()):,} documents, {sum(s['tokens'] for s in splits.values()):,} "
        f"tokens, {len(files)} shards, {size:,} bytes; {new_tokens:,} tokens in {elapsed:.1f} s "
        f"({new_tokens / max(elapsed, 1e-9):,.0f} tokens/s)"
    )
