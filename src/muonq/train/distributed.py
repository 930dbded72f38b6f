"""Process-group setup for torchrun (NCCL on GPU, gloo on CPU) and small collective helpers."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from muonq.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def pick_device(preference: str, local_rank: int) -> torch.device:
    """``auto`` takes the GPU of this local rank when CUDA is present, else the CPU."""
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("device=cuda was requested but no CUDA device is available")
    if local_rank >= torch.cuda.device_count():
        raise UserError(
            f"local rank {local_rank} needs GPU {local_rank}, but only {torch.cuda.device_count()} "
            "are visible: lower --nproc-per-node or check CUDA_VISIBLE_DEVICES"
        )
    return torch.device("cuda", local_rank)


def init_distributed(preference: str = "auto", timeout_s: float | None = None) -> DistInfo:
    """Join the torchrun process group when launched by torchrun; a single process otherwise.

    The collective timeout (``MUONQ_DIST_TIMEOUT_S``, default 600 s) bounds how long a rank waits
    for a peer that died, so a failure ends the job instead of hanging it.
    """
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world_size = world_size_from_env()
    device = pick_device(preference, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        timeout = timeout_s if timeout_s is not None else float(os.environ.get("MUONQ_DIST_TIMEOUT_S", "600"))
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(seconds=timeout),
            device_id=device if device.type == "cuda" else None,
        )
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (a no-op in a single process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return value


def broadcast_object(obj: object, src: int = 0) -> object:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def shutdown(*, graceful: bool = True) -> None:
    """Leave the process group. ``graceful`` waits for every rank first (a rank that tears down
    gloo while a peer is still in a collective makes that peer abort); after an error it does not
    wait, so the failing rank exits at once and torchrun stops the others."""
    if dist.is_initialized():
        if graceful and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
