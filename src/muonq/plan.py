"""Command line: what one rank will hold for a layout, before any GPU is rented.

    python -m muonq.plan recipe=llama-7b optimizer_params=muonq parallelism=fsdp world_size=8

Every other argument is a training override, composed and validated exactly as ``run_hydra.py``
does. The model is built on the meta device (nothing is allocated); the optimizer-state bytes come
from the real stores' ``init`` on meta tensors and torchao's 8-/4-bit AdamW layout, and the owners
from the same assignment the run makes, so a run's startup line reports the same numbers
(``memory/param_bytes_rank_max``, ``memory/grad_bytes_rank_max``, ``optim/state_bytes_rank_max``;
one process's ``optim/state_bytes_muon``, ``optim/state_bytes_adamw`` and
``optim/state_ratio_vs_fp32``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch

from muonq.cli import as_int, parse_args, run_cli
from muonq.metric_names import format_bytes, format_ratio

USAGE = """\
usage: python -m muonq.plan [training overrides ...] world_size=N

  world_size=N    processes of the planned run (torchrun --nnodes x --nproc-per-node), default 8
  overrides       as for run_hydra.py: recipe=, optimizer_params=, parallelism=, optimizer_params.args.*, ...

Prints the bytes of parameters, gradients and optimizer state as stored (fp32 parameters and
gradients; state in its stored form, step counters left out), each the largest over ranks as a
run logs it, the largest rank's total, and one process's figures for comparison: its state split
into the Muon and the AdamW side, and how many times less that is than fp32 Muon + fp32 AdamW.
"""

NOT_COUNTED = ("activations (they scale with batch_size x context_length and shrink with activation "
               "checkpointing), the all-gathered parameters of the blocks being computed under fsdp, "
               "Newton-Schulz and communication buffers, and the CUDA context and allocator")


@dataclass(frozen=True)
class RankBytes:
    """Each figure is its largest over ranks, as a run logs it; ``total`` is the largest rank's sum."""

    params: int
    grads: int
    state: int
    total: int


@dataclass(frozen=True)
class ProcessBytes(RankBytes):
    """Everything on one process, the state split into its two sides; ``hidden_numel`` /
    ``other_numel`` are the model's elements in hidden matrices / everything else."""

    muon_state: int
    adamw_state: int
    hidden_numel: int
    other_numel: int

    @property
    def fp32_state(self) -> int:
        """What fp32 Muon + fp32 AdamW would hold on this model."""
        from muonq.optim.state_bytes import fp32_reference_nbytes

        return fp32_reference_nbytes(hidden_numel=self.hidden_numel, other_numel=self.other_numel)

    @property
    def state_ratio_vs_fp32(self) -> float:
        from muonq.optim.state_bytes import state_ratio_vs_fp32

        return state_ratio_vs_fp32(self.state, hidden_numel=self.hidden_numel, other_numel=self.other_numel)


def _rows(rows: int, world_size: int) -> list[int]:
    from muonq.optim.owned import shard_rows

    return [end - start for start, end in shard_rows(rows, world_size)]


