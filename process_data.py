#!/usr/bin/env python
"""Tokenize a corpus into binary shards under $DATA_DIR/<name>-<tokenizer tag>/ (see docs/data.md).

    python process_data.py                                   # embedded Shakespeare, bpe-8192
    python process_data.py --name fineweb100B --tokenizer llama2
    python process_data.py --input 'fineweb/*.parquet' --name fineweb10B --tokenizer gpt2
"""

from __future__ import annotations

import argparse
import sys


def _count(text: str) -> int:
    """An integer that may be written 1e8 or 100_000_000."""
    try:
        value = float(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value != int(value) or value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return int(value)


def main(argv: list[str] | None = None) -> int:
    from muonq.data.sources import EMBEDDED_NAME, HUB_DATASETS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--name", default=EMBEDDED_NAME,
        help=f"{EMBEDDED_NAME} (embedded, the default), {', '.join(HUB_DATASETS)} (streamed from the hub), "
        "or any name for --input files",
    )  # fmt: skip
    parser.add_argument(
        "--tokenizer", default="bpe-8192",
        help="llama2, gpt2, mistral-v1, bpe-<vocab> (trained on the corpus), a hub id, a local HF tokenizer "
        "directory or a SentencePiece .model file (default: bpe-8192)",
    )  # fmt: skip
    parser.add_argument("--input", nargs="+", metavar="GLOB", help="local parquet / jsonl / txt files (quote the globs)")
    parser.add_argument("--data-dir", help="output root (default: $DATA_DIR, else ./data)")
    parser.add_argument("--num-proc", type=_count, help="tokenizer processes (default: all cores)")
    parser.add_argument("--max-tokens", type=_count, help="stop after this many train tokens")
    parser.add_argument("--shard-tokens", type=_count, default=100_000_000, help="tokens per shard (default: 1e8)")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="fraction of documents for validation (default: 0.05)")
    args = parser.parse_args(argv)

    from muonq.data.prepare import prepare
    from muonq.errors import UserError

    try:
        prepare(
            args.name, args.tokenizer, data_dir=args.data_dir, input=args.input, num_proc=args.num_proc,
            max_tokens=args.max_tokens, shard_tokens=args.shard_tokens, val_fraction=args.val_fraction,
        )  # fmt: skip
    except UserError as err:  # bad input: one line; anything else is a bug and keeps its traceback
        print(f"process_data.py: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
