"""Evaluating a checkpoint: its validation loss on a prepared dataset, and zero-shot accuracy
through lm-evaluation-harness where it and its task data are available. The command line is
``python -m muonq.evaluate``.

The loss is computed on the same windows, in the same order and batches, as the trainer's final
full validation (``val/final_loss`` in metrics.jsonl), so the numbers agree: the validation split
cut into ``seq_len`` windows, ``batch_size`` at a time, the last partial batch dropped, mean of
the batch means. A run on W ranks used W x batch_size windows per batch: pass that as batch_size.
It is the trainer's own loop (:func:`muonq.train.validate.validation_loss`), in the run's precision:
autocast on CUDA as the checkpoint's ``recipe.training_params`` (autocast, mixed_precision) says,
fp32 on the CPU.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import torch

from muonq.checkpoints import LoadedCheckpoint, recorded_precision
from muonq.train.parallelize import autocast_context
from muonq.train.validate import validation_loss


# -- validation loss ---------------------------------------------------------------------------
def checkpoint_validation_loss(model: torch.nn.Module, ckpt: LoadedCheckpoint, data: pathlib.Path, *, seq_len: int,
                               batch_size: int, max_tokens: int = 0, device: str) -> tuple[float, int]:
    """(mean loss, tokens) of ``model`` (built from ``ckpt``, moved to ``device``) on the validation
    split of ``data``, in the precision the checkpoint's run trained in."""
    autocast, mixed_precision = recorded_precision(ckpt)
    model.to(device)
    return validation_loss(model, data, seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens,
                           device=torch.device(device),
                           autocast=autocast_context(torch.device(device), autocast=autocast,
                                                     mixed_precision=mixed_precision))


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
