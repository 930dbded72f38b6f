"""Exact Muon momentum bytes of every variant on the hidden matrices of the LLaMA recipes.

The bytes come from the real store code: each variant's selector builds the store of every distinct
matrix shape, ``init`` allocates its state on the meta device, and the state tensors' ``nbytes`` are
summed and multiplied by how many matrices have that shape. AdamW state (embeddings, head, norms)
and step counters are not counted.

    python benchmarks/bench_state_memory.py
"""

from __future__ import annotations

import argparse
import math

from muonq.optim.variants import momentum_nbytes, store_selector, variant_args

# hidden, SwiGLU width, layers (DESIGN.md section 4)
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
    ("grasp-like (8-bit factors, grid 128)", "grasp", {}),
]


def hidden_shapes(hidden: int, ffn: int, layers: int) -> list[tuple[tuple[int, int], int]]:
    """(shape, count): q, k, v, o are hidden x hidden; gate and up ffn x hidden; down hidden x ffn."""
    return [((hidden, hidden), 4 * layers), ((ffn, hidden), 2 * layers), ((hidden, ffn), layers)]


def recipe_bytes(variant: str, overrides: dict, shapes: list[tuple[tuple[int, int], int]]) -> int:
    select = store_selector(variant_args(variant, **overrides))
    return sum(momentum_nbytes(select, shape) * count for shape, count in shapes)


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    shapes = {name: hidden_shapes(*dims) for name, dims in RECIPES.items()}
    numel = {name: sum(math.prod(s) * c for s, c in shape_list) for name, shape_list in shapes.items()}
    table = {label: {name: recipe_bytes(v, o, shapes[name]) for name in RECIPES} for label, v, o in ROWS}
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
    for label, variant, overrides in ROWS:
        print(f"| {label} | {momentum_nbytes(store_selector(variant_args(variant, **overrides)), (512, 512)):,} |")


if __name__ == "__main__":
    main()
