"""Exact Muon momentum bytes of every variant on the hidden matrices of the LLaMA recipes.

The bytes come from the real store code: each variant's selector builds the store of every distinct
matrix shape, ``init`` allocates its state on the meta device, and the state tensors' ``nbytes`` are
summed and multiplied by how many matrices have that shape. AdamW state (embeddings, head, norms)
and step counters are not counted.

AdamW rows, for comparison, put the same matrices under AdamW: ``adamw`` keeps two fp32 states
(8 bytes per element); ``adamw8bit`` is torchao's AdamW8bit, whose state is measured, not assumed:
a real llama-tiny's hidden matrices are stepped once with AdamW8bit built by
``muonq.optim.build.build_optimizer`` and its tensor-subclass state (``OptimState8bit``: uint8
codes, one fp32 scale per 256 elements, a 256-entry fp32 code map per state) is counted by
``muonq.optim.state_bytes.state_bytes``; the per-tensor rule that reproduces that count exactly is
then applied to the recipes' shapes.

    python benchmarks/bench_state_memory.py
"""

from __future__ import annotations

import argparse
import math

import torch

from muonq.config import preset
from muonq.optim.selection import store_selector
from muonq.optim.state_bytes import adamw_state_nbytes, momentum_nbytes, state_bytes

# hidden, SwiGLU width, layers (as in hydra_conf/recipe/<name>.yaml)
RECIPES: dict[str, tuple[int, int, int]] = {
    "llama-60m": (512, 1376, 8),
    "llama-350m": (1024, 2736, 24),
    "llama-1b": (2048, 5461, 24),
}

# (label, variant, overrides)
ROWS: list[tuple[str, str, dict]] = [
    ("muon (fp32)", "muon", {}),
    ("muon8bit linear, block 256", "muon8bit", {}),
    ("muon8bit dynamic, block 256", "muon8bit-dynamic", {}),
    ("muon8 (per-tensor 8-bit)", "muon8", {}),
    ("muon4 (per-tensor 4-bit)", "muon4", {}),
    ("muonq (default)", "muonq", {}),
    ("muonq + residual block 128", "muonq-block128", {}),
    ("muonq rank/32 + residual block 256", "muonq", {"rank": 32, "residual_block_size": 256}),
    ("grasp-like (8-bit factors, grid 128)", "grasp", {}),
    ("muoneq (fp32 momentum, as muon)", "muoneq", {}),
]
ADAMW_BLOCK = 256


def adamw_bytes(shape: tuple[int, int]) -> int:
    """torch AdamW: exp_avg and exp_avg_sq in fp32."""
    return adamw_state_nbytes(shape, element_size=4, bits=32, block_size=ADAMW_BLOCK)


def adamw8bit_bytes(shape: tuple[int, int], block: int = ADAMW_BLOCK) -> int:
    """torchao AdamW8bit, by the layout rule of :func:`muonq.optim.state_bytes.adamw_state_nbytes`."""
    return adamw_state_nbytes(shape, element_size=4, bits=8, block_size=block)


def measured_adamw8bit() -> tuple[int, int, int]:
    """(bytes counted by state_bytes, bytes by :func:`adamw8bit_bytes`, elements) for AdamW8bit over a
    real llama-tiny's hidden matrices after one step."""
    from muonq.config import ModelConfig
    from muonq.models import build_model
    from muonq.optim.build import build_optimizer

    torch.manual_seed(0)
    model = build_model(ModelConfig(n_embd=128, n_layer=4, n_head=4, intermediate_size=352))
    hidden = [p for _, p in model.hidden_matrices()]
    opt = build_optimizer(preset("adamw8bit"), hidden=hidden, others=[]).optimizers["adamw"]
    for p in hidden:
        p.grad = torch.randn_like(p)
    opt.step()
    counted = state_bytes(opt)["total"]
    return counted, sum(adamw8bit_bytes(tuple(p.shape)) for p in hidden), sum(p.numel() for p in hidden)


def hidden_shapes(hidden: int, ffn: int, layers: int) -> list[tuple[tuple[int, int], int]]:
    """(shape, count): q, k, v, o are hidden x hidden; gate and up ffn x hidden; down hidden x ffn."""
    return [((hidden, hidden), 4 * layers), ((ffn, hidden), 2 * layers), ((hidden, ffn), layers)]


def recipe_bytes(variant: str, overrides: dict, shapes: list[tuple[tuple[int, int], int]]) -> int:
    if variant == "adamw":
        return sum(adamw_bytes(shape) * count for shape, count in shapes)
    if variant == "adamw8bit":
        return sum(adamw8bit_bytes(shape) * count for shape, count in shapes)
    select = store_selector(preset(variant, **overrides).muon.store)
    return sum(momentum_nbytes(select, shape) * count for shape, count in shapes)


def one_matrix(variant: str, overrides: dict, shape: tuple[int, int]) -> int:
    return recipe_bytes(variant, overrides, [(shape, 1)])


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    shapes = {name: hidden_shapes(*dims) for name, dims in RECIPES.items()}
    numel = {name: sum(math.prod(s) * c for s, c in shape_list) for name, shape_list in shapes.items()}
    rows = ROWS + [("adamw (2 x fp32 states)", "adamw", {}), ("adamw8bit (torchao, block 256)", "adamw8bit", {})]
    table = {label: {name: recipe_bytes(v, o, shapes[name]) for name in RECIPES} for label, v, o in rows}
    fp32 = table[ROWS[0][0]]

    print("Muon matrices: " + ", ".join(f"{name} {numel[name] / 1e6:.1f}M elements" for name in RECIPES))
    print()
    print("| variant | " + " | ".join(f"{name} bytes | ratio | B/elem" for name in RECIPES) + " |")
    print("|---|" + "---:|---:|---:|" * len(RECIPES))
    for label, row in table.items():
        cells = [f"{row[name]:,} | {fp32[name] / row[name]:.4f}x | {row[name] / numel[name]:.4f}" for name in RECIPES]
        print(f"| {label} | " + " | ".join(cells) + " |")
    print()
    print("| variant | one 512 x 512 matrix, bytes |")
    print("|---|---:|")
    for label, variant, overrides in rows:
        print(f"| {label} | {one_matrix(variant, overrides, (512, 512)):,} |")
    counted, predicted, numel = measured_adamw8bit()
    print()
    print(f"adamw8bit measured on a real llama-tiny (hidden matrices, {numel:,} elements, one step): state_bytes "
          f"counts {counted:,} bytes = {counted / numel:.4f} bytes/element; the per-tensor rule gives {predicted:,} "
          f"({'exact' if counted == predicted else 'MISMATCH'})")
    if counted != predicted:
        raise SystemExit("the AdamW8bit byte rule does not match the counted state")


if __name__ == "__main__":
    main()
