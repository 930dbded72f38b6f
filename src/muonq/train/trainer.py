"""The training loop: data -> model -> optimizer, with validation, checkpoints and metrics.

:meth:`Trainer.fit` runs :meth:`Trainer.train_step` per optimizer step, which runs
:meth:`Trainer.forward_backward_step` over the accumulation window; what happens around a step is
each in its own object: the non-finite policy (:mod:`muonq.train.nonfinite`), preemption
(:mod:`muonq.train.preemption`), validation (:class:`~muonq.train.validate.Validator`),
checkpoints (:class:`~muonq.train.checkpointer.Checkpointer`), the log line
(:class:`~muonq.train.metrics.LogWindow`), extension callbacks (:mod:`muonq.train.hooks`), and how
the model is wrapped for the devices (:mod:`muonq.train.parallelize`).
"""

from __future__ import annotations

import logging
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from muonq import metric_names as M
from muonq.config import optimizer_spec
from muonq.data import TokenLoader, check_dataset, dataset_dir, resolve_data_dir
from muonq.models import build_model
from muonq.optim.owned import OwnedMuonOptimizer
from muonq.optim.precision import matmul_dtype_line
from muonq.optim.zero import ShardedOptimizer, build_sharded_optimizer
from muonq.train import distributed as dist_utils
from muonq.train import guard
from muonq.train.checkpointer import Checkpointer, TrainState
from muonq.train.hooks import Hooks, load_plugins
from muonq.train.metrics import LogWindow, MetricsLogger, state_bytes_metrics
from muonq.train.nonfinite import POLICIES, NonFiniteError, NonFinitePolicy
from muonq.train.parallelize import autocast_context, gradient_sync, is_fsdp, local_bytes, parallelize, shard_group
from muonq.train.preemption import Preemption
from muonq.train.progress import Progress, progress
from muonq.train.schedule import lr_multiplier, total_steps
from muonq.train.validate import Validator

__all__ = ["NonFiniteError", "TrainState", "Trainer", "peak_flops", "peak_memory_bytes", "to_device"]

log = logging.getLogger("muonq")

