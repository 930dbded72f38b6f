"""Command line: evaluate a checkpoint (validation loss and perplexity on a prepared dataset,
zero-shot accuracy through lm-evaluation-harness where available). The work is in
``muonq.evaluation``; what the numbers mean is said there.

    python -m muonq.evaluate checkpoint=checkpoints/llama-tiny_muonq
    python -m muonq.evaluate checkpoint=PATH dataset=fineweb100B tokenizer=llama2 data_dir=/data \\
        tasks=[hellaswag,arc_easy] limit=500
"""

from __future__ import annotations

import json
import pathlib
import sys
import tempfile
import time

from muonq.checkpoints import build_from_checkpoint, dataset_folder, load_checkpoint, recorded_layout
from muonq.cli import UsageError, as_int, as_list, parse_args, run_cli
from muonq.evaluation import checkpoint_validation_loss, zero_shot
from muonq.hf.export import export
from muonq.train.distributed import pick_device
from muonq.train.validate import perplexity

USAGE = """\
usage: python -m muonq.evaluate checkpoint=PATH [dataset=NAME tokenizer=TOK data_dir=DIR | data=FOLDER]
                                [seq_len=N batch_size=N] [tasks=[...]|none] [limit=N] [device=auto] [out=FILE]

  checkpoint=PATH   checkpoints/<run>/ (newest intact step), a step_XXXXXX/ folder or main.pt
  dataset=, tokenizer=, data_dir=, data=
                    the prepared dataset to validate on (as in export; default: the run's where the
                    checkpoint records it, else tiny_shakespeare / bpe-8192)
  seq_len=N         window length (default: the run's context_length, read from the checkpoint)
  batch_size=N      windows per batch (default: the run's batch_size x world size where recorded,
                    else 16); the trainer drops the last partial batch, so use the run's value to
                    reproduce val/final_loss exactly
  max_tokens=0      validate on the first N tokens only (0: the whole split, like final_full_val)
  tasks=[...]       zero-shot tasks for lm-evaluation-harness (default [hellaswag,arc_easy,
                    arc_challenge,piqa,winogrande]; tasks=none skips them)
  limit=N           examples per task (default: all)
  tasks_dir=DIR     more lm-evaluation-harness task YAMLs (e.g. a local copy of a task's data)
  hf_dir=DIR        an exported model folder to evaluate the tasks on (default: exported to a temp folder)
  device=auto       auto | cpu | cuda
  out=FILE          also write the results as JSON
"""

DEFAULT_TASKS = ["hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande"]


def main(argv: list[str]) -> int:
    values, _ = parse_args(argv, keys={"checkpoint": None, "dataset": None, "tokenizer": None, "data_dir": None,
                                       "data": None, "seq_len": None, "batch_size": None, "max_tokens": 0,
                                       "tasks": DEFAULT_TASKS, "limit": None, "device": "auto", "out": None,
                                       "hf_dir": None, "tasks_dir": None})
    if not values["checkpoint"]:
        raise UsageError("checkpoint= is required")
    ckpt = load_checkpoint(str(values["checkpoint"]))
    data, how = dataset_folder(ckpt, data=values["data"], dataset=values["dataset"], tokenizer=values["tokenizer"],
                               data_dir=values["data_dir"])
    from muonq.data import check_dataset

    model = build_from_checkpoint(ckpt)
    rec_seq, rec_batch, _ = recorded_layout(ckpt)
    seq_len = as_int(values["seq_len"] or rec_seq or 128, "seq_len", minimum=1)
    batch_size = as_int(values["batch_size"] or rec_batch or 16, "batch_size", minimum=1)
    max_tokens = as_int(values["max_tokens"] or 0, "max_tokens", minimum=0)
    if values["limit"] is not None:
        as_int(values["limit"], "limit", minimum=1)
    if model.cfg.model_type == "gpt" and seq_len > model.cfg.block_size:
        raise UsageError(f"seq_len={seq_len} exceeds the model's {model.cfg.block_size} learned positions (block_size)")
    meta = check_dataset(data, seq_len=seq_len, model_vocab_size=model.cfg.vocab_size)
    if values["device"] not in ("auto", "cpu", "cuda"):
        raise UsageError(f"device= must be auto, cpu or cuda, got {values['device']!r}")
    device = pick_device(values["device"], 0).type  # cuda without a GPU: a one-line error

    start = time.perf_counter()
    loss, tokens = checkpoint_validation_loss(model, ckpt, data, seq_len=seq_len, batch_size=batch_size,
                                              max_tokens=max_tokens, device=device)
    ppl = perplexity(loss)
    print(f"checkpoint {ckpt.path} (step {ckpt.step}, {ckpt.payload.get('optimizer_name')}, {ckpt.model_config['model_type']})")
    print(f"dataset {data} ({how}; tokenizer {meta.tokenizer})")
    print(f"validation loss {loss:.4f}  perplexity {ppl:.2f}  ({tokens:,} tokens, {seq_len}-token windows, "
          f"batches of {batch_size}, {time.perf_counter() - start:.1f} s)")

    tasks = [] if str(values["tasks"]).lower() in ("none", "[]", "") else as_list(values["tasks"], "tasks")
    results: dict[str, dict[str, float]] = {}
    unavailable: dict[str, str] = {}
    if tasks:
        with tempfile.TemporaryDirectory(prefix="muonq-hf-") as tmp:
            hf_dir = pathlib.Path(values["hf_dir"]) if values["hf_dir"] else None
            results, unavailable = zero_shot(
                hf_dir, tasks, limit=values["limit"], device=device,
                export_fn=lambda: export(ckpt.path, pathlib.Path(tmp) / "hf", data=data, ckpt=ckpt),
                tasks_dir=values["tasks_dir"],
            )
        for task, metrics in results.items():
            print(f"{task}: " + "  ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())))
        for task, why in unavailable.items():
            print(f"{task}: unavailable: {why}")
    if values["out"]:
        out = pathlib.Path(str(values["out"]))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({
            "checkpoint": str(ckpt.path), "step": ckpt.step, "optimizer": ckpt.payload.get("optimizer_name"),
            "dataset": str(data), "seq_len": seq_len, "batch_size": batch_size, "tokens": tokens,
            "val_loss": loss, "val_ppl": ppl, "zero_shot": results, "unavailable": unavailable,
        }, indent=1))
    return 0


def cli() -> int:
    return run_cli(main, USAGE)


if __name__ == "__main__":
    sys.exit(cli())
