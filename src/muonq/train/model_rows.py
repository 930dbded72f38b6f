"""The model's weights in a checkpoint: whole in ``main.pt``, or as rows written by the ranks that
hold them.

Under ``parallelism=fsdp`` no rank gathers the model. Gathering it would cost one rank the whole
model in host memory (a 7B model's fp32 weights are 28 GB) while the others wait. Instead each
rank of the first shard group (under HSDP the other groups hold copies) writes
:func:`model_shard_file` with the rows it holds of every weight:
``{"format", "shards", "rank", "tensors": {name: {"start": first row, "shape": whole shape,
"rows": the rows}}}``. Nothing in a shard depends on how the reader is sharded. A reader copies
the rows it needs from one file at a time (:func:`load_weights`). The files are memory-mapped,
so a rank never holds more than its own rows plus one file. Any world size and any layout can
read them: FSDP at another world size, one process or DDP, ``muonq.evaluate`` and ``muonq.export``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from muonq.optim.owned import row_range

FORMAT = "muonq-model-rows/1"


def model_shard_file(rank: int) -> str:
    """File name of shard ``rank``'s rows of the model inside a checkpoint folder."""
    return f"model_rank{rank:05d}.pt"


def is_row_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model``'s weights are ``Shard(0)`` DTensors (FSDP2), each rank holding some rows."""
    return any(hasattr(p, "device_mesh") for p in model.parameters())


def _rows(value: torch.Tensor) -> tuple[int, torch.Tensor]:
    """(first row, the rows this rank holds) of a weight: a DTensor's local rows, or all of a plain tensor."""
    if hasattr(value, "device_mesh"):
        return row_range(value)[0], value.to_local()
    return 0, value


def local_rows(model: torch.nn.Module, *, rank: int, shards: int) -> dict[str, Any]:
    """Shard ``rank`` of ``shards``: this rank's rows of every weight of the row-sharded ``model``,
    copied to the CPU (a copy: saving a view would write its whole padded storage). Weights that
    are not sharded go whole into shard 0."""
    tensors = {}
    for name, value in model.state_dict().items():
        if not hasattr(value, "device_mesh") and rank != 0:
            continue
        start, rows = _rows(value)
        tensors[name] = {"start": start, "shape": list(value.shape), "rows": rows.detach().to("cpu", copy=True)}
    return {"format": FORMAT, "shards": shards, "rank": rank, "tensors": tensors}


def _as_one_shard(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """A whole state dict (``main.pt``'s ``model``) as the single shard of its rows."""
    tensors = {name: {"start": 0, "shape": list(t.shape), "rows": t} for name, t in state.items()}
    return {"format": FORMAT, "shards": 1, "rank": 0, "tensors": tensors}


def checkpoint_shards(payload: Mapping[str, Any], read_shard: Callable[[str], dict[str, Any]]) -> Iterable[dict[str, Any]]:
    """The model shards of a checkpoint whose ``main.pt`` holds ``payload``: read one at a time
    with ``read_shard(file name)``, or the whole model of ``main.pt`` as one shard."""
    if "model" in payload:
        yield _as_one_shard(payload["model"])
        return
    for rank in range(int(payload["model_shards"])):
        yield read_shard(model_shard_file(rank))


def load_weights(model: torch.nn.Module, shards: Iterable[Mapping[str, Any]]) -> None:
    """Copy into every weight of ``model`` the rows this rank holds of it (all of them when not
    sharded), taken from ``shards`` as :func:`checkpoint_shards` yields them. Raises ValueError when
    the shards hold other weights or shapes than ``model``, or leave rows out."""
    targets = model.state_dict(keep_vars=True)
    wanted = {name: _rows(value) for name, value in targets.items()}
    copied = dict.fromkeys(targets, 0)
    with torch.no_grad():
        for shard in shards:
            if shard.get("format") != FORMAT:
                raise ValueError(f"not a model shard of format {FORMAT} (got {shard.get('format')!r})")
            for name, saved in shard["tensors"].items():
                if name not in targets:
                    raise ValueError(f"the checkpoint holds weight {name!r}, which this model does not have")
                if list(saved["shape"]) != list(targets[name].shape):
                    raise ValueError(f"{name} is {tuple(saved['shape'])} in the checkpoint, "
                                     f"{tuple(targets[name].shape)} in this model")
                start, local = wanted[name]
                first, rows = saved["start"], saved["rows"]
                lo, hi = max(start, first), min(start + local.shape[0], first + rows.shape[0])
                if lo < hi:
                    local[lo - start:hi - start].copy_(rows[lo - first:hi - first])
                    copied[name] += hi - lo
    missing = [name for name, (_, local) in wanted.items() if copied[name] != local.shape[0]]
    if missing:
        raise ValueError(f"the checkpoint lacks rows of {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")

