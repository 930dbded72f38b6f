"""How the model runs on the devices: the data-parallel wrapper, compilation and mixed precision.

The training loop calls the module :func:`parallelize` returns and never asks how it is wrapped;
the bare model keeps the parameters (the optimizer, checkpoints and validation use it). A sharded
variant (FSDP2) is a second ``parallelize`` with its own :func:`gradient_sync`.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from muonq.train.distributed import DistInfo


def parallelize(model: torch.nn.Module, dist: DistInfo, training_params: Any) -> torch.nn.Module:
    """``model`` in DDP over the process group when distributed, then compiled when
    ``training_params.compile``; ``model`` itself when neither."""
    train_model = model
    if dist.distributed:
        train_model = DDP(model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    if training_params.compile:
        train_model = torch.compile(train_model)
    return train_model


def gradient_sync(train_model: torch.nn.Module, dist: DistInfo, *, sync: bool) -> contextlib.AbstractContextManager:
    """Where gradient accumulation skips the all-reduce of a micro-step (``sync=False``): DDP's
    ``no_sync``; nothing to do in one process or when syncing."""
    return train_model.no_sync() if dist.distributed and not sync else contextlib.nullcontext()


def autocast_context(device: torch.device, *, autocast: bool, mixed_precision: str) -> contextlib.AbstractContextManager:
    """The forward passes' precision, in training and in evaluation: autocast to ``mixed_precision``
    on CUDA when ``autocast`` (``recipe.training_params``), fp32 otherwise and always on the CPU."""
    if device.type == "cuda" and autocast and mixed_precision != "float32":
        return torch.autocast("cuda", dtype=getattr(torch, mixed_precision))
    return contextlib.nullcontext()
