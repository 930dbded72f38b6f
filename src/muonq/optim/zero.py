"""ZeRO-1 for every optimizer: each parameter's optimizer state lives on exactly one rank.

How it works
------------
* **Ownership.** Every parameter (each Muon hidden matrix, each AdamW tensor) is owned by one rank.
  :func:`assign_owners` packs the parameters largest-first, balancing two resources at once, each
  normalised by its total: optimizer-state bytes (weighted double, so memory falls as 1 / world
  size) and update work (elements for AdamW; elements plus the Newton–Schulz matmul FLOPs,
  ~ ns_steps x (4 m^2 n + 2 m^3) for m = min dim, for Muon). It is pure arithmetic on names and
  shapes, so every rank computes the same map; the map is also checked against rank 0's.
* **Step.** DDP has already averaged the gradients, so every rank holds every gradient. Each rank
  steps the inner :class:`~muonq.optim.optimizer_set.OptimizerSet` with the gradients of the
  parameters it does not own hidden (set to None for the call), so only the owner creates state
  for a parameter and computes its update (Newton–Schulz included). The Muon update of a matrix
  depends only on that matrix's gradient and state, and AdamW is elementwise, so the owner computes
  bit for bit what a single process would.
* **Parameter exchange.** Each rank's owned parameters are flattened into buckets (per dtype and
  device, at most ``bucket_cap_bytes``; a lone parameter is sent in place, without a copy) and each
  bucket is broadcast from its owner with ``async_op=True``, at most ``max_in_flight`` at a time, so
  buckets overlap while the temporary flat buffers stay bounded. Per step every rank receives
  exactly the parameters it does not own, once.
* **Overlap** (``overlap=True``, the default). The AdamW side steps first and its buckets go in
  flight; then Muon runs in rounds, modded-nanogpt's pattern: each rank's owned matrices are cut
  into the same number of consecutive groups (about ``round_bytes`` each, at least two), round j
  takes group j of every rank, each rank computes its own (Newton–Schulz included) and then
  launches the round's broadcasts, one bucket per owner, in the same order on every rank, while
  the next round computes; everything is waited on at the end of the step,
  before the parameters are used again. Non-owners never read a parameter during the step, so it
  can land at any time. The updates are the same computations as without overlap (Muon's update
  of a matrix depends only on its own gradient and state), so the results are bit-identical;
  ``overlap=False`` keeps the plain order (every update, then every bucket) for comparison.
* **Checkpoints.** :meth:`ShardedOptimizer.state_dict` is this rank's shard, keyed by parameter
  *name* (not torch's positional ids) together with the owner map; ``load_state_dict`` takes any
  set of shards, keeps the entries of the parameters this rank owns *now*, and loads them through a
  state dict built in the current positional order. So a checkpoint written with one world size
  resumes on another (:mod:`muonq.optim.shard_format`, shared with FSDP's owned optimizer).

The inner OptimizerSet is built over *all* parameters on every rank: optimizer state is created
lazily, at a parameter's first step with a gradient, so non-owned parameters cost nothing, while
param groups, hyper-parameters and positional ids stay identical on every rank and world size, and
no rank needs special cases for owning no parameter of some optimizer. A world size of 1 (one
process, or ``optimizer_params.zero=false``) is the same code with every parameter owned locally
and no communication, so there is one checkpoint format for all runs.

Why not ``torch.distributed.optim.ZeroRedundancyOptimizer``: it wraps a single optimizer class
built from one set of kwargs, while a Muon run is two optimizers (Muon for hidden matrices, AdamW
for the rest) that must be partitioned together; it balances elements per param group, blind to
Newton–Schulz cost and to state bytes that differ by 8x between AdamW and 4-bit Muon; and its
checkpoints are consolidated on one rank with positional ids (the whole state on one rank, and tied
to its partitioning), where we want each rank to write only its shard, keyed by name, re-shardable.
"""

from __future__ import annotations

