"""A run's checkpoints: what one holds, when one is written, and resuming from the newest.

Storage (atomic folders, checksums, pruning) is :class:`~muonq.train.checkpoint.CheckpointManager`;
this adds the run's side: the payload (loader, RNG streams, counters, config, and the whole model,
or under FSDP2 each rank's rows of it: :mod:`muonq.train.model_rows`), the optimizer shards written
by their ranks (ZeRO-1's or FSDP's owners: one format for both), the
cadence (``logging_params.save_checkpoint`` every ``save_ckpt_step`` steps), which step is already
on disk, so no state is written twice, and the lock that keeps other runs out of the folder
(:mod:`muonq.train.folder_lock`).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from muonq.config import checkpoint_dir_for
from muonq.data import TokenLoader
from muonq.errors import AgreedUserError, UserError
from muonq.optim.shard_format import shard_file
from muonq.optim.zero import ShardedOptimizer
from muonq.train import distributed as dist_utils
from muonq.train import guard
from muonq.train.checkpoint import CheckpointManager, every_checkpoint_rejected
from muonq.train.distributed import DistInfo
from muonq.train.folder_lock import FolderLock
from muonq.train.model_rows import checkpoint_shards, is_row_sharded, load_weights, local_rows, model_shard_file

log = logging.getLogger("muonq")


@dataclass
class TrainState:
    step: int = 0  # optimizer steps completed
    skipped_steps: int = 0
    wandb_id: str | None = None
    resumed_from: int | None = None


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


class Checkpointer:
    """Saves and restores the run's state (``state.step`` is the step a checkpoint is of). Every
    rank makes every call: saving and resuming are collectives."""

    def __init__(self, cfg: DictConfig, *, run_name: str, dist: DistInfo, model: torch.nn.Module,
                 optimizer: ShardedOptimizer, loader: TokenLoader, state: TrainState) -> None:
        log_cfg = cfg.logging_params
        self.manager = CheckpointManager(checkpoint_dir_for(cfg, run_name), keep_last=log_cfg.keep_last)
        self.cfg, self.dist, self.model, self.optimizer, self.loader, self.state = cfg, dist, model, optimizer, loader, state
        self.enabled, self.every = log_cfg.save_checkpoint, log_cfg.save_ckpt_step
        self.saved_at: int | None = None  # the step of the newest checkpoint of this run's current state

    def step_dir(self, step: int) -> Path:
        return self.manager.step_dir(step)

    # -- cadence ---------------------------------------------------------------------------------
    def should_save(self, step: int) -> bool:
        return bool(self.enabled) and step % self.every == 0

    def ensure_saved(self) -> None:
        """A checkpoint of the current step, unless one is on disk already (a stop)."""
        if self.saved_at != self.state.step:
            self.save()

    def save_final(self) -> None:
        """At the end of the run: the last step, when checkpoints are on and it has none yet."""
        if self.enabled:
            self.ensure_saved()

    # -- writing ---------------------------------------------------------------------------------
    def _payload(self) -> dict[str, Any]:
        weights = ({"model_shards": self.optimizer.world_size} if is_row_sharded(self.model)
                   else {"model": self.model.state_dict()})
        return {
            "step": self.state.step,
            "skipped_steps": self.state.skipped_steps,
            **weights,
            "loader": self.loader.state_dict(),
            "rng": rng_state(),
            "wandb_id": self.state.wandb_id,
            "optimizer_name": self.cfg.optimizer_params.name,
            "model_config": OmegaConf.to_container(self.cfg.recipe.model),
            "config": OmegaConf.to_container(self.cfg, resolve=True),  # for evaluate / export
            "world_size": self.dist.world_size,
        }

    def save(self) -> None:
        """Rank 0 writes main.pt, each optimizer shard's rank its ``optim_rankNNNNN.pt`` (rank 0 alone
        when unsharded), and under FSDP2 its rows of the model, ``model_rankNNNNN.pt``, into one
        partial folder; rank 0 then commits it with the owner map in the manifest. Under HSDP the
        first shard group writes. Weights that are not finite are never saved
        (:meth:`check_weights_finite`)."""
        step = self.state.step
        self.check_weights_finite()
        if self.dist.is_main:
            self.manager.begin(step)
        dist_utils.barrier()
        if self.dist.is_main:
            self.manager.write_part(step, "main.pt", self._payload())
        if self.dist.rank == self.optimizer.rank:
            rank, shards = self.optimizer.rank, self.optimizer.world_size
            if is_row_sharded(self.model):
                self.manager.write_part(step, model_shard_file(rank), local_rows(self.model, rank=rank, shards=shards))
            self.manager.write_part(step, shard_file(rank), self.optimizer.state_dict())
        dist_utils.barrier()
        if self.dist.is_main:
            self._commit(step)
        dist_utils.barrier()
        self.saved_at = step

    def check_weights_finite(self) -> None:
        """Raise :class:`~muonq.train.guard.NonFiniteError` if a weight is not finite on some rank.

        The non-finite policies look at the loss and the gradients; an optimizer step can still
        turn finite gradients into infinite weights (an overflowing update), which only the next
        step's loss shows. A checkpoint of such weights would make every resume fail again."""
        params = [(name, p.to_local() if hasattr(p, "to_local") else p) for name, p in self.model.named_parameters()]
        finite = torch.stack([torch.isfinite(p).all() for _, p in params]) if params else torch.ones(1, dtype=torch.bool)
        first = None if bool(finite.all()) else params[int((~finite).nonzero()[0])][0]
        if not guard.agree(first is not None, device=self.dist.device)[0]:
            return
        where = guard.first_report(first)
        newest = (f"the newest checkpoint is step {self.saved_at} in {self.step_dir(self.saved_at)}: rerun with "
                  "resume=true and a lower learning rate" if self.saved_at is not None else
                  "no checkpoint was saved: start over with a lower learning rate")
        raise guard.NonFiniteError(
            f"step {self.state.step}: the weights are not finite (first in {where}) though the loss and gradients "
            f"checked so far were: an optimizer update overflowed; this state is not saved; {newest}"
        )

    def _commit(self, step: int) -> None:
        partial = self.manager.partial_dir(step)
        files = [shard_file(r) for r in range(self.optimizer.world_size)]
        if is_row_sharded(self.model):
            files += [model_shard_file(r) for r in range(self.optimizer.world_size)]
        missing = [name for name in files if not (partial / name).is_file()]
        if missing:
            raise RuntimeError(
                f"checkpoint {partial}: rank 0 does not see {', '.join(missing)} written by the other ranks; "
                "with several nodes, logging_params.checkpoint_dir must be on a filesystem all nodes share"
            )
        path = self.manager.commit(step, extra={"optimizer": self.optimizer.manifest()})
        log.info("checkpoint %s", path)

    def lock_folder(self, run_dir: Path) -> FolderLock | None:
        """Rank 0 locks the checkpoint folder for this run (other ranks hold nothing, so they
        never race for it); when another live run holds it, every rank raises the same UserError."""
        lock, problem = None, None
        if self.dist.is_main:
            try:
                lock = FolderLock.take(self.manager.directory, run_dir=run_dir)
            except UserError as err:
                problem = str(err)
        problem = dist_utils.broadcast_object(problem)
        if problem is not None:
            raise AgreedUserError(problem)
        return lock

    # -- resuming --------------------------------------------------------------------------------
    def resume(self, mode: str) -> bool:
        """Load the newest intact checkpoint when ``mode`` (the ``resume`` setting) asks for it;
        True if one was loaded."""
        if mode == "false":
            return False
        found = self.manager.newest_intact() if self.dist.is_main else None
        step, rejected = dist_utils.broadcast_object(found)
        if step is None:
            if rejected:  # starting over would silently drop the run's progress
                raise AgreedUserError(f"resume={mode}: {every_checkpoint_rejected(self.manager.directory, rejected)}; "
                                "move them away (or use another logging_params.checkpoint_dir) to start over")
            if mode == "true":
                raise AgreedUserError(
                    f"resume=true but no complete checkpoint in {self.manager.directory}; "
                    "use resume=auto to start fresh when none exists"
                )
            return False
        try:
            self._load(step)
        except UserError as err:  # every rank reads the checkpoint rank 0 verified: all fail alike
            raise AgreedUserError(str(err)) from err
        self.saved_at = step
        log.info("resumed from %s at step %d", self.step_dir(step), self.state.step)
        return True

    def _load(self, step: int) -> None:
        device = self.dist.device
        payload = self.manager.load(step, map_location=device)
        if payload["optimizer_name"] != self.cfg.optimizer_params.name:
            raise UserError(
                f"checkpoint {self.step_dir(step)} was written by optimizer "
                f"{payload['optimizer_name']!r}, this run uses {self.cfg.optimizer_params.name!r}"
            )
        try:  # one shard file at a time, memory-mapped: a rank keeps only its rows
            load_weights(self.model, checkpoint_shards(payload, lambda name: self.manager.load(step, name, mmap=True)))
        except (RuntimeError, KeyError, ValueError) as err:
            raise UserError(
                f"checkpoint {self.step_dir(step)} holds a model of another shape "
                f"({payload['model_config']}): {str(err).splitlines()[0]}"
            ) from err
        shards = self.manager.manifest(step).get("optimizer")
        if shards is None:
            raise UserError(f"checkpoint {self.step_dir(step)} has no optimizer shards (an older format)")
        try:  # both check the saved state against this run: a mismatch is the checkpoint's, not a bug
            self.optimizer.load_state_dict([
                self.manager.load(step, shard_file(r), map_location=device)
                for r in self.optimizer.shards_to_read(shards["owners"])
            ])
            self.loader.load_state_dict(payload["loader"])
        except ValueError as err:
            raise UserError(f"checkpoint {self.step_dir(step)} does not fit this run: {err}") from err
        set_rng_state(payload["rng"])
        self.state.step = payload["step"]
        self.state.skipped_steps = payload["skipped_steps"]
        self.state.wandb_id = payload["wandb_id"]
        self.state.resumed_from = step