# Dense bf16 peak FLOP/s used for MFU, by a substring of the CUDA device name.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host batch on ``device`` without making the host wait: a copy from pageable memory to a
    GPU first waits for all work queued on the stream, one from pinned memory does not."""
    if device.type == "cuda":
        batch = batch.pin_memory()  # the caching host allocator keeps it until the copy is done
    return batch.to(device, non_blocking=True)


@dataclass
class _Progress:
    """What one :meth:`Trainer.fit` carries from step to step besides :class:`TrainState`."""

    metrics: MetricsLogger
    window: LogWindow
    bar: Progress
    flops_per_token: float
    peak: float | None
    bytes_logged: bool = False
    last_val: float | None = None


class Trainer:
    """One training run. Built from a validated :class:`~muonq.config.RunConfig` (as DictConfig)."""

    def __init__(self, cfg: DictConfig, *, run_name: str, run_dir: Path) -> None:
        self.cfg = cfg
        self.run_name = run_name
        self.run_dir = Path(run_dir)
        tp = cfg.recipe.training_params
        self.dist = dist_utils.init_distributed(cfg.device)
        self.device = self.dist.device
        world = self.dist.world_size
        self.grad_accum = tp.tokens_processed // (world * tp.batch_size * tp.context_length)
        self.total_steps = total_steps(cfg)

        # Data first: a missing or bad dataset must fail before any model or device work.
        self.data_path = dataset_dir(resolve_data_dir(cfg.data_dir), cfg.recipe.dataset.name, cfg.recipe.dataset.tokenizer)
        self.meta = check_dataset(self.data_path, seq_len=tp.context_length, model_vocab_size=cfg.recipe.model.vocab_size)

        self._build_model_and_optimizer()  # and self.train_model, the model as parallelized
        self.autocast = autocast_context(self.device, autocast=tp.autocast, mixed_precision=tp.mixed_precision)
        self.loader = TokenLoader(
            self.data_path, "train", batch_size=tp.batch_size, seq_len=tp.context_length,
            rank=self.dist.rank, world_size=world, seed=cfg.seed,
        )
        self.state = TrainState()
        self.checkpointer = Checkpointer(cfg, run_name=run_name, dist=self.dist, model=self.model,
                                         optimizer=self.optimizer, loader=self.loader, state=self.state)
        self.validator = Validator(self.model, self.data_path, logging_params=cfg.logging_params, training_params=tp,
                                   total_steps=self.total_steps, device=self.device, autocast=self.autocast,
                                   rank=self.dist.rank, world_size=world)
        self.nonfinite: NonFinitePolicy = POLICIES[tp.nonfinite](
            device=self.device, checkpointer=self.checkpointer, state=self.state, locate=self._first_nonfinite_param,
            discard_grads=lambda: self.optimizer.zero_grad(set_to_none=True), is_main=self.dist.is_main,
            max_consecutive_skips=tp.max_consecutive_skips,
        )
        self.preemption: Preemption | None = None  # while fit() runs
        self.hooks = Hooks()
        load_plugins(self)  # $MUONQ_PLUGINS: extensions and the tests' fault injection
        # last, so a failure above leaves no lock behind; released by close()
        self.folder_lock = self.checkpointer.lock_folder(self.run_dir)

    def close(self) -> None:
        """Release the checkpoint folder for other runs (rank 0; a no-op elsewhere)."""
        if self.folder_lock is not None:
            self.folder_lock.release()

    def _build_model_and_optimizer(self) -> None:
        tp = self.cfg.recipe.training_params
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.set_float32_matmul_precision(tp.tensorcore_precision)
        torch.manual_seed(self.cfg.seed)
        self.model = build_model(self.cfg.recipe.model)  # initialized once, by its constructor
        self.model.to(self.device)
        # before the optimizer: FSDP2 replaces the parameters by their shards
        self.train_model: torch.nn.Module = parallelize(self.model, self.dist, tp, self.cfg.parallelism)
        self.params = list(self.model.parameters())
        self.clip = tp.gradnorm if tp.gradnorm > 0 else float("inf")
        named_hidden = self.model.hidden_matrices()
        hidden_ids = {id(p) for _, p in named_hidden}
        named_others = [(n, p) for n, p in self.model.named_parameters() if id(p) not in hidden_ids]
        # elements that fp32 Muon + fp32 AdamW would keep state for (global sizes, also under FSDP)
        self.state_numel = {"hidden_numel": sum(p.numel() for _, p in named_hidden),
                            "other_numel": sum(p.numel() for _, p in named_others)}
        # ZeRO-1 (optimizer_params.zero; on by default under torchrun): each rank keeps the state of
        # the parameters it owns; world size 1 is the same code with everything owned locally.
        self.optimizer_spec = optimizer_spec(self.cfg.optimizer_params)
        if is_fsdp(self.cfg.parallelism):  # AdamW on the shards, each Muon matrix whole on its owner
            group, rank, size = shard_group(self.model)  # HSDP: each shard group steps its own copy
            self.optimizer = OwnedMuonOptimizer(self.optimizer_spec, named_hidden, named_others, rank=rank,
                                                world_size=size, group=group, device_type=self.device.type,
                                                qkv_blocks=self.model.qkv_blocks())
            return
        self.optimizer: ShardedOptimizer = build_sharded_optimizer(
            self.optimizer_spec, named_hidden=named_hidden, named_others=named_others,
            rank=self.dist.rank, world_size=self.dist.world_size, device_type=self.device.type,
            qkv_blocks=self.model.qkv_blocks(),
        )

    # -- checkpoints and evaluation ------------------------------------------------------------
    def maybe_resume(self) -> bool:
        """Load the newest intact checkpoint when ``resume`` asks for it; True if one was loaded."""
        return self.checkpointer.resume(str(self.cfg.resume).lower())

    def validate(self, max_tokens: int) -> float:
        """The validation loss on ``max_tokens`` tokens (0: the whole split), over every rank."""
        return self.validator.loss(max_tokens)

    def log_state_bytes(self) -> dict[str, float]:
        """Optimizer-state bytes of every rank and in total (a collective: every rank calls it)."""
        metrics, line = state_bytes_metrics(self.optimizer.state_report(), rank=self.optimizer.rank,
                                            distributed=self.dist.distributed, **self.state_numel,
                                            sharding="FSDP (Muon state on owners)" if is_fsdp(self.cfg.parallelism) else "ZeRO-1")
        params = local_bytes(self.params)  # the gradients: one per trainable parameter, as its shard
        grads = local_bytes(p for p in self.params if p.requires_grad)
        sizes = torch.tensor([params, grads], dtype=torch.float64, device=self.device)
        if self.dist.distributed:
            torch.distributed.all_reduce(sizes, op=torch.distributed.ReduceOp.MAX)
        metrics[M.PARAM_BYTES_RANK_MAX], metrics[M.GRAD_BYTES_RANK_MAX] = (int(v) for v in sizes.tolist())
        log.info("%s; parameters %s, gradients %s on the largest rank (%s)", line,
                 M.format_bytes(metrics[M.PARAM_BYTES_RANK_MAX]), M.format_bytes(metrics[M.GRAD_BYTES_RANK_MAX]),
                 self.cfg.parallelism.name)
        return metrics

    def _optimizer_group_of(self, param: torch.nn.Parameter) -> str:
        """The optimizer that steps ``param``, as messages name it: "Muon" or "AdamW"."""
        muon = self.optimizer_spec.family == "muon"
        return "Muon" if muon and id(param) in {id(p) for _, p in self.model.hidden_matrices()} else "AdamW"

    def _first_nonfinite_param(self) -> str:
        """The first parameter (model order) whose gradient is not finite, and its optimizer group."""
        for name, p in self.model.named_parameters():
            if p.grad is not None and not torch.isfinite(p.grad).all():
                return f"{name}, {self._optimizer_group_of(p)} group"
        return "the loss itself; gradients are finite"

    # -- one step ------------------------------------------------------------------------------
    def forward_backward_step(self) -> torch.Tensor:
        """Forward/backward over the accumulation window; returns the summed mean loss (on device)."""
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(self.grad_accum):
            x, y = self.loader.next_batch()
            x, y = to_device(x, self.device), to_device(y, self.device)
            # forward and backward inside one context: DDP's no_sync is a one-shot context manager
            with gradient_sync(self.train_model, self.dist, sync=micro == self.grad_accum - 1):
                with self.autocast:
                    loss = self.train_model(x, y) / self.grad_accum
                loss.backward()
            loss_sum += loss.detach()
        return loss_sum

    def train_step(self, window: LogWindow) -> tuple[torch.Tensor, float, bool]:
        """One optimizer step: (its gradient norm before clipping, its lr multiplier, whether a
        stop was requested on some rank). The non-finite policy decides whether it is applied."""
        step = self.state.step + 1  # 1-based, as logged
        lr_mult = lr_multiplier(self.state.step, self.total_steps, name=self.cfg.lr_schedule.name,
                                warm_up_fraction=self.cfg.lr_schedule.warm_up_fraction,
                                min_lr_ratio=self.cfg.lr_schedule.min_lr_ratio)
        self.optimizer.set_lr_multiplier(lr_mult)
        loss = self.forward_backward_step()
        self.hooks.run_after_backward(self, step)
        # clip_grad_norm_ split in two, so a non-finite gradient is seen before clipping spreads it
        # to every parameter (same arithmetic, same bits)
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None], foreach=True)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: the norm of the local shards, reduced here
            grad_norm = grad_norm.full_tensor()
        apply, stopping = self.nonfinite.before_optimizer_step(step, loss, grad_norm, self.preemption.requested)
        if apply:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.clip, grad_norm, foreach=True)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        window.add(loss, applied=apply)
        self.state.step += 1
        return grad_norm, lr_mult, stopping

    # -- the loop ------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train to ``total_steps``. SIGTERM/SIGINT stop at the next step boundary with a checkpoint
        (:class:`~muonq.train.guard.StopRequested`); a non-finite step is skipped or stops the run
        (``recipe.training_params.nonfinite``; with ``abort`` both decisions are read a step late,
        so the step never waits for the device). Every rank takes both decisions together."""
        with guard.StopSignals() as signals:
            self.preemption = Preemption(signals, self.checkpointer, total_steps=self.total_steps, device=self.device)
            try:
                return self._fit()
            finally:
                self.preemption = None

    def _fit(self) -> dict[str, Any]:
        progress = self._start()
        t_start = time.perf_counter()
        self.train_model.train()
        try:
            while self.state.step < self.total_steps:
                grad_norm, lr_mult, stopping = self.train_step(progress.window)
                progress.bar.update(1)
                self._after_step(progress, grad_norm, lr_mult, stopping)
            final_val = self._finish(progress)
        finally:
            progress.bar.close()
            progress.metrics.close()
        return {"steps": self.state.step, "final_val_loss": final_val, "skipped_steps": self.state.skipped_steps,
                "resumed_from": self.state.resumed_from, "wall_s": time.perf_counter() - t_start,
                "wandb_id": self.state.wandb_id, "last_val_loss": progress.last_val}

    def _start(self) -> _Progress:
        """Open the metrics (resuming the W&B run of a checkpoint), log what is about to run."""
        cfg, tp = self.cfg, self.cfg.recipe.training_params
        metrics = MetricsLogger(
            enabled=self.dist.is_main, run_name=self.run_name, run_dir=self.run_dir,
            wandb_kwargs=OmegaConf.to_container(cfg.logging_params.wandb),
            config=OmegaConf.to_container(cfg, resolve=True), resume_id=self.state.wandb_id,
        )
        self.state.wandb_id = metrics.wandb_id or self.state.wandb_id
        log.info(
            "run %s: %s model, %.2fM params, %d steps x %d tokens (%d ranks x %d seq x %d tokens x %d accum), %s",
            self.run_name, cfg.recipe.model.model_type, self.model.num_params() / 1e6, self.total_steps,
            tp.tokens_processed, self.dist.world_size, tp.batch_size, tp.context_length, self.grad_accum, self.device,
        )
        log.info("%s", matmul_dtype_line(self.optimizer_spec.muon, self.device))
        if metrics.log_file is not None:
            log.info("log file %s; metrics %s", metrics.log_file, self.run_dir / "metrics.jsonl")
        bar = progress(show=self.dist.is_main, total=self.total_steps, initial=self.state.step, desc=self.run_name,
                       every_s=cfg.logging_params.progress_every_s)
        window = LogWindow(self.device, tokens_per_step=tp.tokens_processed, every=cfg.logging_params.log_step,
                           total_steps=self.total_steps)
        return _Progress(metrics=metrics, window=window, bar=bar,
                         flops_per_token=self.model.flops_per_token(tp.context_length), peak=peak_flops(self.device))

    def _after_step(self, progress: _Progress, grad_norm: torch.Tensor, lr_mult: float, stopping: bool) -> None:
        """The step boundary: the log line, validation and checkpoint when due, then a stop if
        asked. Each reads a pending non-finite verdict first (a checkpoint never holds a
        non-finite step)."""
        done = self.state.step
        if not progress.bytes_logged:
            progress.metrics.log(self.log_state_bytes(), step=done)
            progress.bytes_logged = True
        if progress.window.should_log(done):
            stopping |= self.nonfinite.settle()  # the row reads the loss and gradient norm anyway
            self._log_line(progress, done, grad_norm, lr_mult)
        if self.validator.should_run(done):
            stopping |= self.nonfinite.settle()
            progress.last_val = self.validator.run(done, progress.metrics)
            progress.window.restart_clock()
        if self.checkpointer.should_save(done):
            stopping |= self.nonfinite.settle()
            self.checkpointer.save()
            progress.window.restart_clock()
        self._stop_if(stopping)

    def _stop_if(self, stopping: bool) -> None:
        """The one place a stop request ends the run: every rank agreed on ``stopping``; the last
        verdict is read, the step saved, and :class:`~muonq.train.guard.StopRequested` raised."""
        if stopping:
            self.nonfinite.settle()
            raise self.preemption.stop()

    def _finish(self, progress: _Progress) -> float:
        """After the last step: the last verdict, a stop that came during the last step (before the
        possibly long final validation), the final validation and checkpoint."""
        self.nonfinite.settle()
        self._stop_if(self.preemption.agreed())
        self.nonfinite.at_end()
        final_val = self.validator.run_final(self.state.step, progress.metrics)
        self.checkpointer.save_final()
        return final_val

    def _log_line(self, progress: _Progress, done: int, grad_norm: torch.Tensor, lr_mult: float) -> None:
        window = progress.window
        tok_s, step_time = window.throughput()
        row = {M.TRAIN_GRAD_NORM: float(grad_norm), M.TRAIN_LR_MULT: lr_mult, M.PERF_TOKENS_PER_S: tok_s,
               M.PERF_STEP_TIME_S: step_time, M.PERF_PEAK_MEMORY_BYTES: peak_memory_bytes(self.device),
               M.TRAIN_TOKENS: done * window.tokens_per_step}
        train_loss = window.mean_loss()
        if train_loss is not None:
            row[M.TRAIN_LOSS] = train_loss
        if self.state.skipped_steps:
            row[M.TRAIN_SKIPPED_STEPS] = self.state.skipped_steps
        for name, opt in self.optimizer:
            row[M.train_lr(name)] = float(opt.param_groups[0]["lr"])  # torchao keeps a tensor
        if progress.peak:
            row[M.PERF_MFU] = progress.flops_per_token * tok_s / (progress.peak * self.dist.world_size)
        progress.metrics.log(row, step=done)
        log.info("step %d/%d | loss %.4f | lr x%.3f | grad %.3f | %s tok/s", done, self.total_steps,
                 float("nan") if train_loss is None else train_loss, lr_mult, float(grad_norm), f"{tok_s:,.0f}")
        window.reset()
