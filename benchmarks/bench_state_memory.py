"""Exact optimizer-state bytes of every variant on the LLaMA recipes: the Muon matrices alone, and
the whole optimizer (Muon side + AdamW side).

Each recipe's model is built on the meta device from ``hydra_conf/recipe/<name>.yaml`` and its bytes
come from :func:`muonq.optim.zero.optimizer_costs`, the count the planner and ZeRO-1 use: the real
store code's ``init`` on meta tensors for Muon momentum (each distinct shape once), torchao's
stored layout for the AdamW side. Step counters are not counted.

Two ratios: the Muon matrices' momentum against fp32 Muon's (4 bytes per element), and the whole
optimizer's state against fp32 Muon + fp32 AdamW (4 bytes per hidden-matrix element, 8 per element
of the embeddings, head and norms; :func:`muonq.optim.state_bytes.state_ratio_vs_fp32`).

AdamW rows put the hidden matrices under AdamW too (the adamw family). torchao's AdamW8bit and
AdamW4bit layouts are measured, not assumed: a real llama-tiny is stepped once with each, built by
``muonq.optim.build.build_optimizer``, its tensor-subclass state (``OptimState8bit`` /
``OptimState4bit``: codes, one fp32 scale per block, a 256- / 16-entry fp32 code map per state)
counted by ``muonq.optim.state_bytes.state_bytes`` and compared with the per-tensor rule.

    python benchmarks/bench_state_memory.py
"""

from __future__ import annotations

import argparse
import functools
from typing import Any

import torch

from muonq.config import compose_config, preset
from muonq.optim.state_bytes import FP32_MUON_BYTES_PER_ELEMENT, state_bytes, state_ratio_vs_fp32
from muonq.optim.zero import NamedParams, optimizer_costs

RECIPES = ("llama-60m", "llama-350m", "llama-1b")

# (label, variant, optimizer_params.args overrides)
ROWS: list[tuple[str, str, dict[str, Any]]] = [
    ("muon (fp32)", "muon", {}),
    ("muon8bit linear, block 256", "muon8bit", {}),
    ("muon8bit dynamic, block 256", "muon8bit-dynamic", {}),
    ("muon8 (per-tensor 8-bit)", "muon8", {}),
    ("muon4 (per-tensor 4-bit)", "muon4", {}),
    ("muonq (default)", "muonq", {}),
    ("muonq + 8-bit AdamW side", "muonq", {"adamw_bits": 8}),
    ("muonq + 4-bit AdamW side", "muonq", {"adamw_bits": 4}),
    ("muonq-hifi", "muonq-hifi", {}),
    ("muonq-hifi + 8-bit AdamW side", "muonq-hifi", {"adamw_bits": 8}),
    ("muonq + residual block 128", "muonq-block128", {}),
    ("muonq rank/32 + residual block 256", "muonq", {"rank": 32, "residual_block_size": 256}),
    ("grasp-like (8-bit factors, grid 128)", "grasp", {}),
    ("muoneq (fp32 momentum, as muon)", "muoneq", {}),
    ("adamw (2 x fp32 states)", "adamw", {}),
    ("adamw8bit (torchao, block 256)", "adamw8bit", {}),
    ("adamw, adamw_bits=4 (torchao AdamW4bit, block 64)", "adamw", {"adamw_bits": 4}),
]


@functools.cache
def recipe_params(recipe: str) -> tuple[NamedParams, NamedParams]:
    """(hidden matrices, everything else) of ``recipe``'s model, on the meta device."""
    from muonq.models import build_model

    with torch.device("meta"):
        model = build_model(compose_config([f"recipe={recipe}"]).recipe.model)
    hidden = model.hidden_matrices()
    ids = {id(p) for _, p in hidden}
    return hidden, [(n, p) for n, p in model.named_parameters() if id(p) not in ids]


def state_split(variant: str, overrides: dict[str, Any], hidden: NamedParams, others: NamedParams) -> tuple[int, int]:
    """(bytes of the hidden matrices' state, bytes of the whole optimizer's state)."""
    costs = optimizer_costs(preset(variant, **overrides), hidden, others)
    matrices = int(sum(costs[name][0] for name, _ in hidden))
    return matrices, matrices + int(sum(costs[name][0] for name, _ in others))


