#!/usr/bin/env python
"""Data path throughput: tokenization (1 -> N processes), full default-corpus preparation, and
the training loader (memory-mapped shards, batch 64 x 1024) against what one H100 consumes.

    python benchmarks/bench_data.py [--loader-tokens 100000000] [--loader-batches 300]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import resource
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per process: per-process rates
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

from muonq.data import TokenLoader
from muonq.data.encode import DocumentBatch, Encoder, document_batches
from muonq.data.prepare import prepare
from muonq.data.shards import write_shard
from muonq.data.sources import EmbeddedShakespeare
from muonq.data.tokenizers import load_tokenizer, train_bpe

# llama-60m (58.1M params) on one H100 at 40% MFU of 989 TFLOP/s dense bf16, 6 FLOPs per param per token.
H100_BF16_FLOPS, MFU, PARAMS = 989e12, 0.4, 58.1e6
REQUIRED_TOKENS_PER_S = MFU * H100_BF16_FLOPS / (6 * PARAMS)


def bench_tokenizers(work: pathlib.Path) -> None:
    docs = list(EmbeddedShakespeare(val_fraction=0.05).documents())
    mb = sum(len(d.text) for d in docs) / 1e6
    started = time.perf_counter()
    train_bpe((d.text for d in docs if d.split == "train"), vocab_size=8192, path=work / "tokenizer.json")
    print(f"bpe-8192 training on the embedded train split: {time.perf_counter() - started:.2f} s")
    cores = os.cpu_count() or 1
    corpus = docs * 2  # ~10 MB, so pool start-up is a small share
    print(f"\ntokenization of the embedded corpus twice ({len(corpus)} documents, {2 * mb:.2f} MB), {cores} cores, "
          f"load average {os.getloadavg()[0]:.2f} before")  # fmt: skip
    print("wall: tokens/s of the whole run; per process: tokens per CPU-second of one tokenizing process")
    columns = ("procs", 5), ("tokens", 10), ("seconds", 8), ("wall tok/s", 12), ("speed-up", 8), ("per process", 12)
    print(f"{'tokenizer':12s} " + " ".join(f"{name:>{width}s}" for name, width in columns))
    for spec in ("gpt2", "bpe-8192", "mistral-v1"):
        tok = load_tokenizer(spec, folder=work)
        single = None
        for procs in sorted({1, 2, cores}):
            who = resource.RUSAGE_SELF if procs == 1 else resource.RUSAGE_CHILDREN
            cpu_before = _cpu_seconds(who)
            with Encoder(tok, spec=spec, folder=work, num_proc=procs) as encoder:
                warm_up = [DocumentBatch(i, ["warm up"], ["train"]) for i in range(2 * procs)]
                for _ in encoder.map(warm_up):
                    pass  # every worker has loaded its tokenizer
                started = time.perf_counter()
                tokens = sum(int(b.lengths.sum()) for b in encoder.map(document_batches(corpus, first=0)))
                seconds = time.perf_counter() - started
            cpu = _cpu_seconds(who) - cpu_before  # workers count once reaped, at the end of the block
            rate = tokens / seconds
            single = single or rate
            print(f"{spec:12s} {procs:5d} {tokens:10,d} {seconds:8.2f} {rate:12,.0f} {rate / single:7.2f}x {tokens / cpu:12,.0f}")


def _cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def bench_prepare(work: pathlib.Path) -> None:
    started = time.perf_counter()
    prepare(data_dir=work / "prepared", progress=False)
    seconds = time.perf_counter() - started
    print(f"\nprepare() of the default corpus (tiny_shakespeare, bpe-8192 trained + tokenized, all cores): {seconds:.1f} s")


def bench_loader(work: pathlib.Path, *, tokens: int, batches: int) -> None:
    folder = work / "synthetic-bpe-32000"
    folder.mkdir()
    rng = np.random.default_rng(0)
    half = tokens // 2
    for name, size in (("val_000000.bin", 1_000_000), ("train_000001.bin", half), ("train_000002.bin", tokens - half)):
        write_shard(folder / name, rng.integers(0, 32000, size, dtype=np.uint32), vocab_size=32000, eos_id=2)
    loader = TokenLoader(folder, "train", batch_size=64, seq_len=1024, seed=0)
    for _ in range(5):
        loader.next_batch()
    started = time.perf_counter()
    for _ in range(batches):
        loader.next_batch()
    seconds = time.perf_counter() - started
    rate = batches * 64 * 1024 / seconds
    print(f"\nloader: {tokens:,} uint16 tokens in 2 memory-mapped train shards (page cache warm), batch 64 x 1024")
    print(f"  {batches / seconds:,.1f} batches/s, {rate:,.0f} tokens/s (int64 inputs + targets, shuffled windows)")
    print(f"  required by llama-60m on one H100 at {MFU:.0%} of {H100_BF16_FLOPS / 1e12:.0f} TFLOP/s: "
          f"{MFU} * {H100_BF16_FLOPS:.3g} / (6 * {PARAMS:.3g}) = {REQUIRED_TOKENS_PER_S:,.0f} tokens/s")  # fmt: skip
    print(f"  loader / required = {rate / REQUIRED_TOKENS_PER_S:.1f}x (target >= 10x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loader-tokens", type=int, default=100_000_000)
    parser.add_argument("--loader-batches", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = pathlib.Path(tmp)
        bench_tokenizers(work)
        bench_prepare(work)
        bench_loader(work, tokens=args.loader_tokens, batches=args.loader_batches)


if __name__ == "__main__":
    main()
