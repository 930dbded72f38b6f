"""How faithfully each variant stores Muon momentum, element-wise and after Newton–Schulz.

For every matrix B (normalised to unit Frobenius norm, as MuonQ's momentum is) and every variant,
the real store encodes B and decodes B_hat; reported are

    rel err = ||B_hat - B|| / ||B||        NS err = ||NS(B_hat) - NS(B)|| / ||NS(B)||

with NS = 5 quintic Newton–Schulz steps in fp32. Decomposed stores run one warm-started power
iteration per save; in training the subspace is carried over from step to step, so the matrix is
saved ``--warm-saves`` times first (steady state; ``NS err cold`` is after a single save).

Matrices: rank-8 signal (singular values 1 ... 0.1) plus Student-t (df 3) noise of equal Frobenius
norm, at 512x512, 1376x512, 1024x2736; and, with ``--captured FILE``, every matrix in a
``torch.save``'d dict name -> tensor (captured real momentum).

    python benchmarks/bench_fidelity.py [--captured momentum.pt] [--warm-saves 8] [--seed 0]
"""

from __future__ import annotations

import argparse

import torch

from muonq.optim.momentum import FullPrecisionStore
from muonq.optim.newton_schulz import zeropower_via_newtonschulz
from muonq.optim.variants import momentum_nbytes, store_selector, variant_args

SHAPES = [(512, 512), (1376, 512), (1024, 2736)]

# (label, variant, overrides)
ROWS: list[tuple[str, str, dict]] = [
    ("muon8bit linear b256", "muon8bit", {}),
    ("muon8bit dynamic b256", "muon8bit-dynamic", {}),
    ("muon8 (per-tensor)", "muon8", {}),
    ("muon4 (naive per-tensor)", "muon4", {}),
    ("muonq (default)", "muonq", {}),
    ("muonq compand off", "muonq", {"compand": False}),
    ("muonq rank 0", "muonq", {"rank": 0}),
    ("muonq + residual b128", "muonq-block128", {}),
    ("muonq compand off + residual b128", "muonq-block128", {"compand": False}),
    ("grasp-like (8-bit P,R; grid 128)", "grasp", {}),
]


def synthetic(shape: tuple[int, int], seed: int, rank: int = 8, df: float = 3.0) -> torch.Tensor:
    rows, cols = shape
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, rank, generator=g))
    v, _ = torch.linalg.qr(torch.randn(cols, rank, generator=g))
    signal = (u * torch.logspace(0, -1, rank)) @ v.T
    torch.manual_seed(seed)
    noise = torch.distributions.StudentT(df).sample(shape)
    b = signal / signal.norm() + noise / noise.norm()
    return b / b.norm()


def ns(matrix: torch.Tensor) -> torch.Tensor:
    return zeropower_via_newtonschulz(matrix, 5, dtype=torch.float32)


def measure(matrix: torch.Tensor, variant: str, overrides: dict, warm_saves: int) -> dict[str, float | str]:
    select = store_selector(variant_args(variant, **overrides))
    store = select(matrix)
    if isinstance(store, FullPrecisionStore):
        return {"B/elem": 4.0, "rel err": 0.0, "NS err cold": 0.0, "NS err": 0.0, "note": "fp32 fallback"}
    reference = ns(matrix)
    state: dict[str, torch.Tensor] = {}
    store.init(state, matrix)
    result: dict[str, float | str] = {"B/elem": momentum_nbytes(select, matrix.shape) / matrix.numel()}
    for save in range(1, warm_saves + 1):
        store.save(state, matrix)
        if save == 1:
            cold = store.load(state)
            result["NS err cold"] = ((ns(cold) - reference).norm() / reference.norm()).item()
    b_hat = store.load(state)
    result["rel err"] = ((b_hat - matrix).norm() / matrix.norm()).item()
    result["NS err"] = ((ns(b_hat) - reference).norm() / reference.norm()).item()
    result["note"] = ""
    return result


def report(name: str, matrix: torch.Tensor, warm_saves: int) -> None:
    print(f"\n### {name} ({matrix.shape[0]} x {matrix.shape[1]})\n")
    print("| variant | B/elem | rel err | NS err cold | NS err |")
    print("|---|---:|---:|---:|---:|")
    for label, variant, overrides in ROWS:
        r = measure(matrix, variant, overrides, warm_saves)
        note = f" ({r['note']})" if r["note"] else ""
        print(f"| {label}{note} | {r['B/elem']:.4f} | {r['rel err']:.3f} | {r['NS err cold']:.3f} | {r['NS err']:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captured", help="torch.save'd dict name -> momentum tensor")
    parser.add_argument("--warm-saves", type=int, default=8, help="saves before measuring (>= 1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.warm_saves < 1:
        parser.error("--warm-saves must be >= 1")
    print(f"warm saves: {args.warm_saves}; NS: 5 quintic steps in fp32; matrices normalised to unit Frobenius norm")
    for i, shape in enumerate(SHAPES):
        report(f"synthetic rank-8 + Student-t(3), seed {args.seed + i}", synthetic(shape, args.seed + i), args.warm_saves)
    if args.captured:
        captured = torch.load(args.captured, weights_only=True, map_location="cpu")
        min_numel = variant_args("muon").min_quant_numel
        for name, tensor in captured.items():
            if tensor.ndim != 2 or tensor.numel() < min_numel:
                print(f"\nskipped captured {name} {tuple(tensor.shape)}: not a matrix of >= {min_numel} elements")
                continue
            matrix = tensor.float()
            report(f"captured {name}", matrix / matrix.norm().clamp_min(1e-30), args.warm_saves)


if __name__ == "__main__":
    main()
