"""The validation loss: one loop for the trainer and ``muonq.evaluate``.

The split is cut into ``seq_len`` windows, ``batch_size`` at a time per rank, the last partial
batch dropped; the loss is the mean of the batch means (averaged over ranks when distributed).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from muonq.data import validation_batches
from muonq.train import distributed as dist_utils


@torch.no_grad()
def validation_loss(model: torch.nn.Module, data: Path, *, seq_len: int, batch_size: int, max_tokens: int = 0,
                    device: torch.device, autocast: contextlib.AbstractContextManager | None = None,
                    rank: int = 0, world_size: int = 1) -> tuple[float, int]:
    """(mean loss, tokens this rank evaluated) of ``model`` on the validation split of ``data``
    (``max_tokens`` 0: all of it), in eval mode; the model's training mode is restored after."""
    autocast = autocast if autocast is not None else contextlib.nullcontext()
    training = model.training
    model.eval()
    total = torch.zeros((), device=device)
    batches = tokens = 0
    for x, y in validation_batches(data, batch_size=batch_size, seq_len=seq_len, max_tokens=max_tokens,
                                   rank=rank, world_size=world_size):
        with autocast:
            total += model(x.to(device), y.to(device)).float()
        batches += 1
        tokens += y.numel()
    model.train(training)
    if batches == 0:
        raise ValueError(f"validation split of {data} is too small for one batch of {batch_size} x {seq_len}")
    return float(dist_utils.all_reduce_mean(total / batches)), tokens
