"""The validation loss, one loop for the trainer and ``muonq.evaluate``, and its cadence in a run.

The split is cut into ``seq_len`` windows, ``batch_size`` at a time per rank, the last partial
batch dropped; the loss is the mean of the batch means (averaged over ranks when distributed).
"""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Any

import torch

from muonq import metric_names as M
from muonq.data import validation_batches
from muonq.train import distributed as dist_utils
from muonq.train.metrics import MetricsLogger

log = logging.getLogger("muonq")


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
    # validation_batches refuses a split smaller than one global batch (naming it), so one ran
    assert batches > 0, f"no validation batch from {data} ({batch_size} x {seq_len})"
    return float(dist_utils.all_reduce_mean(total / batches)), tokens


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


class Validator:
    """The validations of a run: every ``logging_params.val_step`` steps on ``val_tokens_processed``
    tokens (not at the last step: the final validation follows it), and the final one (the whole
    split when ``final_full_val``). Every rank runs them (the loss is averaged over ranks)."""

    def __init__(self, model: torch.nn.Module, data: Path, *, logging_params: Any, training_params: Any, total_steps: int,
                 device: torch.device, autocast: contextlib.AbstractContextManager, rank: int, world_size: int) -> None:
        self.model, self.data, self.device, self.autocast = model, data, device, autocast
        self.rank, self.world_size = rank, world_size
        self.batch_size, self.seq_len = training_params.batch_size, training_params.context_length
        self.tokens_per_step = training_params.tokens_processed
        self.every, self.total_steps = logging_params.val_step, total_steps
        self.max_tokens = logging_params.val_tokens_processed
        self.final_full = logging_params.final_full_val

    def loss(self, max_tokens: int) -> float:
        return validation_loss(self.model, self.data, seq_len=self.seq_len, batch_size=self.batch_size,
                               max_tokens=max_tokens, device=self.device, autocast=self.autocast,
                               rank=self.rank, world_size=self.world_size)[0]

    def should_run(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0 and step < self.total_steps

    def run(self, step: int, metrics: MetricsLogger) -> float:
        """The periodic validation after ``step``: logged, returned."""
        loss = self.loss(self.max_tokens)
        metrics.log({M.VAL_LOSS: loss, M.VAL_PPL: perplexity(loss), M.TRAIN_TOKENS: step * self.tokens_per_step},
                    step=step)
        log.info("step %d val loss %.4f ppl %.2f", step, loss, perplexity(loss))
        return loss

    def run_final(self, step: int, metrics: MetricsLogger) -> float:
        """The validation at the end of the run (``val/final_loss``): logged, returned."""
        loss = self.loss(0 if self.final_full else self.max_tokens)
        metrics.log({M.VAL_LOSS: loss, M.VAL_PPL: perplexity(loss), M.VAL_FINAL_LOSS: loss,
                     M.TRAIN_TOKENS: step * self.tokens_per_step}, step=step)
        log.info("final val loss %.4f ppl %.2f (%s)", loss, perplexity(loss),
                 "full validation split" if self.final_full else f"{self.max_tokens} tokens")
        return loss
