"""How the model runs on the devices: the data-parallel wrapper, compilation and mixed precision.

The training loop calls the module :func:`parallelize` returns and never asks how it is wrapped;
the bare model keeps the parameters (the optimizer, checkpoints and validation use it).
``parallelism=fsdp`` shards the bare model in place with FSDP2 (its parameters become ``Shard(0)``
DTensors), so the optimizer is built after :func:`parallelize`.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from muonq.train.distributed import DistInfo


def is_fsdp(parallelism: Any) -> bool:
    return parallelism is not None and parallelism.name == "fsdp"


def parallelize(model: torch.nn.Module, dist: DistInfo, training_params: Any, parallelism: Any = None) -> torch.nn.Module:
    """``model`` in DDP over the process group when distributed (``parallelism=ddp``, the default),
    or sharded in place by FSDP2 (``parallelism=fsdp``); ``model`` itself when neither.

    ``training_params.activation_checkpointing`` recomputes every transformer block in the
    backward pass. ``training_params.compile`` compiles the whole wrapped model under ddp, and
    each block before it is sharded under fsdp (a compiled region must not span FSDP2's per-block
    gathers); the block's own modules, and so the parameter names, do not change either way."""
    if training_params.activation_checkpointing:
        checkpoint_blocks(model)
    if is_fsdp(parallelism):
        if training_params.compile:
            for block in transformer_blocks(model):
                block.compile()
        return shard_fsdp(model, dist, training_params, reshard_after_forward=parallelism.reshard_after_forward,
                          dp_shard=parallelism.dp_shard)
    train_model = model
    if dist.distributed:
        train_model = DDP(model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    if training_params.compile:
        train_model = torch.compile(train_model)
    return train_model


def checkpoint_blocks(model: torch.nn.Module) -> None:
    """Make every transformer block recompute its forward in the backward pass (torch's
    non-reentrant activation checkpointing). The block's ``forward`` is replaced in place, not
    wrapped in another module, so parameter names, checkpoints and FSDP2's per-block hooks (which
    gather the block's parameters before its forward and its backward) stay as they are."""
    from torch.utils.checkpoint import checkpoint

    for block in transformer_blocks(model):
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def shard_fsdp(model: torch.nn.Module, dist: DistInfo, training_params: Any, *,
               reshard_after_forward: bool = True, dp_shard: int | None = None) -> torch.nn.Module:
    """FSDP2 ``fully_shard`` on every transformer block, then on the root (embeddings, final norm,
    head), over all ranks, or HSDP with ``dp_shard`` ranks per shard group. On CUDA with ``autocast`` the recipe's ``mixed_precision`` becomes the parameters'
    compute dtype, gradients are reduced in fp32; fp32 throughout on the CPU."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    shard = dp_shard or dist.world_size
    if shard == dist.world_size:
        mesh = init_device_mesh(dist.device.type, (dist.world_size,))
    else:  # HSDP: rows sharded within a group of `shard` consecutive ranks, groups replicate each other
        mesh = init_device_mesh(dist.device.type, (dist.world_size // shard, shard), mesh_dim_names=("replicate", "shard"))
    kwargs: dict[str, Any] = {"mesh": mesh}
    if dist.device.type == "cuda" and training_params.autocast and training_params.mixed_precision != "float32":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=getattr(torch, training_params.mixed_precision),
                                                   reduce_dtype=torch.float32)
    for block in transformer_blocks(model):
        fully_shard(block, reshard_after_forward=reshard_after_forward, **kwargs)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kwargs)
    return model


def shard_group(model: torch.nn.Module) -> tuple[Any, int, int]:
    """(process group, this rank's index in it, its size) of the ranks among which ``model``'s
    parameters are row-sharded: every rank under FSDP, this rank's shard group under HSDP."""
    import torch.distributed as torch_dist

    mesh = next(p for p in model.parameters() if hasattr(p, "device_mesh")).device_mesh
    if mesh.ndim == 1:
        return None, torch_dist.get_rank(), torch_dist.get_world_size()
    return mesh.get_group("shard"), mesh.get_local_rank("shard"), mesh.size(1)


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a model: the modules of its (first) ``ModuleList``."""
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList):
            return list(module)
    return []


def is_sharded(train_model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(getattr(train_model, "_orig_mod", train_model), FSDPModule)


def gradient_sync(train_model: torch.nn.Module, dist: DistInfo, *, sync: bool) -> contextlib.AbstractContextManager:
    """Where gradient accumulation skips the gradient reduction of a micro-step (``sync=False``):
    DDP's ``no_sync``, FSDP2's ``set_requires_gradient_sync(False)``; nothing to do in one process
    or when syncing."""
    if not dist.distributed:
        return contextlib.nullcontext()
    if is_sharded(train_model):
        return _fsdp_sync(getattr(train_model, "_orig_mod", train_model), sync)
    return train_model.no_sync() if not sync else contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_sync(model: Any, sync: bool):
    model.set_requires_gradient_sync(sync)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def local_bytes(tensors: Any) -> int:
    """Bytes this rank holds of ``tensors`` (the local shard of a DTensor)."""
    total = 0
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def autocast_context(device: torch.device, *, autocast: bool, mixed_precision: str) -> contextlib.AbstractContextManager:
    """The forward passes' precision, in training and in evaluation: autocast to ``mixed_precision``
    on CUDA when ``autocast`` (``recipe.training_params``), fp32 otherwise and always on the CPU."""
    if device.type == "cuda" and autocast and mixed_precision != "float32":
        return torch.autocast("cuda", dtype=getattr(torch, mixed_precision))
    return contextlib.nullcontext()

