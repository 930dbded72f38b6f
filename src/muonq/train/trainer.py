"""The training loop: data -> model -> optimizer, with validation, checkpoints and metrics."""

from __future__ import annotations

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
from tqdm import tqdm

from muonq import metric_names as M
from muonq.data import TokenLoader, check_dataset, dataset_dir, resolve_data_dir
from muonq.models import build_model
from muonq.optim.zero import ShardedOptimizer, build_sharded_optimizer, shard_file
from muonq.train import distributed as dist_utils
from muonq.train import guard
from muonq.train.checkpoint import CheckpointManager
from muonq.train.hooks import Hooks, load_plugins
from muonq.train.metrics import MetricsLogger
from muonq.train.parallelize import autocast_context, gradient_sync, parallelize
from muonq.train.schedule import lr_multiplier, total_steps
from muonq.train.validate import validation_loss

log = logging.getLogger("muonq")

# Dense bf16 peak FLOP/s used for MFU, by a substring of the CUDA device name.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


class NonFiniteError(RuntimeError):
    """Raised when the loss or a gradient is not finite and the policy is ``stop`` or ``abort``."""


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


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host batch on ``device`` without making the host wait: a copy from pageable memory to a
    GPU first waits for all work queued on the stream, one from pinned memory does not."""
    if device.type == "cuda":
        batch = batch.pin_memory()  # the caching host allocator keeps it until the copy is done
    return batch.to(device, non_blocking=True)


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
        named_hidden = self.model.hidden_matrices()
        hidden_ids = {id(p) for _, p in named_hidden}
        named_others = [(n, p) for n, p in self.model.named_parameters() if id(p) not in hidden_ids]
        # ZeRO-1 (optimizer_params.zero; on by default under torchrun): each rank keeps the state of
        # the parameters it owns; world size 1 is the same code with everything owned locally.
        self.optimizer: ShardedOptimizer = build_sharded_optimizer(
            cfg.optimizer_params, named_hidden=named_hidden, named_others=named_others,
            rank=self.dist.rank, world_size=world, device_type=self.device.type,
        )
        self.train_model: torch.nn.Module = parallelize(self.model, self.dist, tp)
        self.autocast = autocast_context(self.device, autocast=tp.autocast, mixed_precision=tp.mixed_precision)
        self.loader = TokenLoader(
            self.data_path, "train", batch_size=tp.batch_size, seq_len=tp.context_length,
            rank=self.dist.rank, world_size=world, seed=cfg.seed,
        )
        log_cfg = cfg.logging_params
        self.checkpoints = CheckpointManager(log_cfg.checkpoint_dir or Path("checkpoints") / run_name, keep_last=log_cfg.keep_last)
        self.state = TrainState()
        self.hooks = Hooks()
        load_plugins(self)  # $MUONQ_PLUGINS: extensions and the tests' fault injection

    # -- checkpoints ---------------------------------------------------------------------------
    def _checkpoint_payload(self) -> dict[str, Any]:
        return {
            "step": self.state.step,
            "skipped_steps": self.state.skipped_steps,
            "model": self.model.state_dict(),
            "loader": self.loader.state_dict(),
            "rng": rng_state(),
            "wandb_id": self.state.wandb_id,
            "optimizer_name": self.cfg.optimizer_params.name,
            "model_config": OmegaConf.to_container(self.cfg.recipe.model),
            "config": OmegaConf.to_container(self.cfg, resolve=True),  # for evaluate / export
            "world_size": self.dist.world_size,
        }

    def save_checkpoint(self) -> None:
        """Rank 0 writes main.pt, each optimizer shard's rank its ``optim_rankNNNNN.pt`` (rank 0 alone
        when unsharded), into one partial folder; rank 0 then commits it with the owner map in the
        manifest. Every rank calls this."""
        step = self.state.step
        if self.dist.is_main:
            self.checkpoints.begin(step)
        dist_utils.barrier()
        if self.dist.is_main:
            self.checkpoints.write_part(step, "main.pt", self._checkpoint_payload())
        if self.dist.rank == self.optimizer.rank:
            self.checkpoints.write_part(step, shard_file(self.optimizer.rank), self.optimizer.state_dict())
        dist_utils.barrier()
        if self.dist.is_main:
            partial = self.checkpoints.partial_dir(step)
            missing = [shard_file(r) for r in range(self.optimizer.world_size) if not (partial / shard_file(r)).is_file()]
            if missing:
                raise RuntimeError(
                    f"checkpoint {partial}: rank 0 does not see {', '.join(missing)} written by the other ranks; "
                    "with several nodes, logging_params.checkpoint_dir must be on a filesystem all nodes share"
                )
            path = self.checkpoints.commit(step, extra={"optimizer": self.optimizer.manifest()})
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
        shards = self.checkpoints.manifest(step).get("optimizer")
        if shards is None:
            raise ValueError(f"checkpoint {self.checkpoints.step_dir(step)} has no optimizer shards (an older format)")
        self.optimizer.load_state_dict([
            self.checkpoints.load(step, shard_file(r), map_location=self.device)
            for r in self.optimizer.shards_to_read(shards["owners"])
        ])
        self.loader.load_state_dict(payload["loader"])
        set_rng_state(payload["rng"])
        self.state.step = payload["step"]
        self.state.skipped_steps = payload["skipped_steps"]
        self.state.wandb_id = payload["wandb_id"]
        self.state.resumed_from = step
        log.info("resumed from %s at step %d", self.checkpoints.step_dir(step), self.state.step)
        return True

    # -- evaluation ----------------------------------------------------------------------------
    def validate(self, max_tokens: int) -> float:
        """The validation loss on ``max_tokens`` tokens (0: the whole split), over every rank."""
        tp = self.cfg.recipe.training_params
        return validation_loss(self.model, self.data_path, seq_len=tp.context_length, batch_size=tp.batch_size,
                               max_tokens=max_tokens, device=self.device, autocast=self.autocast,
                               rank=self.dist.rank, world_size=self.dist.world_size)[0]

    # -- training ------------------------------------------------------------------------------
    def _micro_steps(self) -> torch.Tensor:
        """Forward/backward over the accumulation window; returns the summed mean loss (on device)."""
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(self.grad_accum):
            x, y = self.loader.next_batch()
            x, y = to_device(x, self.device), to_device(y, self.device)
            last = micro == self.grad_accum - 1
            sync = gradient_sync(self.train_model, self.dist, sync=last)
            with sync, self.autocast:
                loss = self.train_model(x, y) / self.grad_accum
            with sync:
                loss.backward()
            loss_sum += loss.detach()
        return loss_sum

    def log_state_bytes(self) -> dict[str, float]:
        """Optimizer-state bytes of every rank and in total (a collective: every rank calls it)."""
        report = self.optimizer.state_report()
        per_rank, total = report["per_rank"], report["total"]
        metrics: dict[str, float] = {
            M.STATE_BYTES_TOTAL: total, M.STATE_BYTES_RANK: per_rank[self.optimizer.rank],
            M.STATE_BYTES_RANK_MAX: max(per_rank),
        }
        for name, nbytes in report["per_optimizer"].items():
            metrics[M.state_bytes_of(name)] = nbytes
        if len(per_rank) > 1:
            where = f"ZeRO-1 over {len(per_rank)} ranks: " + ", ".join(M.format_bytes(b) for b in per_rank)
        else:
            where = "replicated on every rank (optimizer_params.zero=false)" if self.dist.distributed else "one rank"
        line = f"optimizer state: {M.format_bytes(total)} total, {where}"
        if "muon" in report["per_optimizer"]:
            muon, n_muon = report["per_optimizer"]["muon"], report["numel"]["muon"]
            per_elem = muon / max(1, n_muon)
            metrics[M.MUON_BYTES_PER_PARAM] = per_elem
            metrics[M.MUON_RATIO_VS_FP32] = 4.0 / per_elem if per_elem else float("nan")
            line += (f"; Muon: {M.format_bytes(muon)} over {n_muon} params = {per_elem:.3f} bytes/param, "
                     f"{4.0 / per_elem if per_elem else float('nan'):.2f}x less than fp32 Muon")
        log.info(line)
        return metrics

    def _first_nonfinite_param(self) -> str:
        """The first parameter (model order) whose gradient is not finite, and its optimizer group."""
        from muonq.config import MUON_FAMILY

        hidden = {id(p) for _, p in self.model.hidden_matrices()}
        muon = self.cfg.optimizer_params.name in MUON_FAMILY
        for name, p in self.model.named_parameters():
            if p.grad is not None and not torch.isfinite(p.grad).all():
                return f"{name}, {'Muon' if muon and id(p) in hidden else 'AdamW'} group"
        return "the loss itself; gradients are finite"

    def fit(self) -> dict[str, Any]:
        """Train to ``total_steps``. SIGTERM/SIGINT stop at the next step boundary with a checkpoint
        (:class:`~muonq.train.guard.StopRequested`); a non-finite step is skipped or stops the run
        (``recipe.training_params.nonfinite``; with ``abort`` both decisions are read a step late,
        so the step never waits for the device). Every rank takes both decisions together."""
        with guard.StopSignals() as signals:
            return self._fit(signals)

    def _fit(self, signals: guard.StopSignals) -> dict[str, Any]:
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
        acc_steps = steps_since = 0  # applied / all steps since the last log line
        t_last, tokens_since = time.perf_counter(), 0
        t_start = time.perf_counter()
        bytes_logged = False
        last_val: float | None = None
        saved_at = self.state.resumed_from  # newest checkpoint on disk for this run's current state
        self.train_model.train()
        params = [p for p in self.model.parameters()]
        clip = tp.gradnorm if tp.gradnorm > 0 else float("inf")
        # nonfinite=abort: each step's verdict is read a step late (no host synchronisation in the step)
        late = tp.nonfinite == "abort"
        pending: guard.LateVerdict | None = None

        def settle() -> bool:
            """Read the pending late verdict, if any: raise if its step was non-finite, else return
            whether a stop was requested."""
            nonlocal pending
            if pending is None:
                return False
            verdict, pending = pending, None
            bad, stop, local = verdict.read()
            if bad:
                where = guard.first_report(local)
                resume = (f"the newest checkpoint is step {saved_at} in {self.checkpoints.step_dir(saved_at)} "
                          "(rerun with resume=true)" if saved_at is not None else "no checkpoint was saved")
                raise NonFiniteError(
                    f"step {verdict.step}: non-finite loss or gradient ({where}); with "
                    f"recipe.training_params.nonfinite=abort the optimizer had already applied it, so this state "
                    f"is not saved; {resume}; lower the learning rate, or use nonfinite=stop or skip"
                )
            return stop

        def stop_now(done: int) -> guard.StopRequested:
            nonlocal saved_at
            if saved_at != done:
                self.save_checkpoint()
                saved_at = done
            sig = signals.received or "a signal on another rank"
            return guard.StopRequested(
                f"{sig}: stopped after step {done}/{self.total_steps} with a checkpoint in "
                f"{self.checkpoints.step_dir(done)}; rerun the same command with resume=true (or resume=auto) "
                "to continue", step=done, signal_name=sig,
            )

        try:
            while self.state.step < self.total_steps:
                step = self.state.step
                lr_mult = lr_multiplier(step, self.total_steps, name=cfg.lr_schedule.name,
                                        warm_up_fraction=cfg.lr_schedule.warm_up_fraction,
                                        min_lr_ratio=cfg.lr_schedule.min_lr_ratio)
                self.optimizer.set_lr_multiplier(lr_mult)
                loss = self._micro_steps()
                self.hooks.run_after_backward(self, step + 1)
                # clip_grad_norm_ split in two, so a non-finite gradient is seen before clipping
                # spreads it to every parameter (same arithmetic, same bits)
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=True)
                if late:
                    # the previous step's verdict: the device finished it while this step's forward
                    # and backward were being queued, so reading it does not wait
                    stopping = settle()
                    pending = guard.LateVerdict(step + 1, loss, grad_norm, signals.received is not None)
                    bad = False
                else:
                    local_bad = not bool(torch.isfinite(grad_norm) & torch.isfinite(loss))
                    bad, stopping = guard.agree(local_bad, signals.received is not None, device=self.device)
                if bad:
                    where = guard.first_report(self._first_nonfinite_param() if local_bad else None)
                    self.optimizer.zero_grad(set_to_none=True)
                    if tp.nonfinite == "stop":
                        if saved_at != self.state.step:
                            self.save_checkpoint()
                        raise NonFiniteError(
                            f"step {step + 1}: non-finite loss or gradient (first in {where}); "
                            f"checkpoint of step {self.state.step} saved in {self.checkpoints.step_dir(self.state.step)}; "
                            "lower the learning rate, or resume with recipe.training_params.nonfinite=skip"
                        )
                    self.state.skipped_steps += 1
                    if self.dist.is_main:
                        log.warning("step %d: non-finite loss/gradient (first in %s); step skipped (%d so far)",
                                    step + 1, where, self.state.skipped_steps)
                else:
                    torch.nn.utils.clip_grads_with_norm_(params, clip, grad_norm, foreach=True)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    loss_acc += loss
                    acc_steps += 1
                self.state.step += 1
                bar.update(1)
                steps_since += 1
                tokens_since += tokens_per_step
                done = self.state.step
                if not bytes_logged:
                    metrics.log(self.log_state_bytes(), step=done)
                    bytes_logged = True
                if done % log_cfg.log_step == 0 or done == self.total_steps:
                    stopping |= settle()  # the row reads the loss and gradient norm anyway
                    now = time.perf_counter()
                    tok_s = tokens_since / (now - t_last)
                    row = {M.TRAIN_GRAD_NORM: float(grad_norm), M.TRAIN_LR_MULT: lr_mult,
                           M.PERF_TOKENS_PER_S: tok_s, M.PERF_STEP_TIME_S: (now - t_last) / steps_since,
                           M.PERF_PEAK_MEMORY_BYTES: peak_memory_bytes(self.device), M.TRAIN_TOKENS: done * tokens_per_step}
                    train_loss = float("nan")
                    if acc_steps:  # the same on every rank (skips are agreed)
                        train_loss = float(dist_utils.all_reduce_mean(loss_acc / acc_steps))
                        row[M.TRAIN_LOSS] = train_loss
                    if self.state.skipped_steps:
                        row[M.TRAIN_SKIPPED_STEPS] = self.state.skipped_steps
                    for name, opt in self.optimizer:
                        row[M.train_lr(name)] = float(opt.param_groups[0]["lr"])  # torchao keeps a tensor
                    if peak:
                        row[M.PERF_MFU] = flops_per_token * tok_s / (peak * self.dist.world_size)
                    metrics.log(row, step=done)
                    log.info("step %d/%d | loss %.4f | lr x%.3f | grad %.3f | %s tok/s", done, self.total_steps,
                             train_loss, lr_mult, float(grad_norm), f"{tok_s:,.0f}")
                    loss_acc.zero_()
                    acc_steps, steps_since, tokens_since, t_last = 0, 0, 0, time.perf_counter()
                if log_cfg.val_step and done % log_cfg.val_step == 0 and done < self.total_steps:
                    stopping |= settle()
                    last_val = self.validate(log_cfg.val_tokens_processed)
                    metrics.log({M.VAL_LOSS: last_val, M.VAL_PPL: math.exp(min(last_val, 50.0)),
                                 M.TRAIN_TOKENS: done * tokens_per_step}, step=done)
                    log.info("step %d val loss %.4f ppl %.2f", done, last_val, math.exp(min(last_val, 50.0)))
                    t_last = time.perf_counter()
                if log_cfg.save_checkpoint and done % log_cfg.save_ckpt_step == 0:
                    stopping |= settle()  # never write a checkpoint of state that took a non-finite step
                    self.save_checkpoint()
                    saved_at = done
                    t_last = time.perf_counter()
                if stopping:
                    settle()
                    raise stop_now(done)
            settle()
            # a signal that came during the last step: stop before the (possibly long) final validation
            if guard.agree(signals.received is not None, device=self.device)[0]:
                raise stop_now(self.state.step)
            final_val = self.validate(0 if log_cfg.final_full_val else log_cfg.val_tokens_processed)
            metrics.log({M.VAL_LOSS: final_val, M.VAL_PPL: math.exp(min(final_val, 50.0)), M.VAL_FINAL_LOSS: final_val,
                         M.TRAIN_TOKENS: self.state.step * tokens_per_step}, step=self.state.step)
            log.info("final val loss %.4f ppl %.2f (%s)", final_val, math.exp(min(final_val, 50.0)),
                     "full validation split" if log_cfg.final_full_val else f"{log_cfg.val_tokens_processed} tokens")
            if log_cfg.save_checkpoint and saved_at != self.state.step:
                self.save_checkpoint()
        finally:
            bar.close()
            metrics.close()
        return {"steps": self.state.step, "final_val_loss": final_val, "skipped_steps": self.state.skipped_steps,
                "resumed_from": self.state.resumed_from, "wall_s": time.perf_counter() - t_start, "wandb_id": self.state.wandb_id,
                "last_val_loss": last_val}
