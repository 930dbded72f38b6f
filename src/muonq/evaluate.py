"""Evaluate a checkpoint: validation loss and perplexity on a prepared dataset, and zero-shot
accuracy through lm-evaluation-harness where it and its task data are available.

    python -m muonq.evaluate checkpoint=checkpoints/llama-tiny_muonq
    python -m muonq.evaluate checkpoint=PATH dataset=fineweb100B tokenizer=llama2 data_dir=/data \\
        tasks=[hellaswag,arc_easy] limit=500

The loss is computed on the same windows, in the same order and batches, as the trainer's final
full validation (``val/final_loss`` in metrics.jsonl), so the numbers agree: the validation split
cut into ``seq_len`` windows, ``batch_size`` at a time, the last partial batch dropped, mean of
the batch means. A run on W ranks used W x batch_size windows per batch: pass that as batch_size.
It is the trainer's own loop (:func:`muonq.train.validate.validation_loss`), in the run's precision:
autocast on CUDA as the checkpoint's ``recipe.training_params`` (autocast, mixed_precision) says,
fp32 on the CPU.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import sys
import tempfile
import time
from typing import Any

import torch

from muonq.cli import UsageError, as_list, parse_args, run_cli
from muonq.export import build_from_checkpoint, dataset_folder, export, load_checkpoint

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


# -- validation loss ---------------------------------------------------------------------------
def _recorded_precision(ckpt: Any) -> tuple[bool, str]:
    """(autocast, mixed_precision) of the run's ``recipe.training_params`` where the checkpoint
    records them, else the defaults: the forward passes run in the precision they trained in."""
    from muonq.config import TrainingParams

    tp = ((ckpt.run_config or {}).get("recipe") or {}).get("training_params") or {}
    return bool(tp.get("autocast", TrainingParams.autocast)), str(tp.get("mixed_precision", TrainingParams.mixed_precision))


# -- zero-shot ---------------------------------------------------------------------------------
def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return f"{type(err).__name__}: {text[:200]}"


def _offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def zero_shot(hf_dir: pathlib.Path | None, tasks: list[str], *, limit: int | None, device: str,
              batch_size: int = 8, export_fn: Any = None, tasks_dir: str | None = None,
              ) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """({task: {metric: value}}, {task: why it is unavailable}). ``hf_dir`` is an exported model
    folder; ``export_fn()`` makes one when needed (only if some task can run). ``tasks_dir``: more
    task YAMLs for lm-evaluation-harness (its ``include_path``)."""
    results: dict[str, dict[str, float]] = {}
    unavailable: dict[str, str] = {}
    if not tasks:
        return results, unavailable
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager, get_task_dict
    except ImportError as err:
        why = "lm-evaluation-harness is not installed (pip install lm-eval)" if isinstance(err, ModuleNotFoundError) \
            else f"lm-evaluation-harness does not import ({_one_line(err)})"
        return results, {task: why for task in tasks}

    manager = TaskManager(include_path=tasks_dir) if tasks_dir else TaskManager()
    runnable = []
    for task in tasks:
        if task not in manager.all_tasks:
            unavailable[task] = f"not a task of lm-evaluation-harness {getattr(lm_eval, '__version__', '')}".rstrip()
            continue
        try:  # builds the task and loads its dataset (from the HF cache when offline)
            if hasattr(manager, "load"):  # lm-eval >= 0.4.10; get_task_dict is deprecated there
                manager.load([task])
            else:
                get_task_dict([task], manager)
        except Exception as err:  # noqa: BLE001 - any failure to load task data makes the task unavailable
            hint = " (offline: HF_DATASETS_OFFLINE/HF_HUB_OFFLINE set and its data not in the HF cache)" if _offline() else ""
            unavailable[task] = f"its data could not be loaded{hint}: {_one_line(err)}"
            continue
        runnable.append(task)
    if not runnable:
        return results, unavailable

    from lm_eval.models.huggingface import HFLM

    if hf_dir is None:
        hf_dir = export_fn()
    lm = HFLM(pretrained=str(hf_dir), device=device, batch_size=batch_size, dtype="float32")
    output = lm_eval.simple_evaluate(model=lm, tasks=runnable, task_manager=manager, limit=limit, num_fewshot=0,
                                     log_samples=False)
    for task in runnable:
        metrics = (output or {}).get("results", {}).get(task, {})
        picked = {k.split(",")[0]: float(v) for k, v in metrics.items()
                  if isinstance(v, (int, float)) and k.split(",")[0] in ("acc", "acc_norm")}
        if picked:
            results[task] = picked
        else:
            unavailable[task] = "lm-evaluation-harness returned no acc/acc_norm for it"
    return results, unavailable


# -- command line ------------------------------------------------------------------------------
def _recorded_layout(ckpt: Any) -> tuple[int | None, int | None, str]:
    """(seq_len, batch_size) of the run where the checkpoint records them."""
    run = ckpt.run_config or {}
    tp = (run.get("recipe") or {}).get("training_params") or {}
    seq_len = tp.get("context_length") or (ckpt.payload.get("loader") or {}).get("seq_len")
    batch = tp.get("batch_size")
    world = ckpt.payload.get("world_size") or run.get("world_size") or 1
    return seq_len, (batch * world if batch else None), "run config" if tp else "loader state"


def main(argv: list[str]) -> int:
    values, _ = parse_args(argv, keys={"checkpoint": None, "dataset": None, "tokenizer": None, "data_dir": None,
                                       "data": None, "seq_len": None, "batch_size": None, "max_tokens": 0,
                                       "tasks": DEFAULT_TASKS, "limit": None, "device": "auto", "out": None,
                                       "hf_dir": None, "tasks_dir": None})
    if not values["checkpoint"]:
        raise UsageError("checkpoint= is required")
    ckpt = load_checkpoint(str(values["checkpoint"]))
    data, how = dataset_folder(values, ckpt)
    from muonq.data import check_dataset

    model = build_from_checkpoint(ckpt)
    rec_seq, rec_batch, _ = _recorded_layout(ckpt)
    seq_len = int(values["seq_len"] or rec_seq or 128)
    batch_size = int(values["batch_size"] or rec_batch or 16)
    meta = check_dataset(data, seq_len=seq_len, model_vocab_size=model.cfg.vocab_size)
    device = str(values["device"])
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"

    from muonq.train.parallelize import autocast_context
    from muonq.train.validate import validation_loss

    start = time.perf_counter()
    autocast, mixed_precision = _recorded_precision(ckpt)
    model.to(device)
    loss, tokens = validation_loss(model, data, seq_len=seq_len, batch_size=batch_size,
                                   max_tokens=int(values["max_tokens"] or 0), device=torch.device(device),
                                   autocast=autocast_context(torch.device(device), autocast=autocast,
                                                             mixed_precision=mixed_precision))
    ppl = math.exp(min(loss, 50.0))
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
