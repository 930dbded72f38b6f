"""The optimizer under FSDP2 (``parallelism=fsdp``): AdamW on local shards, Muon on whole matrices
held by one owner each.

How it works
------------
* **AdamW** is elementwise: torch's AdamW steps the ``Shard(0)`` DTensor parameters directly, so
  each rank keeps the AdamW state of its rows only.
* **Muon** needs whole matrices. Each hidden matrix has one owner rank
  (:func:`~muonq.optim.zero.assign_owners` over :func:`~muonq.optim.zero.optimizer_costs`: state
  bytes and Newton–Schulz work). The owner keeps a plain full-size *proxy* tensor of the matrix and
  one ordinary :class:`~muonq.optim.muon.Muon` over its proxies, built by
  :func:`~muonq.optim.build.build_muon` from the run's spec: every store (fp32, 8-bit, MuonQ, GRASP)
  and transform (MuonEq) works unchanged, and only the owner ever creates a matrix's state.
* **Step**, per round (consecutive matrices, up to ``round_bytes`` of whole gradients; one round
  for small models). (1) One ``all_to_all_single`` sends each rank's gradient rows (its local ``Shard(0)``
  piece, already averaged by FSDP's reduce-scatter) of every matrix to the matrix's owner, which
  concatenates them into the whole gradient and sets it as its proxy's ``.grad``. (2) The owner
  zeroes its proxies and steps its Muon: momentum through the store, Newton–Schulz, and the scaled
  update added to the zero proxy, which then holds ``-lr x scale x NS(...)`` exactly as Muon
  computes it (weight decay of a zero tensor is zero). (3) A second ``all_to_all_single`` returns
  every rank its rows of those updates. (4) Every rank applies Muon's decoupled weight decay to its
  rows (``p *= 1 - lr x wd``) and adds its rows of the update. The exchanges are async: round
  k + 1's gradients travel while the owners run round k's Newton–Schulz, and each round's updates
  travel while later rounds compute; the updates are applied once all rounds are done.
* Non-owners hold an empty ``0 x 0`` proxy for the matrices they do not own, so param groups,
  hyper-parameters and the lr schedule are the same on every rank, at no memory cost; such a proxy
  never gets a gradient, so Muon never creates state for it.

Numerics: the owner's gradient is the one a single process would get up to the float rounding of
the reduction order, and its update is Muon's; the only difference from a single process is that
the update is rounded once before it is added (``p + round(a x U)`` instead of ``p.add_(U, alpha=a)``).

Checkpoints use ZeRO-1's shard format (:mod:`muonq.optim.shard_format`): each owner writes its
matrices' Muon state and every rank the AdamW state of the rows it holds (nothing is gathered), so
FSDP and DDP runs, at any world size, resume from each other's checkpoints.

HSDP (``parallelism.dp_shard``): all of the above within each shard group.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from muonq.optim.optimizer_set import OptimizerSet, WrapsOptimizerSet
from muonq.optim.shard_format import FORMAT, RowPieces, load_named_state, merge_shards, named_state, shards_holding
from muonq.optim.spec import OptimizerSpec
from muonq.optim.zero import COST_WEIGHTS, NamedParams, assign_owners, check_same_owners, optimizer_costs

# Whole-matrix gradient bytes per exchange round (see OwnedMuonOptimizer._muon_step).
DEFAULT_ROUND_BYTES = 64 * 2**20


def _local(t: torch.Tensor) -> torch.Tensor:
    """The rows this rank holds of a ``Shard(0)`` DTensor (the tensor itself when plain)."""
    return t.to_local() if hasattr(t, "to_local") else t


def shard_rows(rows: int, world_size: int) -> list[tuple[int, int]]:
    """[start, end) rows of each rank under ``Shard(0)``: torch.chunk's split, as FSDP2 makes it."""
    chunk = -(-rows // world_size)
    return [(min(r * chunk, rows), min((r + 1) * chunk, rows)) for r in range(world_size)]


def row_range(param: torch.Tensor) -> tuple[int, int]:
    """[start, end) of the rows of ``param`` (a ``Shard(0)`` DTensor) that this rank holds. Rows are
    sharded over the mesh's last dimension; under HSDP the first one replicates."""
    mesh = param.device_mesh
    return shard_rows(param.shape[0], mesh.size(mesh.ndim - 1))[mesh.get_local_rank(mesh.ndim - 1)]


class OwnedMuonOptimizer(WrapsOptimizerSet):
    """The run's optimizer over FSDP2-sharded parameters; the surface the trainer uses on
    :class:`~muonq.optim.zero.ShardedOptimizer` (step, zero_grad, lr multiplier, state report).

    ``named_hidden`` / ``named_others``: ``(name, parameter)`` pairs in model order, parameters as
    ``fully_shard`` left them (DTensors with ``Shard(0)`` on dim 0). ``rank`` / ``world_size`` /
    ``group``: this rank's place among the ranks the rows are sharded over (``group`` None: all of
    them). Under HSDP that is the shard group: each group holds and steps its own copy of the
    state, on gradients that FSDP has already averaged over the replicas. ``qkv_blocks``: the
    model's fused QKV weights by name (name -> 3), which Muon splits when ``spec`` says so.
    """

    def __init__(self, spec: OptimizerSpec, named_hidden: NamedParams, named_others: NamedParams, *,
                 rank: int, world_size: int, group: Any = None, device_type: str = "cpu",
                 round_bytes: int = DEFAULT_ROUND_BYTES, qkv_blocks: Mapping[str, int] | None = None) -> None:
        from muonq.optim.build import build_adamw, build_muon

        self.rank, self.world_size, self._group = rank, world_size, group
        self._params = [p for _, p in [*named_hidden, *named_others]]
        self._device = self._params[0].device if self._params else torch.device("cpu")
        optimizers: dict[str, torch.optim.Optimizer] = {}
        if spec.muon is None:
            named_adamw = [*named_hidden, *named_others]
            named_hidden = []
        else:
            named_adamw = list(named_others)
        adamw_params = [p for _, p in named_adamw]
        self._hidden = [p for _, p in named_hidden]
        qkv_blocks = qkv_blocks or {}
        costs = optimizer_costs(spec, named_hidden, [], qkv_blocks)
        self.owners: dict[str, int] = assign_owners(costs, world_size, COST_WEIGHTS)
        self._adamw = {name: p for name, p in named_adamw}  # checkpoints: every shard holds rows of their state
        self._owner = [self.owners[name] for name, _ in named_hidden]
        check_same_owners(self.owners, rank=rank, world_size=world_size)
        self._rows = [shard_rows(p.shape[0], world_size) for p in self._hidden]
        for (name, p), rows in zip(named_hidden, self._rows):
            start, end = rows[rank]
            if tuple(_local(p).shape) != (end - start, *p.shape[1:]):
                raise ValueError(f"{name}: local shard {tuple(_local(p).shape)} is not rows [{start}, {end}) of "
                                 f"{tuple(p.shape)}; expected fully_shard's Shard(0)")
        self._proxies = [
            torch.zeros(tuple(p.shape), dtype=p.dtype, device=self._device) if owner == rank
            else torch.empty((0, 0), dtype=p.dtype, device=self._device)
            for p, owner in zip(self._hidden, self._owner)
        ]
        # rounds: consecutive matrices (model order) of up to round_bytes of whole gradients each
        self._dtype = self._hidden[0].dtype if self._hidden else torch.float32
        self._rounds: list[list[int]] = []
        size = round_bytes
        for i, p in enumerate(self._hidden):
            nbytes = p.numel() * p.element_size()
            if not self._rounds or size + nbytes > round_bytes:
                self._rounds.append([])
                size = 0
            self._rounds[-1].append(i)
            size += nbytes
        self._names: dict[torch.Tensor, str] = {
            **{proxy: name for proxy, (name, _) in zip(self._proxies, named_hidden)}, **{p: n for n, p in named_adamw}}
        if self._hidden:
            qkv = {proxy: qkv_blocks[name] for proxy, (name, _) in zip(self._proxies, named_hidden) if name in qkv_blocks}
            optimizers["muon"] = build_muon(spec.muon, self._proxies, kernels=spec.kernels, qkv_blocks=qkv)
        if adamw_params:
            optimizers["adamw"] = build_adamw(spec.adamw, adamw_params, device_type)
        self.inner = OptimizerSet(optimizers)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self._params:
            p.grad = None
        for proxy in self._proxies:
            proxy.grad = None

    def owned_names(self) -> list[str]:
        return [name for name, owner in self.owners.items() if owner == self.rank]

    @torch.no_grad()
    def step(self) -> None:
        if "adamw" in self.inner.optimizers:
            self.inner.optimizers["adamw"].step()
        if self._hidden:
            self._muon_step()

    def _split_sizes(self, indices: Sequence[int], *, to_owner: bool) -> list[int]:
        """Elements per peer of one all-to-all over the matrices ``indices``: to each owner this
        rank's rows of its matrices (``to_owner``), or from each rank its rows of the matrices
        this rank owns."""
        sizes = [0] * self.world_size
        for i in indices:
            cols = math.prod(self._hidden[i].shape[1:])
            if to_owner:
                start, end = self._rows[i][self.rank]
                sizes[self._owner[i]] += (end - start) * cols
            elif self._owner[i] == self.rank:
                for r, (start, end) in enumerate(self._rows[i]):
                    sizes[r] += (end - start) * cols
        return sizes

    def _flat(self, parts: list[list[torch.Tensor]]) -> torch.Tensor:
        flat = [t for peer in parts for t in peer]
        return torch.cat(flat) if flat else torch.empty(0, dtype=self._dtype, device=self._device)

    def _send_grads(self, indices: Sequence[int]) -> tuple:
        """Start round ``indices``' gradient exchange: this rank's rows of each matrix to its owner;
        within a peer's segment the matrices go in model order."""
        parts: list[list[torch.Tensor]] = [[] for _ in range(self.world_size)]
        for i in indices:
            p = self._hidden[i]
            local = _local(p.grad) if p.grad is not None else torch.zeros_like(_local(p))
            parts[self._owner[i]].append(local.reshape(-1).to(self._dtype))
        to_owner = self._split_sizes(indices, to_owner=True)
        from_ranks = self._split_sizes(indices, to_owner=False)
        recv = torch.empty(sum(from_ranks), dtype=self._dtype, device=self._device)
        send = self._flat(parts)  # referenced until the exchange is waited for
        work = self._all_to_all(recv, send, from_ranks, to_owner)
        return indices, recv, (work, send), to_owner, from_ranks

    def _muon_step(self) -> None:
        """The gradient exchange of round k + 1 runs while the owners update round k, and each
        round's update exchange runs while later rounds are updated (async collectives)."""
        muon = self.inner.optimizers["muon"]
        group = muon.param_groups[0]
        world, rank = self.world_size, self.rank
        returns = []
        pending = self._send_grads(self._rounds[0])
        for k in range(len(self._rounds)):
            indices, recv, work, to_owner, from_ranks = pending
            if k + 1 < len(self._rounds):
                pending = self._send_grads(self._rounds[k + 1])
            if work[0] is not None:
                work[0].wait()
            del work
            # the owner assembles each whole gradient: rank r's rows of every matrix it owns, in order
            offsets = [sum(from_ranks[:r]) for r in range(world)]
            owned = [i for i in indices if self._owner[i] == rank]
            for i in owned:
                cols = math.prod(self._hidden[i].shape[1:])
                pieces = []
                for r, (start, end) in enumerate(self._rows[i]):
                    n = (end - start) * cols
                    pieces.append(recv[offsets[r]: offsets[r] + n].view(end - start, cols))
                    offsets[r] += n
                proxy = self._proxies[i]
                proxy.zero_()
                proxy.grad = torch.cat(pieces).view_as(proxy)
            del recv
            # the owner's Muon over this round's proxies (the only ones with a gradient): store,
            # Newton-Schulz, and the scaled update added to the zero proxies
            if owned:
                muon.step()
            parts: list[list[torch.Tensor]] = [[] for _ in range(world)]
            for i in owned:
                self._proxies[i].grad = None
                for r, (start, end) in enumerate(self._rows[i]):
                    parts[r].append(self._proxies[i][start:end].reshape(-1))
            back = torch.empty(sum(to_owner), dtype=self._dtype, device=self._device)
            send = self._flat(parts)
            returns.append((indices, back, (self._all_to_all(back, send, to_owner, from_ranks), send), to_owner))
        # every rank: Muon's decoupled weight decay on its rows, then its rows of the update
        lr, wd = group["lr"], group["weight_decay"]
        for indices, back, work, to_owner in returns:
            if work[0] is not None:
                work[0].wait()
            offsets = [sum(to_owner[:r]) for r in range(world)]
            for i in indices:
                local = _local(self._hidden[i])
                owner = self._owner[i]
                n = local.numel()
                delta = back[offsets[owner]: offsets[owner] + n].view_as(local)
                offsets[owner] += n
                if wd:
                    local.mul_(1.0 - lr * wd)
                local.add_(delta.to(local.dtype))

    def _all_to_all(self, out: torch.Tensor, inp: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> Any:
        if self.world_size == 1:
            out.copy_(inp)
            return None
        return dist.all_to_all_single(out, inp, output_split_sizes=out_splits, input_split_sizes=in_splits,
                                      group=self._group, async_op=True)

    def comm_plan(self) -> dict[str, int]:
        """What the Muon exchange moves per step: collectives, the payload bytes this rank receives
        (the other ranks' rows of the matrices it owns, and its rows of the other matrices' updates,
        from the split sizes the all-to-alls use) and the ideal (each gradient row reaches its owner
        once, each update row comes back once), counted from the shapes alone."""
        element = torch.empty(0, dtype=self._dtype).element_size()
        if self.world_size == 1:
            return {"collectives": 0, "bytes_received": 0, "ideal_bytes_received": 0}
        received = 0
        for indices in self._rounds:
            grads_in = self._split_sizes(indices, to_owner=False)
            updates_in = self._split_sizes(indices, to_owner=True)
            received += sum(n for r, n in enumerate(grads_in) if r != self.rank)
            received += sum(n for r, n in enumerate(updates_in) if r != self.rank)
        ideal = 0
        for i, p in enumerate(self._hidden):
            cols = math.prod(p.shape[1:])
            start, end = self._rows[i][self.rank]
            mine = (end - start) * cols
            ideal += p.numel() - mine if self._owner[i] == self.rank else mine
        return {"collectives": 2 * len(self._rounds), "bytes_received": received * element,
                "ideal_bytes_received": ideal * element}

    # -- accounting ----------------------------------------------------------------------------------
    def state_report(self) -> dict[str, Any]:
        """As :meth:`WrapsOptimizerSet.state_report`: Muon state is the owners' whole-matrix state,
        AdamW state the local shards' (DTensor state is counted by its local tensors)."""
        report = super().state_report()
        if "adamw" in report["numel"]:  # DTensor parameters count their global size on every rank
            report["numel"]["adamw"] //= self.world_size
        return report

    def muon_state_names(self, names: Sequence[str]) -> list[str]:
        """Of the hidden matrices ``names`` (model order), those this rank holds Muon state for."""
        muon = self.inner.optimizers.get("muon")
        if muon is None:
            return []
        return [name for name, proxy in zip(names, self._proxies) if muon.state.get(proxy)]

    # -- checkpoints -------------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        """As ZeRO-1's: format, world size, and the shard of every parameter: a Muon matrix's owner,
        every rank for an AdamW tensor (each writes the rows it holds)."""
        ranks = list(range(self.world_size))
        return {"format": FORMAT, "world_size": self.world_size,
                "owners": {**self.owners, **dict.fromkeys(self._adamw, ranks)}}

    def state_dict(self) -> dict[str, Any]:
        """This rank's shard (:mod:`muonq.optim.shard_format`): the Muon state of the matrices it
        owns, and the AdamW state of the rows it holds of every other tensor, as the optimizer keeps
        it (torchao's 8- and 4-bit state included). No collective: nothing is gathered."""
        optimizers = {}
        if "muon" in self.inner.optimizers:  # state exists on the owners only
            optimizers["muon"] = named_state(self.inner.optimizers["muon"], self._names, lambda name, state: state)
        if "adamw" in self.inner.optimizers:
            optimizers["adamw"] = named_state(self.inner.optimizers["adamw"], self._names,
                                              lambda name, state: {k: _local(v) for k, v in state.items()})
        return {**self.manifest(), "rank": self.rank, "optimizers": optimizers,
                "row_starts": {name: _first_row(p) for name, p in self._adamw.items()}}

    def _needed(self) -> list[str]:
        """The parameters whose saved state this rank loads: its Muon matrices and every AdamW
        tensor (it keeps its rows of each)."""
        return [name for name, owner in self.owners.items() if owner == self.rank] + list(self._adamw)

    def shards_to_read(self, owners: Mapping[str, int | list[int]]) -> list[int]:
        return shards_holding(owners, self._needed())

    def load_state_dict(self, shards: Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> None:
        """Load a checkpoint's shards (ZeRO-1's or this optimizer's, any world size): each owner
        its matrices' Muon state, every rank its rows of the AdamW state."""
        merged = merge_shards(shards, names={*self.owners, *self._adamw}, needed=self._needed(),
                              optimizers=set(self.inner.optimizers))
        if "muon" in merged:
            load_named_state("muon", self.inner.optimizers["muon"], merged["muon"], self._names,
                             lambda name, state: state if self.owners[name] == self.rank else None)
        if "adamw" in merged:
            adamw = self.inner.optimizers["adamw"]

            def rows(name: str, state: RowPieces | dict[str, Any]) -> dict[str, Any]:
                pieces = state if isinstance(state, RowPieces) else RowPieces([(0, state)])  # a DDP checkpoint's
                param = self._adamw[name]
                start = _first_row(param)
                return pieces.state_for(adamw, param, (start, start + _local(param).shape[0]), name)

            load_named_state("adamw", adamw, merged["adamw"], self._names, rows)


def _first_row(param: torch.Tensor) -> int:
    """The first of the rows this rank holds of ``param`` (0 for a plain tensor)."""
    return row_range(param)[0] if hasattr(param, "device_mesh") else 0