def plan(cfg: Any, world_size: int) -> tuple[RankBytes, ProcessBytes]:
    """(the largest rank's bytes under ``cfg``'s layout at ``world_size``, one process's bytes)."""
    from muonq.config import optimizer_spec
    from muonq.models import build_model
    from muonq.optim.state_bytes import adamw_state_nbytes
    from muonq.optim.zero import COST_WEIGHTS, assign_owners, optimizer_costs

    with torch.device("meta"):
        model = build_model(cfg.recipe.model)
    named_hidden = model.hidden_matrices()
    hidden_ids = {id(p) for _, p in named_hidden}
    named_others = [(n, p) for n, p in model.named_parameters() if id(p) not in hidden_ids]
    named = [*named_hidden, *named_others]
    spec = optimizer_spec(cfg.optimizer_params)
    costs = optimizer_costs(spec, named_hidden, named_others, model.qkv_blocks())
    param_bytes = {name: p.numel() * p.element_size() for name, p in named}
    whole_params, whole_state = sum(param_bytes.values()), int(sum(c[0] for c in costs.values()))
    muon_state = int(sum(costs[name][0] for name, _ in named_hidden)) if spec.muon is not None else 0
    whole = ProcessBytes(whole_params, whole_params, whole_state, 2 * whole_params + whole_state,
                         muon_state=muon_state, adamw_state=whole_state - muon_state,
                         hidden_numel=sum(p.numel() for _, p in named_hidden),
                         other_numel=sum(p.numel() for _, p in named_others))

    per_rank = [[0, 0, 0] for _ in range(world_size)]
    if cfg.parallelism.name == "fsdp":  # every shard group (HSDP: dp_shard ranks) holds the same
        shard = cfg.parallelism.dp_shard or world_size
        per_rank = per_rank[:shard]
        muon = named_hidden if spec.muon is not None else []
        owners = assign_owners(optimizer_costs(spec, muon, [], model.qkv_blocks()), shard, COST_WEIGHTS)
        for name, owner in owners.items():
            per_rank[owner][2] += int(costs[name][0])
        for name, p in named:
            cols = p.numel() // p.shape[0]
            for r, rows in enumerate(_rows(p.shape[0], shard)):
                per_rank[r][0] += rows * cols * p.element_size()
                per_rank[r][1] += rows * cols * p.element_size()
                if name not in owners:  # AdamW on this rank's rows
                    per_rank[r][2] += adamw_state_nbytes((rows, *p.shape[1:]), element_size=p.element_size(),
                                                         bits=spec.adamw.bits, block_size=spec.adamw.block_size)
    else:
        zero = spec.zero if spec.zero is not None else world_size > 1
        owners = assign_owners(costs, world_size, COST_WEIGHTS) if zero else {}
        for r in range(world_size):
            per_rank[r][0] = per_rank[r][1] = whole.params
            per_rank[r][2] = whole.state if not zero else 0
        for name, owner in owners.items():
            per_rank[owner][2] += int(costs[name][0])
    params, grads, state = (max(b[k] for b in per_rank) for k in range(3))
    return RankBytes(params, grads, state, max(sum(b) for b in per_rank)), whole


def main(argv: list[str]) -> int:
    from muonq.config import compose_config, validate

    values, overrides = parse_args(argv, keys={"world_size": 8}, passthrough=True)
    world_size = as_int(values["world_size"], "world_size", minimum=1)
    cfg = compose_config(overrides)
    validate(cfg, world_size=world_size)
    rank, whole = plan(cfg, world_size)
    layout = cfg.parallelism.name
    if layout == "fsdp" and cfg.parallelism.dp_shard not in (None, world_size):
        layout = f"hsdp ({world_size // cfg.parallelism.dp_shard} replicas x {cfg.parallelism.dp_shard} shards)"
    if layout == "ddp":
        layout += " + ZeRO-1" if world_size > 1 and cfg.optimizer_params.zero is not False else " (replicated state)"
    print(f"{cfg.optimizer_params.name} on {model_summary(cfg)}, {layout}, {world_size} rank(s)")
    print(f"{'':<22}{'per rank (max)':>15}{'one process':>14}")
    for label, mine, one in (("parameters (fp32)", rank.params, whole.params), ("gradients (fp32)", rank.grads, whole.grads),
                             ("optimizer state", rank.state, whole.state), ("total", rank.total, whole.total)):
        print(f"{label:<22}{format_bytes(mine):>15}{format_bytes(one):>14}")
        if label == "optimizer state":
            for side, nbytes in (("Muon side", whole.muon_state), ("AdamW side", whole.adamw_state)):
                print(f"  {side:<20}{'':>15}{format_bytes(nbytes):>14}")
    print(f"optimizer state vs fp32 Muon + fp32 AdamW ({format_bytes(whole.fp32_state)}): "
          f"{format_ratio(whole.state_ratio_vs_fp32)} (one process)")
    print(f"not counted: {NOT_COUNTED}")
    return 0


def model_summary(cfg: Any) -> str:
    m = cfg.recipe.model
    return f"{m.model_type} d={m.n_embd} x {m.n_layer} layers, vocab {m.vocab_size}"


if __name__ == "__main__":
    sys.exit(run_cli(main, USAGE))
