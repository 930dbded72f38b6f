"""End to end on one device: tokens/s, MFU and peak memory of the real trainer.

Each (recipe, optimizer) pair is one fresh ``run_hydra.py`` process (clean peak-memory counters and
compile caches) training on synthetic tokens: random ids written as llm.c-format shards, which the
loader reads like any dataset (the work per token does not depend on the ids, and the GPU machines
have no network for FineWeb). The recipe's model, micro-batch, context, bf16 autocast and
``torch.compile`` are kept; one micro-batch per optimizer step (no accumulation), no checkpoints,
validation only at the end on one batch. The trainer logs every ``--warmup`` steps; the first window
(compilation, allocator warm-up) is dropped and the median of the others is reported.

Printed per run: tokens/s, MFU (the trainer's 6 N + attention FLOP count over the device's dense
bf16 peak), peak allocated memory, and the optimizer-state bytes the trainer counted. Then, per
recipe, the targets: muonq tokens/s within 5% of muon's, and muonq's peak memory below
muon's by the state bytes saved (measured difference next to the state-byte difference).

    python benchmarks/bench_train.py [--recipes llama-60m llama-350m llama-1b] \
        [--optimizers adamw muon muonq] [--steps 30] [--warmup 10] [--batch-size N] \
        [--override optimizer_params.args.ns_batch_size=8 ...] [--json results.json]

On a CPU it defaults to llama-tiny for a few steps: a check that the pipeline runs, not a measurement.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from muonq import metric_names as names
from muonq.commands import entry_command
from muonq.config import compose_config
from muonq.data.shards import HEADER_INTS
from muonq.metric_names import format_bytes

DATASET, TOKENIZER = "synthetic", "bench"  # the data folder is "synthetic-bench"
LLMC_MAGIC, LLMC_VERSION = 20240520, 1


def write_llmc_shard(path: Path, tokens: np.ndarray) -> None:
    """An llm.c shard: 256 int32 header (magic, version, token count), then uint16 tokens."""
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (LLMC_MAGIC, LLMC_VERSION, tokens.size)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2").tobytes())


def write_synthetic_dataset(data_dir: Path, *, vocab_size: int, train_tokens: int, val_tokens: int, seed: int = 0) -> Path:
    if vocab_size > 65536:
        raise ValueError(f"llm.c uint16 shards hold ids below 65536; the model's vocab is {vocab_size}")
    folder = data_dir / f"{DATASET}-{TOKENIZER}"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_tokens), ("val", val_tokens)):
        write_llmc_shard(folder / f"{split}_000000.bin", rng.integers(0, vocab_size, count, dtype=np.int64))
    return folder


def run_one(recipe: str, optimizer: str, *, data_dir: Path, out_dir: Path, batch: int, context: int, steps: int,
            warmup: int, overrides: list[str], timeout: int) -> dict:
    args = [
        f"recipe={recipe}", f"optimizer_params={optimizer}", f"data_dir={data_dir}", f"hydra.run.dir={out_dir}",
        f"run_name=bench_{recipe}_{optimizer}",
        f"recipe.dataset.name={DATASET}", f"recipe.dataset.tokenizer={TOKENIZER}",
        f"recipe.training_params.batch_size={batch}", f"recipe.training_params.context_length={context}",
        f"recipe.training_params.tokens_processed={batch * context}",
        f"recipe.training_params.max_steps={warmup + steps}",
        f"logging_params.log_step={warmup}", "logging_params.val_step=0", "logging_params.save_checkpoint=false",
        "logging_params.final_full_val=false", f"logging_params.val_tokens_processed={batch * context}",
        *overrides,
    ]
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(entry_command(1, *args), cwd=out_dir.parent, env=env,
                          capture_output=True, text=True, timeout=timeout)
    result: dict = {"recipe": recipe, "optimizer": optimizer, "batch": batch, "context": context}
    metrics = out_dir / "metrics.jsonl"
    if proc.returncode != 0 or not metrics.exists():
        lines = [line for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
        result["error"] = lines[-1][:200] if lines else f"exit code {proc.returncode}"
        return result
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    perf = [r for r in rows if names.PERF_TOKENS_PER_S in r]
    timed = perf[1:] or perf  # drop the warm-up window
    result["tokens_per_s"] = statistics.median(r[names.PERF_TOKENS_PER_S] for r in timed)
    result["step_time_s"] = statistics.median(r[names.PERF_STEP_TIME_S] for r in timed)
    if names.PERF_MFU in timed[-1]:
        result["mfu"] = statistics.median(r[names.PERF_MFU] for r in timed)
    result["peak_memory_bytes"] = max(r[names.PERF_PEAK_MEMORY_BYTES] for r in perf)
    result["state_bytes"] = next(r[names.STATE_BYTES_TOTAL] for r in rows if names.STATE_BYTES_TOTAL in r)
    result["windows"] = len(timed)
    return result


def report(results: list[dict], device: str) -> None:
    print(f"\n{device}\n")
    print("| recipe | optimizer | batch x seq | tokens/s | MFU | step ms | peak memory | optimizer state |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in results:
        shape = f"{r['batch']} x {r['context']}"
        if "error" in r:
            print(f"| {r['recipe']} | {r['optimizer']} | {shape} | failed: {r['error']} | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
        print(f"| {r['recipe']} | {r['optimizer']} | {shape} | {r['tokens_per_s']:,.0f} | {mfu} | "
              f"{1e3 * r['step_time_s']:.1f} | {format_bytes(r['peak_memory_bytes'])} | {format_bytes(r['state_bytes'])} |")
    by_key = {(r["recipe"], r["optimizer"]): r for r in results if "error" not in r}
    lines = []
    for recipe in dict.fromkeys(r["recipe"] for r in results):
        muon, muonq = by_key.get((recipe, "muon")), by_key.get((recipe, "muonq"))
        if not (muon and muonq):
            continue
        speed = muonq["tokens_per_s"] / muon["tokens_per_s"]
        saved_state = muon["state_bytes"] - muonq["state_bytes"]
        saved_peak = muon["peak_memory_bytes"] - muonq["peak_memory_bytes"]
        lines.append(f"| {recipe} | {speed:.3f} ({'met' if speed >= 0.95 else 'missed'}) | {format_bytes(saved_state)} | "
                     f"{format_bytes(saved_peak)} ({'met' if saved_peak >= 0.9 * saved_state else 'missed'}) |")
    if lines:
        print("\n| recipe | muonq / muon tokens/s (target >= 0.95) | state saved | peak memory saved (target: ~ state saved) |")
        print("|---|---:|---:|---:|")
        print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="+", default=None, help="default: llama-60m llama-350m llama-1b on CUDA, llama-tiny on CPU")
    parser.add_argument("--optimizers", nargs="+", default=["adamw", "muon", "muonq"])
    parser.add_argument("--steps", type=int, default=None, help="timed steps (a multiple of --warmup); default 30 on CUDA, 4 on CPU")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps, also the logging window; default 10 / 2")
    parser.add_argument("--batch-size", type=int, default=None, help="micro-batch in sequences (default: the recipe's)")
    parser.add_argument("--context-length", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for every run")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    recipes = args.recipes or (["llama-60m", "llama-350m", "llama-1b"] if cuda else ["llama-tiny"])
    warmup = args.warmup or (10 if cuda else 2)
    steps = args.steps or (3 * warmup if cuda else 2 * warmup)
    if steps % warmup:
        parser.error(f"--steps ({steps}) must be a multiple of --warmup ({warmup}), the logging window")
    device = (f"{torch.cuda.get_device_name()}, torch {torch.__version__}" if cuda
              else f"CPU ({os.cpu_count()} cores), torch {torch.__version__}: a pipeline check, not a measurement")
    device = f"{datetime.date.today()} · {device}"
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        for recipe in recipes:
            cfg = compose_config([f"recipe={recipe}"]).recipe
            batch = args.batch_size or cfg.training_params.batch_size
            context = args.context_length or cfg.training_params.context_length
            data_dir = Path(tmp) / recipe / "data"
            per_run = batch * context
            write_synthetic_dataset(data_dir, vocab_size=cfg.model.vocab_size,
                                    train_tokens=(warmup + steps + 2) * per_run + context + 1, val_tokens=2 * per_run + 1)
            for optimizer in args.optimizers:
                out_dir = Path(tmp) / recipe / optimizer
                result = run_one(recipe, optimizer, data_dir=data_dir, out_dir=out_dir, batch=batch, context=context,
                                 steps=steps, warmup=warmup, overrides=args.override, timeout=args.timeout)
                print(json.dumps(result), flush=True)
                results.append(result)
    report(results, device)
    if args.json:
        args.json.write_text(json.dumps({"device": device, "results": results}, indent=2))


if __name__ == "__main__":
    main()
