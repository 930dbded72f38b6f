"""A run's checkpoints: what one holds, when one is written, and resuming from the newest.

Storage (atomic folders, checksums, pruning) is :class:`~muonq.train.checkpoint.CheckpointManager`;
this adds the run's side: the payload (model, loader, RNG streams, counters, config), the ZeRO-1
optimizer shards written by their ranks, the cadence (``logging_params.save_checkpoint`` every
``save_ckpt_step`` steps) and which step is already on disk, so no state is written twice.
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

from muonq.data import TokenLoader
from muonq.errors import MissingInputError, UserError
from muonq.optim.zero import ShardedOptimizer, shard_file
from muonq.train import distributed as dist_utils
from muonq.train.checkpoint import CheckpointManager
from muonq.train.distributed import DistInfo

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
        self.manager = CheckpointManager(log_cfg.checkpoint_dir or Path("checkpoints") / run_name,
                                         keep_last=log_cfg.keep_last)
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

    def save(self) -> None:
        """Rank 0 writes main.pt, each optimizer shard's rank its ``optim_rankNNNNN.pt`` (rank 0 alone
        when unsharded), into one partial folder; rank 0 then commits it with the owner map in the
        manifest."""
        step = self.state.step
        if self.dist.is_main:
            self.manager.begin(step)
        dist_utils.barrier()
        if self.dist.is_main:
            self.manager.write_part(step, "main.pt", self._payload())
        if self.dist.rank == self.optimizer.rank:
            self.manager.write_part(step, shard_file(self.optimizer.rank), self.optimizer.state_dict())
        dist_utils.barrier()
        if self.dist.is_main:
            self._commit(step)
        dist_utils.barrier()
        self.saved_at = step

    def _commit(self, step: int) -> None:
        partial = self.manager.partial_dir(step)
        missing = [shard_file(r) for r in range(self.optimizer.world_size) if not (partial / shard_file(r)).is_file()]
        if missing:
            raise RuntimeError(
                f"checkpoint {partial}: rank 0 does not see {', '.join(missing)} written by the other ranks; "
                "with several nodes, logging_params.checkpoint_dir must be on a filesystem all nodes share"
            )
        path = self.manager.commit(step, extra={"optimizer": self.optimizer.manifest()})
        log.info("checkpoint %s", path)

    # -- resuming --------------------------------------------------------------------------------
    def resume(self, mode: str) -> bool:
        """Load the newest intact checkpoint when ``mode`` (the ``resume`` setting) asks for it;
        True if one was loaded."""
        if mode == "false":
            return False
        step = self.manager.latest_valid() if self.dist.is_main else None
        step = dist_utils.broadcast_object(step)
        if step is None:
            if mode == "true":
                raise MissingInputError(
                    f"resume=true but no complete checkpoint in {self.manager.directory}; "
                    "use resume=auto to start fresh when none exists"
                )
            return False
        self._load(step)
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
        try:
            self.model.load_state_dict(payload["model"])
        except RuntimeError as err:
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