def table_rows(recipes: tuple[str, ...] = RECIPES) -> list[tuple[str, dict[str, tuple[int, float, float, int, float]]]]:
    """Per row and recipe: (matrix bytes, vs fp32 Muon, bytes per element, whole bytes, vs fp32
    Muon + fp32 AdamW)."""
    rows = []
    for label, variant, overrides in ROWS:
        cells = {}
        for recipe in recipes:
            hidden, others = recipe_params(recipe)
            numel = sum(p.numel() for _, p in hidden)
            matrices, whole = state_split(variant, overrides, hidden, others)
            ratio = state_ratio_vs_fp32(whole, hidden_numel=numel, other_numel=sum(p.numel() for _, p in others))
            cells[recipe] = (matrices, FP32_MUON_BYTES_PER_ELEMENT * numel / matrices, matrices / numel, whole, ratio)
        rows.append((label, cells))
    return rows


def markdown_table(recipes: tuple[str, ...] = RECIPES) -> str:
    head = " | ".join(f"{r} matrices | vs fp32 Muon | B/elem | {r} whole optimizer | vs fp32 Muon + AdamW" for r in recipes)
    lines = [f"| variant | {head} |", "|---|" + "---:|" * 5 * len(recipes)]
    for label, cells in table_rows(recipes):
        parts = [f"{m:,} | {r:.4f}x | {b:.4f} | {w:,} | {wr:.4f}x" for m, r, b, w, wr in (cells[x] for x in recipes)]
        lines.append(f"| {label} | " + " | ".join(parts) + " |")
    return "\n".join(lines)


def one_matrix(variant: str, overrides: dict[str, Any], shape: tuple[int, int]) -> int:
    with torch.device("meta"):
        matrix = torch.nn.Parameter(torch.empty(shape))
    return state_split(variant, overrides, [("m", matrix)], [])[0]


def measured_adamw(bits: int) -> tuple[int, int, int]:
    """(bytes counted by state_bytes, bytes by the per-tensor rule, elements) for torchao's
    ``bits``-bit AdamW over a real llama-tiny's hidden matrices after one step."""
    from muonq.config import ModelConfig
    from muonq.models import build_model
    from muonq.optim.build import build_optimizer

    torch.manual_seed(0)
    model = build_model(ModelConfig(n_embd=128, n_layer=4, n_head=4, intermediate_size=352))
    hidden = model.hidden_matrices()
    spec = preset("adamw", adamw_bits=bits)
    opt = build_optimizer(spec, hidden=[p for _, p in hidden], others=[]).optimizers["adamw"]
    for _, p in hidden:
        p.grad = torch.randn_like(p)
    opt.step()
    predicted = int(sum(c[0] for c in optimizer_costs(spec, hidden, []).values()))
    return state_bytes(opt)["total"], predicted, sum(p.numel() for _, p in hidden)


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    numel = {r: sum(p.numel() for _, p in recipe_params(r)[0]) for r in RECIPES}
    others = {r: sum(p.numel() for _, p in recipe_params(r)[1]) for r in RECIPES}
    print("Muon matrices: " + ", ".join(f"{r} {numel[r] / 1e6:.1f}M elements" for r in RECIPES))
    print("AdamW side (embeddings, head, norms): " + ", ".join(f"{r} {others[r] / 1e6:.1f}M elements" for r in RECIPES))
    print()
    print(markdown_table())
    print()
    print("| variant | one 512 x 512 matrix, bytes |")
    print("|---|---:|")
    for label, variant, overrides in ROWS:
        if "adamw_bits" in overrides and preset(variant).family == "muon":
            continue  # a Muon optimizer's AdamW side holds no hidden matrix
        print(f"| {label} | {one_matrix(variant, overrides, (512, 512)):,} |")
    print()
    for bits in (8, 4):
        counted, predicted, n = measured_adamw(bits)
        print(f"{bits}-bit AdamW measured on a real llama-tiny (hidden matrices, {n:,} elements, one step): "
              f"state_bytes counts {counted:,} bytes = {counted / n:.4f} bytes/element; the per-tensor rule gives "
              f"{predicted:,} ({'exact' if counted == predicted else 'MISMATCH'})")
        if counted != predicted:
            raise SystemExit(f"the {bits}-bit AdamW byte rule does not match the counted state")


if __name__ == "__main__":
    main()
