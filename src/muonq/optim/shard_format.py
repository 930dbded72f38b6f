"""The optimizer shards of a checkpoint, one format for ZeRO-1 and for FSDP's owned optimizer.

Rank ``r`` writes :func:`shard_file` ``(r)``: ``{"format", "world_size", "owners", "rank",
"optimizers"}``, where ``owners`` maps every parameter name to the rank whose shard holds its
state, and ``optimizers[name]`` holds that inner optimizer's param groups (hyper-parameters, the
*names* of their parameters) and the state of the parameters in this shard, keyed by name, as
whole tensors. Nothing in it depends on the world size or on how parameters were sharded in
memory, so a checkpoint written by either optimizer at any world size loads into either at any
other.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

FORMAT = "muonq-zero1/1"

# (parameter name, its state) -> the state to keep, or None to leave it out
SelectState = Callable[[str, dict[str, Any]], "dict[str, Any] | None"]


def shard_file(rank: int) -> str:
    """File name of rank ``rank``'s optimizer shard inside a checkpoint folder."""
    return f"optim_rank{rank:05d}.pt"


def named_state(opt: torch.optim.Optimizer, names: Mapping[torch.Tensor, str], select: SelectState) -> dict[str, Any]:
    """``opt``'s state dict keyed by parameter name (``names``: live parameter -> name), with the
    state of each parameter passed through ``select`` in the order the optimizer holds it (the same
    on every rank, so ``select`` may run collectives)."""
    sd = opt.state_dict()
    by_id: dict[int, str] = {}
    groups = []
    for saved, live in zip(sd["param_groups"], opt.param_groups):
        group_names = [names[p] for p in live["params"]]
        by_id.update(zip(saved["params"], group_names))
        groups.append({**{k: v for k, v in saved.items() if k != "params"}, "params": group_names})
    state = {}
    for pid, value in sd["state"].items():
        kept = select(by_id[pid], value)
        if kept is not None:
            state[by_id[pid]] = kept
    return {"param_groups": groups, "state": state}


def merge_shards(shards: Mapping[str, Any] | Iterable[Mapping[str, Any]], *, names: set[str],
                 needed: Iterable[str], optimizers: set[str]) -> dict[str, dict[str, Any]]:
    """The named state of several shards, merged per inner optimizer. ``names``: every parameter
    this run optimizes (the checkpoint must know exactly these); ``needed``: the parameters whose
    state this rank must find in the given shards; ``optimizers``: the inner optimizers this run
    builds. Raises ValueError on a mismatch."""
    shards = [shards] if isinstance(shards, Mapping) else list(shards)
    merged: dict[str, dict[str, Any]] = {}
    given: set[int] = set()
    owners_then: Mapping[str, int] | None = None
    for shard in shards:
        if shard.get("format") != FORMAT:
            raise ValueError(f"not an optimizer shard of format {FORMAT} (got {shard.get('format')!r})")
        given.add(int(shard["rank"]))
        owners_then = shard["owners"]
        for opt_name, part in shard["optimizers"].items():
            entry = merged.setdefault(opt_name, {"param_groups": part["param_groups"], "state": {}})
            entry["state"].update(part["state"])
    if owners_then is not None:
        if set(owners_then) != names:
            raise ValueError("the checkpoint's optimizer state is for other parameters (another model)")
        absent = sorted({owners_then[n] for n in needed} - given)
        if absent:
            raise ValueError(f"optimizer shards {[shard_file(r) for r in absent]} were not given")
    if set(merged) != optimizers:
        raise ValueError(f"optimizer state holds {sorted(merged)} but this run builds {sorted(optimizers)}: "
                         "the checkpoint comes from a different optimizer")
    return merged


def shards_holding(owners: Mapping[str, int], needed: Iterable[str]) -> list[int]:
    """The ranks of a checkpoint (owner map ``owners``) whose shards hold the state of ``needed``
    (shard 0 alone, for the hyper-parameters, when nothing is needed)."""
    needed = list(needed)
    unknown = [name for name in needed if name not in owners]
    if unknown:
        raise ValueError(f"the checkpoint's optimizer shards do not know parameters {unknown[:3]}: another model")
    return sorted({int(owners[name]) for name in needed}) or [0]


def load_named_state(opt_name: str, opt: torch.optim.Optimizer, saved: Mapping[str, Any],
                     names: Mapping[torch.Tensor, str], select: SelectState) -> None:
    """Load ``saved`` (as :func:`named_state` makes it) into ``opt``, whose param groups must hold
    the same parameters by name; ``select`` turns each saved state into the one to load, or None
    to leave the parameter without state."""
    current = opt.state_dict()
    if len(saved["param_groups"]) != len(current["param_groups"]):
        raise ValueError(f"checkpoint's {opt_name} has {len(saved['param_groups'])} param groups, this run "
                         f"{len(current['param_groups'])}")
    ids: dict[str, int] = {}
    groups = []
    for group_saved, group_now, live in zip(saved["param_groups"], current["param_groups"], opt.param_groups):
        group_names = [names[p] for p in live["params"]]
        if list(group_saved["params"]) != group_names:
            raise ValueError(f"checkpoint's {opt_name} param groups hold other parameters than this run's")
        ids.update(zip(group_names, group_now["params"]))
        groups.append({**group_saved, "params": group_now["params"]})
    state = {}
    for name, value in saved["state"].items():
        kept = select(name, value)
        if kept is not None:
            state[ids[name]] = kept
    opt.load_state_dict({"state": state, "param_groups": groups})
