"""The optimizer shards of a checkpoint, one format for ZeRO-1 and for FSDP's owned optimizer.

Rank ``r`` writes :func:`shard_file` ``(r)``: ``{"format", "world_size", "owners", "rank",
"optimizers", "row_starts"}``. ``optimizers[name]`` holds that inner optimizer's param groups
(hyper-parameters, the *names* of their parameters) and the state of the parameters in this shard,
keyed by name. ``owners`` maps every parameter name to the rank whose shard holds its whole state,
or to the list of ranks whose shards each hold some of its rows: FSDP's AdamW state, which every
rank writes for the rows it holds (no rank gathers it); ``row_starts`` gives, for each such name,
the first row of this shard's piece. Nothing in it depends on how the reader is sharded, so a
checkpoint written by either optimizer at any world size loads into either at any other:
:class:`RowPieces` puts a parameter's state together for the rows a reader holds, in the layout
its optimizer keeps (torchao's 8- and 4-bit AdamW state included).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

FORMAT = "muonq-zero1/2"
# /1: the same without row pieces (every state whole in its owner's shard); still read
READABLE = ("muonq-zero1/1", FORMAT)

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
    owners_then: Mapping[str, int | list[int]] | None = None
    for shard in shards:
        if shard.get("format") not in READABLE:
            raise ValueError(f"not an optimizer shard of format {FORMAT} (got {shard.get('format')!r})")
        given.add(int(shard["rank"]))
        owners_then = shard["owners"]
        starts = shard.get("row_starts", {})
        for opt_name, part in shard["optimizers"].items():
            entry = merged.setdefault(opt_name, {"param_groups": part["param_groups"], "state": {}})
            for name, state in part["state"].items():
                if name in starts:
                    entry["state"].setdefault(name, RowPieces()).pieces.append((int(starts[name]), state))
                else:
                    entry["state"][name] = state
    if owners_then is not None:
        if set(owners_then) != names:
            raise ValueError("the checkpoint's optimizer state is for other parameters (another model)")
        absent = sorted({r for n in needed for r in _holders(owners_then[n])} - given)
        if absent:
            raise ValueError(f"optimizer shards {[shard_file(r) for r in absent]} were not given")
    if set(merged) != optimizers:
        raise ValueError(f"optimizer state holds {sorted(merged)} but this run builds {sorted(optimizers)}: "
                         "the checkpoint comes from a different optimizer")
    return merged


def _holders(owner: int | list[int]) -> list[int]:
    """The ranks whose shards hold a parameter's state, from its owner-map entry."""
    return [int(r) for r in owner] if isinstance(owner, list) else [int(owner)]


def shards_holding(owners: Mapping[str, int | list[int]], needed: Iterable[str]) -> list[int]:
    """The ranks of a checkpoint (owner map ``owners``) whose shards hold the state of ``needed``
    (shard 0 alone, for the hyper-parameters, when nothing is needed)."""
    needed = list(needed)
    unknown = [name for name in needed if name not in owners]
    if unknown:
        raise ValueError(f"the checkpoint's optimizer shards do not know parameters {unknown[:3]}: another model")
    return sorted({r for name in needed for r in _holders(owners[name])}) or [0]


@dataclass
class RowPieces:
    """One parameter's saved state split by rows: (first row, the state of those rows) per shard
    that holds some (state tensors hold rows of the parameter's; scalars such as ``step`` are the
    same in every piece). A whole saved state is the one piece starting at row 0."""

    pieces: list[tuple[int, dict[str, Any]]] = field(default_factory=list)

    def state_for(self, opt: torch.optim.Optimizer, param: torch.Tensor, rows: tuple[int, int],
                  name: str) -> dict[str, Any]:
        """The state ``opt`` (torch's AdamW, or torchao's AdamW8bit / AdamW4bit) keeps for ``param``,
        with the saved values of ``rows`` ([first, end) of the parameter's; the rows this rank holds).
        Each tensor comes in the layout a fresh state of ``param`` would have (a DTensor of these rows
        for an FSDP parameter; quantized where torchao quantizes this many elements): a piece that
        holds exactly these rows in that layout is copied as is (codes and scales bit for bit);
        otherwise the pieces' rows are dequantized, put together and stored in the layout. Quantizing
        again is one more rounding where the state was quantized: torchao's unsigned second-moment
        codes come back the same when the saved blocks line up with the new ones, its signed
        first-moment codes move by up to one code in blocks whose largest entry is negative (the
        signed map has no -1, so the block's scale shrinks). Raises ValueError when rows are missing."""
        first_state = self.pieces[0][1]
        state: dict[str, Any] = {}
        for key, value in first_state.items():
            if not isinstance(value, torch.Tensor) or value.ndim == 0:
                state[key] = value
                continue
            fresh = _fresh_state(opt, param, signed=key == "exp_avg")
            local = fresh.to_local() if hasattr(fresh, "to_local") else fresh
            same = [piece[key] for start, piece in self.pieces
                    if start == rows[0] and _same_layout(piece[key], local)]
            local.copy_(same[0] if same else self._rows(key, rows, local, name))
            state[key] = fresh
        return state

    def _rows(self, key: str, rows: tuple[int, int], like: torch.Tensor, name: str) -> torch.Tensor:
        """The saved ``key`` of ``rows``, dequantized, as a tensor of ``like``'s shape and dtype."""
        lo, hi = rows
        out = torch.empty(like.shape, dtype=like.dtype, device=like.device)
        covered = 0
        for first, piece in self.pieces:
            saved = piece[key]
            a, b = max(lo, first), min(hi, first + saved.shape[0])
            if a < b:
                values = saved.dequantize() if type(saved) is not torch.Tensor else saved
                out[a - lo : b - lo].copy_(values[a - first : b - first])
                covered += b - a
        if covered != hi - lo:
            raise ValueError(f"the checkpoint lacks rows {lo}-{hi} of the {key} of {name}")
        return out


def _fresh_state(opt: torch.optim.Optimizer, param: torch.Tensor, *, signed: bool) -> torch.Tensor:
    """A zero state tensor of ``param`` as ``opt`` makes one at its first step: torchao's buffer
    (quantized or not by the size of this rank's rows; ``signed`` for the first moment), else zeros
    like the parameter (a DTensor for a DTensor)."""
    if type(opt).__module__.startswith("torchao"):  # its own rule for which tensors it quantizes
        return opt._new_buffer(param, signed)
    return torch.zeros_like(param, memory_format=torch.preserve_format)


def _same_layout(saved: torch.Tensor, local: torch.Tensor) -> bool:
    return (type(saved) is type(local) and saved.shape == local.shape and saved.dtype == local.dtype
            and getattr(saved, "block_size", None) == getattr(local, "block_size", None)
            and getattr(saved, "signed", None) == getattr(local, "signed", None))


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
