"""How faithfully each variant stores Muon momentum, element-wise and after Newton–Schulz.

**One matrix.** For every matrix B (normalised to unit Frobenius norm, as MuonQ's momentum is) and
every variant, the real store encodes B and decodes B_hat; reported are

    rel err = ||B_hat - B|| / ||B||        NS err = ||NS(B_hat) - NS(B)|| / ||NS(B)||

with NS = 5 quintic Newton–Schulz steps in fp32. Decomposed stores run one warm-started power
iteration per save; in training the subspace is carried over from step to step, so the matrix is
saved ``--warm-saves`` times first (steady state; ``NS err cold`` is after a single save).

**A stream of steps.** Quantization error accumulates: every step decodes the stored momentum,
adds the gradient and re-encodes. Each store is fed the same gradients G_1 ... G_K through its real
``accumulate`` (B_t = mu B_hat_{t-1} + G_t, with MuonQ's normalisation of G and B when the variant
has ``norm``), and the NS input U_t it returns (Nesterov off: U_t = B_t) is compared with the fp32
trajectory fed the same gradients (normalised the same way):
``NS err(t) = ||NS(U_t) - NS(U_t^fp32)|| / ||NS(U_t^fp32)||``, reported at steps 1, 10, 25 and K,
and averaged over every 5th step. The weights are not updated (the
gradients are fixed), so only the momentum's storage differs. Streams: synthetic (rank-8 signal
drifting slowly plus Student-t noise, from zero momentum) and, with ``--stream FILE``, the captured
gradients of the last K steps of a real run (from its momentum at step T - K; see
``capture_momentum.py``).

Matrices: rank-8 signal (singular values 1 ... 0.1) plus Student-t (df 3) noise of equal Frobenius
norm, at 512x512, 1376x512, 1024x2736; and, with ``--captured FILE``, every matrix in a
``torch.save``'d dict name -> tensor (captured real momentum: ``benchmarks/data`` holds a 256-wide
4-layer LLaMA's and a 512-wide 2-layer one's, llama-60m's matrix shapes).

    python benchmarks/bench_fidelity.py [--captured benchmarks/data/momentum_llama-tiny-256.pt]
        [--stream benchmarks/data/cache/grad_stream_llama-tiny-256.pt] [--synthetic-stream 50]
        [--candidates | --orders | --hifi] [--summary] [--warm-saves 8] [--seed 0]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Iterable, Iterator

import torch

from muonq.optim.momentum import FullPrecisionStore
from muonq.optim.newton_schulz import zeropower_via_newtonschulz
from muonq.config import preset
from muonq.optim.selection import store_selector
from muonq.optim.state_bytes import momentum_nbytes

SHAPES = [(512, 512), (1376, 512), (1024, 2736)]
STREAM_SHAPES = [(512, 512), (1376, 512)]
# llama-60m's hidden matrices (d 512, SwiGLU 1376, 8 layers): bytes per element are quoted over them.
LLAMA_60M = [((512, 512), 32), ((1376, 512), 16), ((512, 1376), 8)]

# (label, variant, overrides). "stream only": normalisation changes nothing for one unit-norm matrix.
ROWS: list[tuple[str, str, dict]] = [
    ("muon8bit linear b256", "muon8bit", {}),
    ("muon8bit dynamic b256", "muon8bit-dynamic", {}),
    ("muon8 (per-tensor)", "muon8", {}),
    ("muon4 (naive per-tensor)", "muon4", {}),
    ("muonq (default)", "muonq", {}),
    ("muonq-hifi", "muonq-hifi", {}),
    ("muonq mu-law after the scale", "muonq", {"compand": False, "quant": "mulaw-after-scale"}),
    ("muonq compand off", "muonq", {"compand": False}),
    ("muonq rank 0", "muonq", {"rank": 0}),
    ("muonq norm off", "muonq", {"norm": False}),
    ("muonq + residual b128", "muonq-block128", {}),
    ("muonq compand off + residual b128", "muonq-block128", {"compand": False}),
    ("grasp-like (8-bit P,R; grid 128)", "grasp", {}),
]
STREAM_ONLY = {"muonq norm off"}

# mu-law after the scale: codes at mu-law levels of x / absmax, instead of MuonQ's companding of the
# raw values before the scale (compand).
_AFTER_SCALE = {"compand": False, "quant": "mulaw-after-scale"}

# "Beating the paper": more compression at no loss, or less loss at the same bytes (all keep MuonQ's
# normalisation; fp16 scales). mu is the mu-law parameter (the paper's 255; smaller is closer to
# linear codes; MuonQ's companding of raw entries ~1/sqrt(mn) is about mu x absmax strong),
# rank/r means k = min(m, n) // r.
CANDIDATES: list[tuple[str, str, dict]] = [
    ("muonq + residual b256", "muonq", {"residual_block_size": 256}),
    ("muonq + residual b64", "muonq", {"residual_block_size": 64}),
    ("muonq + grid-128 residual", "muonq", {"grid": True}),
    ("muonq rank/32", "muonq", {"rank": 32}),
    ("muonq rank/32 + residual b128", "muonq", {"rank": 32, "residual_block_size": 128}),
    ("muonq rank/64 + residual b128", "muonq", {"rank": 64, "residual_block_size": 128}),
    ("muonq 8-bit factors", "muonq", {"factor_bits": 8}),
    ("muonq 8-bit factors + residual b128", "muonq", {"factor_bits": 8, "residual_block_size": 128}),
    ("muonq rank 0 + b128 (mu-law blocks only)", "muonq", {"rank": 0, "gran": "block", "block_size": 128}),
    ("muonq linear + grid-128 residual", "muonq", {"compand": False, "grid": True}),
    ("muonq mu 1000 + residual b128", "muonq", {"mu": 1000.0, "residual_block_size": 128}),
    ("muonq mu 1000 rank/32 + residual b256", "muonq", {"mu": 1000.0, "rank": 32, "residual_block_size": 256}),
    # mu-law after the scale (x / absmax companded at full strength mu), with smaller mu
    ("muonq after-scale mu 31", "muonq", {**_AFTER_SCALE, "mu": 31.0}),
    ("muonq after-scale mu 15", "muonq", {**_AFTER_SCALE, "mu": 15.0}),
    ("muonq after-scale mu 7 + residual b128", "muonq", {**_AFTER_SCALE, "mu": 7.0, "residual_block_size": 128}),
    ("muonq after-scale mu 15 + residual b128", "muonq", {**_AFTER_SCALE, "mu": 15.0, "residual_block_size": 128}),
    ("muonq after-scale mu 15 rank/32 + residual b128", "muonq",
     {**_AFTER_SCALE, "mu": 15.0, "rank": 32, "residual_block_size": 128}),
    ("muonq after-scale mu 15 rank/32 + residual b256", "muonq",
     {**_AFTER_SCALE, "mu": 15.0, "rank": 32, "residual_block_size": 256}),
]

# muonq-hifi (rank/20, 256-element residual blocks, scale search, mu-law mu 3 after the scale, a
# quarter of the factors' rounding error in the residual) against the paper's layout, one change at
# a time, and its nearest rivals at no more bytes.
HIFI: list[tuple[str, str, dict]] = [
    ("muonq (default)", "muonq", {}),
    ("muonq-hifi", "muonq-hifi", {}),
    ("muonq-hifi without the factor error share", "muonq-hifi", {"factor_error_share": 0.0}),
    ("muonq-hifi with half the factor error", "muonq-hifi", {"factor_error_share": 0.5}),
    ("muonq-hifi without scale search", "muonq-hifi", {"residual_scale_search": False}),
    ("muonq-hifi, linear codes", "muonq-hifi", {"quant": "linear"}),
    ("muonq-hifi, mu 7 after the scale", "muonq-hifi", {"mu": 7.0}),
    ("muonq-hifi, paper order mu 1000", "muonq-hifi", {"quant": "linear", "compand": True, "mu": 1000.0}),
    ("muonq rank/20 + residual b256 (paper order)", "muonq", {"rank": 20, "residual_block_size": 256}),
    ("muonq rank/20 + residual b256 + scale search", "muonq",
     {"rank": 20, "residual_block_size": 256, "residual_scale_search": True}),
    ("muonq-hifi rank/18 + residual b512", "muonq-hifi", {"rank": 18, "residual_block_size": 512}),
    ("muonq-hifi rank/40, 8-bit factors", "muonq-hifi", {"rank": 40, "factor_bits": 8}),
]

# Where mu-law sits in the quantizer: "paper order" (MuonQ's: compand the raw values, then take the
# scale from the companded values) against "scale first" (divide by the group absmax, then compand
# with full strength mu). Per-tensor and 128-block residual scales.
ORDERS: list[tuple[str, str, dict]] = [
    ("muonq, paper order (compand, then scale)", "muonq", {}),
    ("muonq, scale first (absmax, then mu-law)", "muonq", _AFTER_SCALE),
    ("muonq + residual b128, paper order", "muonq-block128", {}),
    ("muonq + residual b128, scale first", "muonq-block128", _AFTER_SCALE),
    ("muonq mu 1000, paper order", "muonq", {"mu": 1000.0}),
    ("muonq mu 1000 + residual b128, paper order", "muonq-block128", {"mu": 1000.0}),
    ("muonq mu 4000, paper order", "muonq", {"mu": 4000.0}),
    ("muonq mu 4000 + residual b128, paper order", "muonq-block128", {"mu": 4000.0}),
    ("muonq mu 15, scale first", "muonq", {**_AFTER_SCALE, "mu": 15.0}),
    ("muonq mu 15 + residual b128, scale first", "muonq-block128", {**_AFTER_SCALE, "mu": 15.0}),
    ("muonq mu 7 + residual b128, scale first", "muonq-block128", {**_AFTER_SCALE, "mu": 7.0}),
    ("muonq linear (compand off)", "muonq", {"compand": False}),
    ("muonq linear + residual b128", "muonq-block128", {"compand": False}),
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


def synthetic_gradients(shape: tuple[int, int], steps: int, seed: int, rank: int = 8, df: float = 3.0,
                        drift: float = 0.05) -> Iterator[torch.Tensor]:
    """A rank-8 signal (singular values 1 ... 0.1) whose left factor drifts by ``drift`` per step,
    plus fresh Student-t(3) noise of twice its Frobenius norm, at a gradient-like scale (1e-2)."""
    rows, cols = shape
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(rows, rank, generator=g)
    v, _ = torch.linalg.qr(torch.randn(cols, rank, generator=g))
    s = torch.logspace(0, -1, rank)
    student = torch.distributions.StudentT(torch.tensor(df))
    torch.manual_seed(seed)
    for _ in range(steps):
        u = u + drift * torch.randn(rows, rank, generator=g)
        q, _ = torch.linalg.qr(u)
        signal = (q * s) @ v.T
        noise = student.sample(shape)
        yield 1e-2 * (signal / signal.norm() + 2.0 * noise / noise.norm())


def ns(matrix: torch.Tensor) -> torch.Tensor:
    return zeropower_via_newtonschulz(matrix, 5, dtype=torch.float32)


def ns_error(approx: torch.Tensor, reference_ns: torch.Tensor) -> float:
    return ((ns(approx) - reference_ns).norm() / reference_ns.norm()).item()


def bytes_per_element(variant: str, overrides: dict, shapes: Iterable[tuple[tuple[int, int], int]]) -> float:
    """Exact state bytes per element over ``shapes`` ((shape, count) pairs), from the real stores."""
    select = store_selector(preset(variant, **overrides).muon.store, kernels="reference")
    shapes = list(shapes)
    total = sum(momentum_nbytes(select, shape) * count for shape, count in shapes)
    return total / sum(math.prod(shape) * count for shape, count in shapes)


# -- one matrix -------------------------------------------------------------------------------------


def measure(matrix: torch.Tensor, variant: str, overrides: dict, warm_saves: int) -> dict[str, float | str]:
    select = store_selector(preset(variant, **overrides).muon.store, kernels="reference")
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
            result["NS err cold"] = ns_error(store.load(state), reference)
    b_hat = store.load(state)
    result["rel err"] = ((b_hat - matrix).norm() / matrix.norm()).item()
    result["NS err"] = ns_error(b_hat, reference)
    result["note"] = ""
    return result


def report(name: str, matrix: torch.Tensor, rows: list, warm_saves: int, *, quiet: bool = False) -> dict[str, dict]:
    results = {}
    if not quiet:
        print(f"\n#### {name} ({matrix.shape[0]} x {matrix.shape[1]})\n")
        print("| variant | B/elem | rel err | NS err cold | NS err |")
        print("|---|---:|---:|---:|---:|")
    for label, variant, overrides in rows:
        if label in STREAM_ONLY:
            continue
        r = results[label] = measure(matrix, variant, overrides, warm_saves)
        if not quiet:
            note = f" ({r['note']})" if r["note"] else ""
            print(f"| {label}{note} | {r['B/elem']:.4f} | {r['rel err']:.3f} | {r['NS err cold']:.3f} | {r['NS err']:.3f} |")
    return results


def summary(title: str, per_matrix: dict[str, dict[str, dict]], rows: list) -> None:
    """Mean (and range) over matrices of each variant's single-matrix errors."""
    names = list(per_matrix)
    print(f"\n#### {title}: mean over {len(names)} matrices ({', '.join(names)})\n")
    print("| variant | B/elem llama-60m | rel err | NS err cold | NS err | NS err min-max |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, variant, overrides in rows:
        if label in STREAM_ONLY:
            continue
        rs = [per_matrix[n][label] for n in names]
        ns_errs = [r["NS err"] for r in rs]
        print(
            f"| {label} | {bytes_per_element(variant, overrides, LLAMA_60M):.4f} "
            f"| {statistics.mean(r['rel err'] for r in rs):.3f} | {statistics.mean(r['NS err cold'] for r in rs):.3f} "
            f"| {statistics.mean(ns_errs):.3f} | {min(ns_errs):.3f}-{max(ns_errs):.3f} |"
        )


# -- a stream of steps ------------------------------------------------------------------------------


def trajectory(store, grads: Iterable[torch.Tensor], *, beta: float, normalize: bool, start: torch.Tensor | None,
               warm_saves: int, like: torch.Tensor) -> Iterator[torch.Tensor]:
    """The NS inputs a Muon step would compute with ``store`` (the engine's own arithmetic:
    G / ||G|| if ``normalize``, then ``store.accumulate``)."""
    state: dict[str, torch.Tensor] = {}
    store.init(state, like)
    if start is not None:
        start = start / start.norm().clamp_min(1e-30) if normalize else start
        for _ in range(warm_saves if not isinstance(store, FullPrecisionStore) else 1):
            store.save(state, start)
    for grad in grads:
        grad = grad.float()
        if normalize:
            grad = grad / grad.norm().clamp_min(1e-7)
        yield store.accumulate(state, grad, beta=beta, ema=False, renormalize=normalize).clone()


CHECKPOINTS = (1, 10, 25)
EVERY = 5  # the mean over the stream samples every 5th step (and the checkpoints)


def stream_errors(grads: list[torch.Tensor], rows: list, *, beta: float, start: torch.Tensor | None,
                  warm_saves: int) -> dict[str, dict[str, float]]:
    """NS err at a few steps, at the last step, and its mean over the stream, per variant."""
    like = grads[0]
    steps = len(grads)
    measured = sorted({t for t in CHECKPOINTS if t <= steps} | set(range(EVERY, steps + 1, EVERY)) | {steps})
    references: dict[bool, dict[int, torch.Tensor]] = {}
    for normalize in (False, True):
        inputs = trajectory(FullPrecisionStore(), grads, beta=beta, normalize=normalize, start=start, warm_saves=1, like=like)
        references[normalize] = {t: ns(u) for t, u in enumerate(inputs, start=1) if t in measured}
    out = {}
    for label, variant, overrides in rows:
        args = preset(variant, **overrides).muon
        store = store_selector(args.store, kernels="reference")(like)
        if isinstance(store, FullPrecisionStore):
            continue
        inputs = trajectory(store, grads, beta=beta, normalize=args.normalize, start=start, warm_saves=warm_saves, like=like)
        errors = {t: ns_error(u, references[args.normalize][t]) for t, u in enumerate(inputs, start=1) if t in measured}
        out[label] = {**{f"step {t}": errors[t] for t in CHECKPOINTS if t <= steps},
                      f"step {steps}": errors[steps], "mean": statistics.mean(errors.values())}
    return out


def stream_table(title: str, per_matrix: dict[str, dict[str, dict[str, float]]], rows: list) -> None:
    names = list(per_matrix)
    first = next(iter(per_matrix.values()))
    columns = list(next(iter(first.values())))
    print(f"\n#### {title}: NS err of the NS input along the stream, mean over {len(names)} matrices ({', '.join(names)})\n")
    print("| variant | B/elem llama-60m | " + " | ".join(columns) + " | last step min-max |")
    print("|---|---:|" + "---:|" * len(columns) + "---:|")
    last = columns[-2]
    for label, variant, overrides in rows:
        if label not in first:
            continue
        cells = [statistics.mean(per_matrix[n][label][c] for n in names) for c in columns]
        lasts = [per_matrix[n][label][last] for n in names]
        print(f"| {label} | {bytes_per_element(variant, overrides, LLAMA_60M):.4f} | "
              + " | ".join(f"{c:.3f}" for c in cells) + f" | {min(lasts):.3f}-{max(lasts):.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captured", help="torch.save'd dict name -> momentum tensor")
    parser.add_argument("--stream", help="captured gradient stream (capture_momentum.py --stream-out)")
    parser.add_argument("--synthetic-stream", type=int, default=50, help="steps of the synthetic stream (0: skip)")
    parser.add_argument("--candidates", action="store_true", help="add the 'beating the paper' candidates")
    parser.add_argument("--orders", action="store_true", help="only the rows comparing where mu-law sits")
    parser.add_argument("--hifi", action="store_true", help="only muonq-hifi, its ablations and rivals")
    parser.add_argument("--summary", action="store_true", help="print only the summary tables (no per-matrix tables)")
    parser.add_argument("--no-synthetic", action="store_true", help="skip the single synthetic matrices")
    parser.add_argument("--warm-saves", type=int, default=8, help="saves before measuring (>= 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.warm_saves < 1:
        parser.error("--warm-saves must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.orders and args.hifi:
        parser.error("--orders and --hifi each choose the rows; give one")
    rows = ORDERS if args.orders else HIFI if args.hifi else ROWS + (CANDIDATES if args.candidates else [])
    t0 = time.perf_counter()
    print(f"warm saves: {args.warm_saves}; NS: 5 quintic steps in fp32; matrices normalised to unit Frobenius norm; "
          "B/elem llama-60m: exact state bytes per element over llama-60m's hidden matrices")
    if not args.no_synthetic:
        synth = {}
        for i, shape in enumerate(SHAPES):
            name = f"{shape[0]}x{shape[1]}"
            synth[name] = report(f"synthetic rank-8 + Student-t(3), seed {args.seed + i}", synthetic(shape, args.seed + i),
                                 rows, args.warm_saves, quiet=args.summary)
        summary("synthetic rank-8 + Student-t(3)", synth, rows)
    if args.captured:
        captured = torch.load(args.captured, weights_only=True, map_location="cpu")
        min_numel = preset("muon8bit").muon.store.min_numel
        per_matrix = {}
        for name, tensor in captured.items():
            if tensor.ndim != 2 or tensor.numel() < min_numel:
                print(f"\nskipped captured {name} {tuple(tensor.shape)}: not a matrix of >= {min_numel} elements")
                continue
            matrix = tensor.float()
            per_matrix[name] = report(f"captured {name}", matrix / matrix.norm().clamp_min(1e-30), rows, args.warm_saves,
                                      quiet=args.summary)
        if per_matrix:
            summary(f"captured momentum ({args.captured})", per_matrix, rows)
    if args.synthetic_stream:
        per_shape = {}
        for i, shape in enumerate(STREAM_SHAPES):
            grads = list(synthetic_gradients(shape, args.synthetic_stream, seed=args.seed + 100 + i))
            per_shape[f"{shape[0]}x{shape[1]}"] = stream_errors(grads, rows, beta=0.95, start=None, warm_saves=args.warm_saves)
        stream_table(f"synthetic gradient stream, {args.synthetic_stream} steps from zero momentum", per_shape, rows)
    if args.stream:
        data = torch.load(args.stream, weights_only=True, map_location="cpu")
        beta = float(data.get("momentum", 0.95))
        per_matrix = {}
        for name, grads in data["grads"].items():
            start, final = data["start"][name].float(), data["final"][name].float()
            grads = list(grads.float().unbind(0))
            replay = start.clone()
            for g in grads:
                replay.mul_(beta).add_(g)
            drift = ((replay - final).norm() / final.norm()).item()
            if drift > 1e-5:
                print(f"warning: replaying {name}'s gradients misses the captured final momentum by {drift:.2e}")
            per_matrix[name] = stream_errors(grads, rows, beta=beta, start=start, warm_saves=args.warm_saves)
        meta = data.get("meta", {})
        stream_table(f"captured gradient stream, last {len(grads)} of {meta.get('steps', '?')} steps "
                     f"(from the fp32 momentum at step {meta.get('steps', 0) - len(grads)})", per_matrix, rows)
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
