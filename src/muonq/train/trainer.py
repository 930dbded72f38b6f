"""The training loop: data -> model -> optimizer, with validation, checkpoints and metrics."""

from __future__ import annotations

import contextlib
import logging
import math
import random
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from muonq.data import TokenLoader, check_dataset, dataset_dir, resolve_data_dir, validation_batches
from muonq.models import build_model
from muonq.optim.build import build_optimizer
from muonq.optim.optimizer_set import OptimizerSet
from muonq.optim.variants import state_bytes
from muonq.train import distributed as dist_utils
from muonq.train.checkpoint import CheckpointManager
from muonq.train.metrics import MetricsLogger
from muonq.train.schedule import lr_multiplier

log = logging.getLogger("muonq")

# Dense bf16 peak FLOP/s used for MFU, by a substring of the CUDA device name.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


class NonFiniteError(RuntimeError):
    """Raised when the loss or a gradient is not finite and the policy is ``stop``."""


@dataclass
class TrainState:
    step: int = 0  # optimizer steps completed
    skipped_steps: int = 0
    wandb_id: str | None = None
    resumed_from: int | None = None


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def total_steps(cfg: DictConfig) -> int:
    tp, ds = cfg.recipe.training_params, cfg.recipe.dataset
    steps = max(1, int(ds.total_tokens_B * 1e9) // tp.tokens_processed)
    return min(steps, tp.max_steps) if tp.max_steps else steps


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    np_state = np.random.get_state()
    state["numpy"] = {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                      "has_gauss": int(np_state[3]), "gauss": float(np_state[4])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(v if not isinstance(v, list) else tuple(v) for v in state["python"]))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.2f} GiB"


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

        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.set_float32_matmul_precision(tp.tensorcore_precision)
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.recipe.model)
        self.model.init_weights()
        self.model.to(self.device)
        hidden = [p for _, p in self.model.hidden_matrices()]
        hidden_ids = {id(p) for p in hidden}
        others = [p for p in self.model.parameters() if id(p) not in hidden_ids]
        self.optimizer: OptimizerSet = build_optimizer(
            cfg.optimizer_params, hidden=hidden, others=others, device_type=self.device.type
        )
        self.train_model: torch.nn.Module = self.model
        if self.dist.distributed:
            self.train_model = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if tp.compile:
            self.train_model = torch.compile(self.train_model)
        self.autocast = (
            torch.autocast("cuda", dtype=getattr(torch, tp.mixed_precision))
            if self.device.type == "cuda" and tp.autocast and tp.mixed_precision != "float32"
            else contextlib.nullcontext()
        )
        self.loader = TokenLoader(
            self.data_path, "train", batch_size=tp.batch_size, seq_len=tp.context_length,
            rank=self.dist.rank, world_size=world, seed=cfg.seed,
        )
        log_cfg = cfg.logging_params
        self.checkpoints = CheckpointManager(log_cfg.checkpoint_dir or Path("checkpoints") / run_name, keep_last=log_cfg.keep_last)
        self.state = TrainState()

    # -- checkpoints ---------------------------------------------------------------------------
    def _checkpoint_payload(self) -> dict[str, Any]:
        return {
            "step": self.state.step,
            "skipped_steps": self.state.skipped_steps,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "loader": self.loader.state_dict(),
            "rng": rng_state(),
            "wandb_id": self.state.wandb_id,
            "optimizer_name": self.cfg.optimizer_params.name,
            "model_config": OmegaConf.to_container(self.cfg.recipe.model),
        }

    def save_checkpoint(self) -> None:
        if self.dist.is_main:
            path = self.checkpoints.save(self.state.step, self._checkpoint_payload())
            log.info("checkpoint %s", path)
        dist_utils.barrier()

    def maybe_resume(self) -> bool:
        """Load the newest intact checkpoint when ``resume`` asks for it; True if one was loaded."""
        mode = str(self.cfg.resume).lower()
        if mode == "false":
            return False
        step = self.checkpoints.latest_valid() if self.dist.is_main else None
        step = dist_utils.broadcast_object(step)
        if step is None:
            if mode == "true":
                raise FileNotFoundError(
                    f"resume=true but no complete checkpoint in {self.checkpoints.directory}; "
                    "use resume=auto to start fresh when none exists"
                )
            return False
        payload = self.checkpoints.load(step, map_location=self.device)
        if payload["optimizer_name"] != self.cfg.optimizer_params.name:
            raise ValueError(
                f"checkpoint {self.checkpoints.step_dir(step)} was written by optimizer "
                f"{payload['optimizer_name']!r}, this run uses {self.cfg.optimizer_params.name!r}"
            )
        try:
            self.model.load_state_dict(payload["model"])
        except RuntimeError as err:
            raise ValueError(
                f"checkpoint {self.checkpoints.step_dir(step)} holds a model of another shape "
                f"({payload['model_config']}): {str(err).splitlines()[0]}"
            ) from err
        self.optimizer.load_state_dict(payload["optimizer"])
        self.loader.load_state_dict(payload["loader"])
        set_rng_state(payload["rng"])
        self.state.step = payload["step"]
        self.state.skipped_steps = payload["skipped_steps"]
        self.state.wandb_id = payload["wandb_id"]
        self.state.resumed_from = step
        log.info("resumed from %s at step %d", self.checkpoints.step_dir(step), self.state.step)
        return True

    # -- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, max_tokens: int) -> float:
        tp = self.cfg.recipe.training_params
        self.model.eval()
        total = torch.zeros((), device=self.device)
        batches = 0
        for x, y in validation_batches(
            self.data_path, batch_size=tp.batch_size, seq_len=tp.context_length, max_tokens=max_tokens,
            rank=self.dist.rank, world_size=self.dist.world_size,
        ):
            with self.autocast:
                total += self.model(x.to(self.device), y.to(self.device)).float()
            batches += 1
        self.model.train()
        if batches == 0:
            raise ValueError(f"validation split of {self.data_path} is too small for one batch")
        return float(dist_utils.all_reduce_mean(total / batches))

    # -- training ------------------------------------------------------------------------------
    def _micro_steps(self) -> torch.Tensor:
        """Forward/backward over the accumulation window; returns the summed mean loss (on device)."""
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(self.grad_accum):
            x, y = self.loader.next_batch()
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            last = micro == self.grad_accum - 1
            sync = self.train_model.no_sync() if self.dist.distributed and not last else contextlib.nullcontext()
            with sync, self.autocast:
                loss = self.train_model(x, y) / self.grad_accum
            with sync:
                loss.backward()
            loss_sum += loss.detach()
        return loss_sum

    def _first_nonfinite_group(self) -> str:
        for name, opt in self.optimizer:
            for i, group in enumerate(opt.param_groups):
                if any(p.grad is not None and not torch.isfinite(p.grad).all() for p in group["params"]):
                    return f"{name}[{i}] ({group.get('role', 'params')})"
        return "none (the loss itself)"

    def log_state_bytes(self) -> dict[str, float]:
        counts = {name: state_bytes(opt) for name, opt in self.optimizer}
        total = sum(c["total"] for c in counts.values())
        metrics: dict[str, float] = {"optim/state_bytes": total}
        for name, c in counts.items():
            metrics[f"optim/state_bytes_{name}"] = c["total"]
        muon = counts.get("muon")
        if muon is not None:
            n_muon = sum(p.numel() for g in self.optimizer.optimizers["muon"].param_groups for p in g["params"])
            per_elem = muon["total"] / max(1, n_muon)
            metrics["optim/muon_bytes_per_param"] = per_elem
            metrics["optim/muon_ratio_vs_fp32"] = 4.0 / per_elem if per_elem else float("nan")
            log.info(
                "optimizer state: %s total (rank %d); Muon: %s over %d params = %.3f bytes/param, %.2fx less than fp32 Muon",
                format_bytes(total), self.dist.rank, format_bytes(muon["total"]), n_muon, per_elem, 4.0 / per_elem,
            )
        else:
            log.info("optimizer state: %s total (rank %d)", format_bytes(total), self.dist.rank)
        return metrics

    def fit(self) -> dict[str, Any]:
        cfg, tp, log_cfg = self.cfg, self.cfg.recipe.training_params, self.cfg.logging_params
        metrics = MetricsLogger(
            enabled=self.dist.is_main, run_name=self.run_name, run_dir=self.run_dir,
            wandb_kwargs=OmegaConf.to_container(log_cfg.wandb), config=OmegaConf.to_container(cfg, resolve=True),
            resume_id=self.state.wandb_id,
        )
        self.state.wandb_id = metrics.wandb_id or self.state.wandb_id
        n_params = self.model.num_params()
        tokens_per_step = tp.tokens_processed
        log.info(
            "run %s: %s model, %.2fM params, %d steps x %d tokens (%d ranks x %d seq x %d tokens x %d accum), %s",
            self.run_name, cfg.recipe.model.model_type, n_params / 1e6, self.total_steps, tokens_per_step,
            self.dist.world_size, tp.batch_size, tp.context_length, self.grad_accum, self.device,
        )
        flops_per_token = self.model.flops_per_token(tp.context_length)
        peak = peak_flops(self.device)
        show_bar = self.dist.is_main and sys.stderr.isatty()
        bar = tqdm(total=self.total_steps, initial=self.state.step, disable=not show_bar, dynamic_ncols=True,
                   desc=self.run_name, leave=False, mininterval=2.0)
        loss_acc = torch.zeros((), device=self.device)
        acc_steps = 0
        t_last, tokens_since = time.perf_counter(), 0
        t_start = time.perf_counter()
        bytes_logged = False
        last_val: float | None = None
        self.train_model.train()
        params = [p for p in self.model.parameters()]
        clip = tp.gradnorm if tp.gradnorm > 0 else float("inf")
        try:
            while self.state.step < self.total_steps:
                step = self.state.step
                lr_mult = lr_multiplier(step, self.total_steps, name=cfg.lr_schedule.name,
                                        warm_up_fraction=cfg.lr_schedule.warm_up_fraction,
                                        min_lr_ratio=cfg.lr_schedule.min_lr_ratio)
                self.optimizer.set_lr_multiplier(lr_mult)
                loss = self._micro_steps()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
                if not bool(torch.isfinite(grad_norm) & torch.isfinite(loss)):
                    where = self._first_nonfinite_group()
                    if tp.nonfinite == "skip":
                        self.state.skipped_steps += 1
                        log.warning("step %d: non-finite loss/gradient in %s; step skipped (%d so far)",
                                    step + 1, where, self.state.skipped_steps)
                        self.optimizer.zero_grad(set_to_none=True)
                        self.state.step += 1
                        bar.update(1)
                        continue
                    self.optimizer.zero_grad(set_to_none=True)
                    self.save_checkpoint()
                    raise NonFiniteError(
                        f"step {step + 1}: non-finite loss or gradient (first in {where}); "
                        f"checkpoint of step {self.state.step} saved in {self.checkpoints.directory}"
                    )
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.state.step += 1
                bar.update(1)
                loss_acc += loss
                acc_steps += 1
                tokens_since += tokens_per_step
                done = self.state.step
                if not bytes_logged:
                    metrics.log(self.log_state_bytes(), step=done)
                    bytes_logged = True
                if done % log_cfg.log_step == 0 or done == self.total_steps:
                    now = time.perf_counter()
                    train_loss = float(dist_utils.all_reduce_mean(loss_acc / acc_steps))
                    tok_s = tokens_since / (now - t_last)
                    row = {"train/loss": train_loss, "train/grad_norm": float(grad_norm), "train/lr_mult": lr_mult,
                           "perf/tokens_per_s": tok_s, "perf/step_time_s": (now - t_last) / acc_steps,
                           "perf/peak_memory_bytes": peak_memory_bytes(self.device), "train/tokens": done * tokens_per_step}
                    for name, opt in self.optimizer:
                        row[f"train/lr_{name}"] = opt.param_groups[0]["lr"]
                    if peak:
                        row["perf/mfu"] = flops_per_token * tok_s / (peak * self.dist.world_size)
                    metrics.log(row, step=done)
                    log.info("step %d/%d | loss %.4f | lr x%.3f | grad %.3f | %s tok/s", done, self.total_steps,
                             train_loss, lr_mult, float(grad_norm), f"{tok_s:,.0f}")
                    loss_acc.zero_()
                    acc_steps, tokens_since, t_last = 0, 0, time.perf_counter()
                if log_cfg.val_step and done % log_cfg.val_step == 0 and done < self.total_steps:
                    last_val = self.validate(log_cfg.val_tokens_processed)
                    metrics.log({"val/loss": last_val, "val/ppl": math.exp(min(last_val, 50.0)),
                                 "train/tokens": done * tokens_per_step}, step=done)
                    log.info("step %d val loss %.4f ppl %.2f", done, last_val, math.exp(min(last_val, 50.0)))
                    t_last = time.perf_counter()
                if log_cfg.save_checkpoint and done % log_cfg.save_ckpt_step == 0:
                    self.save_checkpoint()
                    t_last = time.perf_counter()
            final_val = self.validate(0 if log_cfg.final_full_val else log_cfg.val_tokens_processed)
            metrics.log({"val/loss": final_val, "val/ppl": math.exp(min(final_val, 50.0)), "val/final_loss": final_val,
                         "train/tokens": self.state.step * tokens_per_step}, step=self.state.step)
            log.info("final val loss %.4f ppl %.2f (%s)", final_val, math.exp(min(final_val, 50.0)),
                     "full validation split" if log_cfg.final_full_val else f"{log_cfg.val_tokens_processed} tokens")
            if log_cfg.save_checkpoint and self.state.step % log_cfg.save_ckpt_step != 0:
                self.save_checkpoint()
        finally:
            bar.close()
            metrics.close()
        return {"steps": self.state.step, "final_val_loss": final_val, "skipped_steps": self.state.skipped_steps,
                "resumed_from": self.state.resumed_from, "wall_s": time.perf_counter() - t_start, "wandb_id": self.state.wandb_id,
                "last_val_loss": last_val}