import collections
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from muonq.optim.optimizer_set import OptimizerSet, WrapsOptimizerSet
from muonq.optim.shard_format import FORMAT, RowPieces, load_named_state, merge_shards, named_state, shards_holding
from muonq.optim.spec import OptimizerSpec

DEFAULT_BUCKET_CAP_BYTES = 32 * 2**20
# Muon matrices per overlap round: about this many bytes per rank (at least two rounds), so that a
# round's Newton–Schulz outlasts the latency of its broadcasts.
DEFAULT_ROUND_BYTES = 4 * 2**20
# Weights of (state bytes, update work) in the owner assignment: ZeRO-1 exists to cut memory, so a
# rank's state bytes count double; work still spreads where one big tensor bounds the memory anyway.
COST_WEIGHTS = (2.0, 1.0)
_MAX_PENDING = 256  # collectives in flight at most (in-place ones hold no buffer, but each is a handle)
NamedParams = Sequence[tuple[str, torch.Tensor]]
# (hidden params, other params) -> the inner OptimizerSet; build_optimizer with the run's config.
BuildFn = Callable[[list[torch.Tensor], list[torch.Tensor]], OptimizerSet]


# -- ownership -------------------------------------------------------------------------------------


def assign_owners(
    costs: Mapping[str, Sequence[float]], world_size: int, weights: Sequence[float] | None = None
) -> dict[str, int]:
    """Owner rank of each name: greedy largest-first packing of cost vectors onto ``world_size`` ranks.

    Every cost component (e.g. state bytes, update work) is normalised by its total. Items go in
    order of their largest normalised component; each goes to the rank that keeps the weighted sum
    over components of the most-loaded rank's load (the per-component makespans; ``weights``,
    default all 1) smallest, ties to the least-loaded rank, then the lower rank. With one component
    this is the classic LPT rule; with two, memory-only items (AdamW tensors) fill the ranks that
    are not memory-bound even when another rank is work-bound. Deterministic: the same names and
    costs give the same map on every rank.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    names = list(costs)
    if world_size == 1 or not names:
        return {name: 0 for name in names}
    dims = {len(c) for c in costs.values()}
    if len(dims) != 1:
        raise ValueError("every cost vector must have the same length")
    (n_dims,) = dims
    weights = list(weights) if weights is not None else [1.0] * n_dims
    if len(weights) != n_dims:
        raise ValueError(f"{len(weights)} weights for {n_dims} cost components")
    totals = [sum(float(c[k]) for c in costs.values()) for k in range(n_dims)]
    norm = {n: [float(c[k]) / totals[k] if totals[k] > 0 else 0.0 for k in range(n_dims)] for n, c in costs.items()}
    order = sorted(range(len(names)), key=lambda i: (-max(norm[names[i]]), -sum(norm[names[i]]), i))
    loads = [[0.0] * n_dims for _ in range(world_size)]
    span = [0.0] * n_dims  # the largest load of each component over ranks
    owners: dict[str, int] = {}
    for i in order:
        item = norm[names[i]]
        scores = []
        for r in range(world_size):
            new = [load + x for load, x in zip(loads[r], item)]
            scores.append((sum(w * max(s, v) for w, s, v in zip(weights, span, new)), sum(new), r))
        best = min(scores)[2]
        loads[best] = [load + x for load, x in zip(loads[best], item)]
        span = [max(s, v) for s, v in zip(span, loads[best])]
        owners[names[i]] = best
    return {name: owners[name] for name in names}


def check_same_owners(owners: Mapping[str, int], *, rank: int, world_size: int) -> None:
    """Every rank must have computed the same owner map (a collective over all ranks when
    ``world_size`` > 1): a difference means the ranks built different models or configs."""
    if world_size == 1:
        return
    digest = hashlib.sha256(json.dumps(dict(owners), sort_keys=True).encode()).hexdigest()
    holder = [digest]
    dist.broadcast_object_list(holder, src=0)
    if holder[0] != digest:
        raise RuntimeError(f"rank {rank} assigned parameter owners differently from rank 0: the ranks built "
                           "different models or optimizer configs")


def optimizer_costs(spec: OptimizerSpec, named_hidden: NamedParams, named_others: NamedParams,
                    qkv_blocks: Mapping[str, int] | None = None) -> dict[str, tuple[float, float]]:
    """(state bytes, update work) of each parameter under the optimizer ``spec`` describes.

    Muon matrices: the exact momentum bytes of their store (built on the meta device) and elements
    plus Newton–Schulz FLOPs, per row block where Muon splits a fused QKV weight (``qkv_blocks``:
    name -> 3, see :meth:`~muonq.optim.spec.MuonSpec.row_blocks`). AdamW tensors: the bytes of its
    two moments as stored (see :func:`~muonq.optim.state_bytes.adamw_state_nbytes`) and their
    element count.
    """
    from muonq.optim.selection import store_selector
    from muonq.optim.state_bytes import adamw_state_nbytes, momentum_nbytes

    def adamw(p: torch.Tensor) -> tuple[float, float]:
        nbytes = adamw_state_nbytes(p.shape, element_size=p.element_size(), bits=spec.adamw.bits,
                                    block_size=spec.adamw.block_size)
        return float(nbytes), float(p.numel())

    costs: dict[str, tuple[float, float]] = {}
    muon = spec.muon
    select = store_selector(muon.store, kernels="reference") if muon is not None and named_hidden else None
    blocks = muon.row_blocks(qkv_blocks or {}) if muon is not None else {}
    nbytes_of_shape: dict[tuple[int, ...], int] = {}  # a store's init is real work (MuonQ's R0): once per shape
    for name, p in named_hidden:
        if select is None:
            costs[name] = adamw(p)
            continue
        k = blocks.get(name, 1)
        shape = (p.shape[0] // k, *p.shape[1:])
        m, n = sorted(shape[-2:])
        ns_flops = muon.ns_steps * (4 * m * m * n + 2 * m**3)
        if shape not in nbytes_of_shape:
            nbytes_of_shape[shape] = momentum_nbytes(select, shape)
        costs[name] = (float(k * nbytes_of_shape[shape]), float(p.numel() + k * ns_flops))
    for name, p in named_others:
        costs[name] = adamw(p)
    return costs


# -- the sharded optimizer -------------------------------------------------------------------------


@dataclass
class _Bucket:
    owner: int
    params: list[torch.Tensor]

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.params)

    @property
    def in_place(self) -> bool:
        """A lone contiguous parameter is broadcast as itself, with no flat copy."""
        return len(self.params) == 1 and self.params[0].is_contiguous()


def _make_buckets(owned: Sequence[tuple[int, torch.Tensor]], world_size: int, cap_bytes: int) -> list[_Bucket]:
    """Per owner (in rank order), its parameters in model order, split by dtype/device and size cap."""
    buckets: list[_Bucket] = []
    for rank in range(world_size):
        open_buckets: dict[tuple[torch.dtype, torch.device], _Bucket] = {}
        for owner, p in owned:
            if owner != rank:
                continue
            key = (p.dtype, p.device)
            bucket = open_buckets.get(key)
            size = p.numel() * p.element_size()
            if bucket is None or bucket.nbytes + size > cap_bytes:
                bucket = open_buckets[key] = _Bucket(rank, [])
                buckets.append(bucket)
            bucket.params.append(p)
    return buckets


def _make_rounds(owned_by: Sequence[Sequence[torch.Tensor]], rank: int, round_bytes: int
                 ) -> list[tuple[list[torch.Tensor], list[_Bucket]]]:
    """Muon's overlap rounds: every rank's owned matrices (in model order) cut into the same number
    R of consecutive groups of about equal bytes (R: the largest rank's bytes / ``round_bytes``, at
    least 2, at most its matrix count). Round j is (this rank's group j, one bucket per rank's
    group j in rank order, which every rank broadcasts in that order)."""
    nbytes = [[p.numel() * p.element_size() for p in ps] for ps in owned_by]
    most = max(len(ps) for ps in owned_by)
    count = min(most, max(2, -(-max(sum(b) for b in nbytes) // max(1, round_bytes))))
    groups = []
    for ps, sizes in zip(owned_by, nbytes):
        total, done, cut = sum(sizes), 0, [[] for _ in range(count)]
        for p, size in zip(ps, sizes):
            j = min(count - 1, int(done * count // total)) if total else 0
            cut[j].append(p)
            done += size
        groups.append(cut)
    return [(groups[rank][j], [b for r in range(len(owned_by)) for b in _make_buckets([(r, p) for p in groups[r][j]],
                                                                                     len(owned_by), 2**62)])
            for j in range(count)]


class ShardedOptimizer(WrapsOptimizerSet):
    """ZeRO-1 around an :class:`OptimizerSet`; the same surface the trainer uses on OptimizerSet.

    ``build_fn(hidden, others)`` builds the inner OptimizerSet (see the module docstring for why
    over all parameters). ``named_hidden`` / ``named_others`` are ``(name, parameter)`` pairs in
    model order; names key the checkpoint. ``costs`` maps names to (state bytes, update work) for
    :func:`assign_owners`, as :func:`optimizer_costs` gives them (default: bytes and elements of
    each parameter). ``rank`` and ``world_size`` are this process's place in the default process
    group, or ``0, 1`` for an unsharded optimizer (then nothing is communicated).
    """

    def __init__(
        self,
        build_fn: BuildFn,
        named_hidden: NamedParams,
        named_others: NamedParams,
        *,
        rank: int,
        world_size: int,
        costs: Mapping[str, Sequence[float]] | None = None,
        bucket_cap_bytes: int = DEFAULT_BUCKET_CAP_BYTES,
        max_in_flight: int = 4,
        overlap: bool = True,
        round_bytes: int = DEFAULT_ROUND_BYTES,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if world_size > 1 and not (dist.is_initialized() and dist.get_world_size() == world_size):
            raise ValueError(f"a ShardedOptimizer over {world_size} ranks needs a process group of that size")
        if bucket_cap_bytes < 1 or max_in_flight < 1:
            raise ValueError("bucket_cap_bytes and max_in_flight must be >= 1")
        named = [*named_hidden, *named_others]
        self.rank, self.world_size = rank, world_size
        self.max_in_flight = max_in_flight
        self._names: dict[torch.Tensor, str] = {}
        for name, p in named:
            if p in self._names or name in self._names.values():
                raise ValueError(f"parameter {name!r} is given twice")
            self._names[p] = name
        if costs is None:
            costs = {name: (float(p.numel() * p.element_size()), float(p.numel())) for name, p in named}
        missing = [name for name, _ in named if name not in costs]
        if missing:
            raise ValueError(f"no cost for parameters {missing[:3]}")
        self.owners: dict[str, int] = assign_owners({name: costs[name] for name, _ in named}, world_size, COST_WEIGHTS)
        check_same_owners(self.owners, rank=rank, world_size=world_size)
        self.inner = build_fn([p for _, p in named_hidden], [p for _, p in named_others])
        self._foreign = [p for name, p in named if self.owners[name] != rank]
        self._buckets = _make_buckets([(self.owners[name], p) for name, p in named], world_size, bucket_cap_bytes)
        self._device = named[0][1].device if named else torch.device("cpu")
        # The overlapped step: the buckets of everything but Muon's matrices, and Muon's rounds.
        muon = self.inner.optimizers.get("muon")
        self.overlap = overlap and world_size > 1 and muon is not None
        self._rounds: list[tuple[list[torch.Tensor], list[_Bucket]]] = []
        if self.overlap:
            in_muon = {p for group in muon.param_groups for p in group["params"]}
            self._other_buckets = _make_buckets(
                [(self.owners[name], p) for name, p in named if p not in in_muon], world_size, bucket_cap_bytes)
            owned_by = [[p for name, p in named if p in in_muon and self.owners[name] == r] for r in range(world_size)]
            self._rounds = _make_rounds(owned_by, rank, round_bytes)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)  # the inner set holds every parameter

    @torch.no_grad()
    def step(self) -> None:
        """Update the owned parameters and broadcast every parameter from its owner (overlapped
        with Muon's rounds, see the module docstring)."""
        hidden = [(p, p.grad) for p in self._foreign if p.grad is not None]
        for p, _ in hidden:
            p.grad = None
        try:
            if self.overlap:
                self._overlapped_step()
                return
            self.inner.step()
        finally:
            for p, grad in hidden:
                p.grad = grad
        self._broadcast_params()

    def _overlapped_step(self) -> None:
        """AdamW and its buckets in flight, then Muon round by round, each round's broadcasts in
        flight while the next computes; all waited on before returning."""
        pending: collections.deque = collections.deque()
        for name, opt in self.inner:
            if name != "muon":
                opt.step()
        for bucket in self._other_buckets:
            self._launch(bucket, pending)
        muon = self.inner.optimizers["muon"]
        own = [(p, p.grad) for mine, _ in self._rounds for p in mine if p.grad is not None]
        for p, _ in own:
            p.grad = None
        grads = dict(own)
        try:
            for mine, sends in self._rounds:
                stepped = [p for p in mine if p in grads]
                for p in stepped:
                    p.grad = grads[p]
                if stepped:
                    muon.step()
                for p in stepped:
                    p.grad = None
                for bucket in sends:
                    self._launch(bucket, pending)
            while pending:
                self._finish(*pending.popleft())
        finally:
            for p, grad in own:
                p.grad = grad

    def _broadcast_params(self) -> None:
        if self.world_size == 1:
            return
        pending: collections.deque = collections.deque()
        for bucket in self._buckets:
            pending.append(self._start(bucket))
            if len(pending) >= self.max_in_flight:
                self._finish(*pending.popleft())
        while pending:
            self._finish(*pending.popleft())

    def _launch(self, bucket: _Bucket, pending: collections.deque) -> None:
        """Start ``bucket``'s broadcast; finish the oldest ones while more than ``max_in_flight``
        flat buffers are in flight (in-place broadcasts hold none; their handles are bounded too)."""
        pending.append(self._start(bucket))
        while sum(not b.in_place for b, _, _ in pending) > self.max_in_flight or len(pending) > _MAX_PENDING:
            self._finish(*pending.popleft())

    def _start(self, bucket: _Bucket) -> tuple[_Bucket, torch.Tensor, Any]:
        """Launch the broadcast of ``bucket`` from its owner: (bucket, flat tensor, work handle)."""
        if bucket.in_place:
            flat = bucket.params[0].detach()
        elif bucket.owner == self.rank:
            flat = torch.cat([p.detach().reshape(-1) for p in bucket.params])
        else:
            p0 = bucket.params[0]
            flat = torch.empty(bucket.numel, dtype=p0.dtype, device=p0.device)
        return bucket, flat, dist.broadcast(flat, src=bucket.owner, async_op=True)

    def _finish(self, bucket: _Bucket, flat: torch.Tensor, work: Any) -> None:
        work.wait()
        if bucket.owner == self.rank or bucket.in_place:
            return
        offset = 0
        for p in bucket.params:
            p.detach().copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()

    # -- accounting ----------------------------------------------------------------------------------
    def owned_names(self) -> list[str]:
        return [name for name, owner in self.owners.items() if owner == self.rank]

    def comm_plan(self) -> dict[str, int]:
        """What :meth:`step` moves per step: collectives, payload bytes this rank sends (its own
        buckets, once each) and receives (everyone else's), and the ideal receive volume (every
        parameter byte reaches every rank once: total x (world - 1) / world)."""
        buckets = self._buckets
        if self.overlap:
            buckets = self._other_buckets + [b for _, sends in self._rounds for b in sends]
        total = sum(b.nbytes for b in buckets)
        sent = sum(b.nbytes for b in buckets if b.owner == self.rank)
        if self.world_size == 1:
            return {"collectives": 0, "bytes_sent": 0, "bytes_received": 0, "ideal_bytes_received": 0, "param_bytes": total}
        return {
            "collectives": len(buckets), "bytes_sent": sent, "bytes_received": total - sent,
            "ideal_bytes_received": total * (self.world_size - 1) // self.world_size, "param_bytes": total,
        }  # fmt: skip

    # -- checkpoints -------------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        """What a checkpoint's manifest records about the shards: format, world size, owner map."""
        return {"format": FORMAT, "world_size": self.world_size, "owners": dict(self.owners)}

    def state_dict(self) -> dict[str, Any]:
        """This rank's shard (:mod:`muonq.optim.shard_format`): per inner optimizer, its param groups
        (hyper-parameters, parameter names) and the state of the parameters this rank owns, by name."""
        optimizers = {opt_name: named_state(opt, self._names, self._owned_state) for opt_name, opt in self.inner}
        return {**self.manifest(), "rank": self.rank, "optimizers": optimizers}

    def shards_to_read(self, owners: Mapping[str, int | list[int]]) -> list[int]:
        """The ranks of a checkpoint (written with owner map ``owners``) whose shards hold the
        state of the parameters this rank owns now (shard 0 alone, for the hyper-parameters, when
        it owns none)."""
        return shards_holding(owners, self.owned_names())

    def load_state_dict(self, shards: Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> None:
        """Load the entries of the parameters this rank owns from one shard or several (any world
        size). The shards must include every shard that holds one of them (:meth:`shards_to_read`)."""
        merged = merge_shards(shards, names=set(self.owners), needed=self.owned_names(), optimizers=set(self.inner.optimizers))
        params = {name: p for p, name in self._names.items()}
        for opt_name, opt in self.inner:
            def owned(name: str, state: Any, opt: torch.optim.Optimizer = opt) -> dict[str, Any] | None:
                if isinstance(state, RowPieces) and self.owners[name] == self.rank:  # FSDP's AdamW rows
                    return state.state_for(opt, params[name], (0, params[name].shape[0]), name)
                return self._owned_state(name, state)

            load_named_state(opt_name, opt, merged[opt_name], self._names, owned)

    def _owned_state(self, name: str, state: dict[str, Any]) -> dict[str, Any] | None:
        """``state`` if this rank owns parameter ``name``, else None (what a shard keeps of it)."""
        return state if self.owners[name] == self.rank else None


def build_sharded_optimizer(
    spec: OptimizerSpec,
    *,
    named_hidden: NamedParams,
    named_others: NamedParams,
    rank: int,
    world_size: int,
    device_type: str = "cpu",
    overlap: bool = True,
    qkv_blocks: Mapping[str, int] | None = None,
) -> ShardedOptimizer:
    """The run's optimizer: ``spec`` built by :func:`~muonq.optim.build.build_optimizer`, sharded
    over ``world_size`` ranks when ``spec.zero`` is true, or None and ``world_size`` > 1.
    ``overlap``: Muon's broadcasts overlap its next round (False: after every update; for
    comparisons). ``qkv_blocks``: the model's fused QKV weights by name (name -> 3)."""
    from muonq.optim.build import build_optimizer

    zero = spec.zero
    if zero is None:
        zero = world_size > 1
    if not zero:
        rank, world_size = 0, 1

    qkv = {p: (qkv_blocks or {})[name] for name, p in named_hidden if name in (qkv_blocks or {})}

    def build(hidden: list[torch.Tensor], others: list[torch.Tensor]) -> OptimizerSet:
        return build_optimizer(spec, hidden=hidden, others=others, device_type=device_type, qkv_blocks=qkv)

    return ShardedOptimizer(
        build, named_hidden, named_others, rank=rank, world_size=world_size,
        costs=optimizer_costs(spec, named_hidden, named_others, qkv_blocks) if world_size > 1 else None,
        overlap=overlap,
    )  # fmt: skip
