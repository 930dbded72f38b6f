"""Fused quantized-momentum kernels and Muon step time.

(a) The momentum update of each codec as a Muon step runs it (``store.ns_input``: decode,
    B <- beta B + G, optional renormalization, requantize, and Newton–Schulz's input U written in
    NS's dtype, bf16 on a GPU) on the hidden-matrix shapes of a recipe: median time, GB/s of the
    bytes the fused launches read and write, and that rate over the device's copy bandwidth (a
    large ``Tensor.copy_``, bytes read + written). Target on a GPU: >= 80%. "Moved" bytes count
    every pass (two-pass codecs write and re-read the fp32 B); "min" bytes are what any
    implementation must touch (codes and scales read and written, G read, U written), so min GB/s
    is the end-to-end rate.
(b) One Muon step over one transformer layer's hidden matrices (q, k, v, o, gate, up, down) for
    muon8bit, muonq and grasp, divided by fp32 Muon's step. Target on a GPU: <= 1.15. The rows
    "ns batch 4" stack the four attention matrices (and gate/up) into batched NS calls
    (``optimizer_params.args.ns_batch_size``), to decide where batching pays.
(c) Where MuonQ's extra step time goes: its power iteration over the same layer (two thin matmuls
    and a thin QR of each m x k product, k = min(m, n) // rank), the thin QR alone
    (``torch.linalg.qr``), and a candidate replacement timed on the same inputs: Cholesky-QR2
    (Gram matrix, Cholesky in fp64, triangular solve; twice), per matrix and batched by shape,
    with its worst orthogonality error max|P^T P - I|. Times are also given over fp32 Muon's step
    from (b), to show whether the QR is what stands between MuonQ and the 1.15 target.

On CUDA this uses ``kernels=auto`` (the Triton kernels) at llama-350m and llama-1b sizes; on a CPU
it runs the PyTorch reference at llama-60m sizes, which says nothing about the GPU targets.
Timing: warmup, then the median of repeats: CUDA events on a GPU; on a CPU, the process's CPU time
with one torch thread, so that other jobs on a shared machine do not distort the ratios.

    python benchmarks/bench_kernels.py [--recipes llama-350m llama-1b] [--repeats 20]
"""

from __future__ import annotations

import argparse
import datetime
import math
import statistics
import time
from collections.abc import Callable

import torch

from muonq.optim.build import build_muon
from muonq.optim.codecs import QuantCodec, make_codec
from muonq.optim.precision import fast_matmul_dtype
from muonq.optim.stores import QuantizedStore
from muonq.optim.subspace import power_iteration_step
from muonq.config import preset

RECIPES: dict[str, tuple[int, int]] = {  # hidden, SwiGLU width
    "llama-60m": (512, 1376),
    "llama-350m": (1024, 2736),
    "llama-1b": (2048, 5461),
}

# (label, codec, renormalize): the store codecs of the variants and MuonQ's / GRASP's residual codecs
PASSES: list[tuple[str, QuantCodec, bool]] = [
    ("muon8bit: 8-bit linear, block 256", make_codec(8, "linear", "block", block_size=256), False),
    ("muon8bit: 8-bit dynamic, block 256", make_codec(8, "dynamic", "block", block_size=256), False),
    ("muon8: 8-bit linear, tensor", make_codec(8, "linear", "tensor"), False),
    ("muon4: 4-bit linear, tensor", make_codec(4, "linear", "tensor"), False),
    ("muonq residual: 4-bit mu-law on raw values, tensor, renorm", make_codec(4, "linear", "tensor", compand=True), True),
    ("muonq-block128 residual: 4-bit mu-law on raw values, block 128, renorm",
     make_codec(4, "linear", "block", block_size=128, compand=True), True),
    ("grasp residual: 4-bit linear, grid 128", make_codec(4, "linear", "grid", tile_size=128), False),
]
# (label, variant, ns_batch_size)
STEP_VARIANTS = [("muon", "muon", 1), ("muon8bit", "muon8bit", 1), ("muonq", "muonq", 1), ("grasp", "grasp", 1),
                 ("muon, ns batch 4", "muon", 4), ("muonq, ns batch 4", "muonq", 4)]


def layer_shapes(hidden: int, ffn: int) -> list[tuple[int, int]]:
    return [(hidden, hidden)] * 4 + [(ffn, hidden)] * 2 + [(hidden, ffn)]


def seconds_once(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def median_seconds(fn: Callable[[], object], *, device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(seconds_once(fn, device) for _ in range(repeats))


def copy_bandwidth(device: torch.device, numel: int, repeats: int) -> float:
    """Bytes per second of ``dst.copy_(src)`` (read + write) on fp32 tensors of ``numel`` elements."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), device=device, warmup=3, repeats=repeats)
    return 2 * src.nbytes / seconds


def traffic(codec: QuantCodec, shape: tuple[int, int], renormalize: bool, ns_bytes: int) -> tuple[int, int]:
    """(minimal bytes, bytes the fused launches move) of one momentum update of ``shape`` whose NS
    input has ``ns_bytes`` per element.

    Block and grid scales requantize in the update pass, which writes only U, unless renormalizing;
    otherwise the update pass writes the fp32 B and a second pass re-reads it, requantizes and
    writes U (for an fp32 U without renormalization, U is that B: no second write). 4-bit codes
    whose groups start at odd elements go through a one-byte-per-code scratch buffer packed by three
    torch ops (4 more bytes/element).
    """
    numel = math.prod(shape)
    state = codec.nbytes(shape)
    minimal = 2 * state + 4 * numel + ns_bytes * numel  # codes+scales read and written, G read, U written
    one_pass = codec.granularity in ("block", "grid") and not renormalize
    if one_pass:
        moved = minimal
    elif ns_bytes == 4 and not renormalize:
        moved = minimal + 4 * numel  # B re-read
    else:
        moved = minimal + 8 * numel  # B written, then re-read
    odd = {"block": codec.block_size, "grid": shape[1]}.get(codec.granularity, 2) % 2
    if codec.bits == 4 and odd:
        moved += 4 * numel
    return minimal, moved


def update_rows(recipe: str, device: torch.device, kernels: str, copy_bps: float, args) -> list[str]:
    hidden, ffn = RECIPES[recipe]
    rows = []
    for label, codec, renormalize in PASSES:
        for shape in sorted(set(layer_shapes(hidden, ffn))):
            store = QuantizedStore(codec, shape, kernels=kernels)
            state: dict[str, torch.Tensor] = {}
            store.init(state, torch.empty(shape, device=device))
            grad = torch.randn(shape, device=device)
            fused = store.kernels.applies(grad)
            ns_dtype = fast_matmul_dtype(device)  # as Muon picks it
            seconds = median_seconds(
                lambda: store.ns_input(state, grad, beta=0.95, ema=False, renormalize=renormalize, nesterov=False,
                                       dtype=ns_dtype),
                device=device, warmup=args.warmup, repeats=args.repeats,
            )
            minimal, moved = traffic(codec, shape, renormalize, ns_dtype.itemsize)
            moved_cell = f"{moved / seconds / 1e9:.1f} | {moved / seconds / copy_bps:.0%}" if fused else "- | -"
            rows.append(
                f"| {recipe} | {shape[0]}x{shape[1]} | {label} | {'triton' if fused else 'reference'} | "
                f"{seconds * 1e6:,.0f} | {moved_cell} | {minimal / seconds / 1e9:.1f} | {minimal / seconds / copy_bps:.0%} |"
            )
    return rows


def step_rows(recipe: str, device: torch.device, kernels: str, args) -> list[str]:
    """Steps of all variants interleaved, so drifting machine load affects them alike."""
    hidden, ffn = RECIPES[recipe]
    shapes = layer_shapes(hidden, ffn)
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(s, generator=generator) * 0.02 for s in shapes]
    grads = [torch.randn(s, generator=generator).to(device) for s in shapes]
    optimizers = {}
    for label, variant, ns_batch_size in STEP_VARIANTS:
        params = [torch.nn.Parameter(w.to(device)) for w in weights]
        for p, g in zip(params, grads):
            p.grad = g
        optimizers[label] = build_muon(preset(variant, ns_batch_size=ns_batch_size).muon, params, kernels=kernels)
    times: dict[str, list[float]] = {label: [] for label in optimizers}
    for repeat in range(args.warmup + args.repeats):
        for label, opt in optimizers.items():
            seconds = seconds_once(opt.step, device)
            if repeat >= args.warmup:
                times[label].append(seconds)
    median = {label: statistics.median(t) for label, t in times.items()}
    return [f"| {recipe} | {label} | {median[label] * 1e3:,.2f} | {median[label] / median['muon']:.3f} |"
            for label in optimizers], median["muon"]


def cholesky_qr2(y: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning those of ``y`` (..., m, k): Cholesky-QR twice, the k x k Cholesky
    in fp64 without an error check (no host sync). A candidate for the power iteration's thin QR; to
    replace it, a rank-deficient y (a zero momentum) would need a shift of the Gram matrix, which
    Householder QR does not."""
    y = y / y.norm(dim=-2, keepdim=True).clamp_min(1e-30)
    for _ in range(2):
        factor = torch.linalg.cholesky_ex((y.mT @ y).double()).L.to(y.dtype)
        y = torch.linalg.solve_triangular(factor, y.mT, upper=False).mT
    return y


def subspace_rows(recipe: str, device: torch.device, muon_step_s: float, args) -> list[str]:
    hidden, ffn = RECIPES[recipe]
    shapes = layer_shapes(hidden, ffn)
    rank_divisor = preset("muonq").muon.store.rank_divisor
    generator = torch.Generator().manual_seed(0)
    matrices = [torch.randn(s, generator=generator).to(device) for s in shapes]
    bases = [torch.randn(s[1], min(s) // rank_divisor, generator=generator).to(device) for s in shapes]
    products = [(m.to(fast_matmul_dtype(device)) @ b.to(fast_matmul_dtype(device))).float()
                for m, b in zip(matrices, bases)]
    by_shape: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for y in products:
        by_shape.setdefault(tuple(y.shape), []).append(y)
    stacks = [torch.stack(ys) for ys in by_shape.values()]
    error = max((q.mT @ q - torch.eye(q.shape[-1], device=device)).abs().max().item()
                for q in (cholesky_qr2(y) for y in stacks))
    timed = {
        "power iteration (2 matmuls + QR)": lambda: [power_iteration_step(m, b) for m, b in zip(matrices, bases)],
        "thin QR alone (torch.linalg.qr)": lambda: [torch.linalg.qr(y, mode="reduced") for y in products],
        "Cholesky-QR2, per matrix": lambda: [cholesky_qr2(y) for y in products],
        "Cholesky-QR2, batched by shape": lambda: [cholesky_qr2(y) for y in stacks],
    }
    rows = []
    for label, fn in timed.items():
        seconds = median_seconds(fn, device=device, warmup=args.warmup, repeats=args.repeats)
        note = f" (max abs P^T P - I: {error:.1e})" if label.startswith("Cholesky") else ""
        rows.append(f"| {recipe} | {label}{note} | {seconds * 1e3:,.3f} | {seconds / muon_step_s:.3f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=None,
                        help="default: llama-350m llama-1b on CUDA, llama-60m on CPU")
    parser.add_argument("--repeats", type=int, default=None, help="default: 20 on CUDA, 9 on CPU")
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    args.recipes = args.recipes or (["llama-350m", "llama-1b"] if cuda else ["llama-60m"])
    args.repeats = args.repeats or (20 if cuda else 9)
    kernels = "auto"  # Triton on CUDA, the reference on CPU
    if not cuda:
        torch.set_num_threads(1)

    name = torch.cuda.get_device_name() if cuda else "CPU, 1 thread, CPU time"
    print(f"{datetime.date.today()} · {name} · torch {torch.__version__} · kernels={kernels}")
    if not cuda:
        print("\nNo GPU: the PyTorch reference path at small sizes. GPU numbers (Triton kernels, llama-350m and "
              "llama-1b shapes, targets >= 80% of copy bandwidth and <= 1.15x fp32 Muon) are pending.")
    copy_bps = copy_bandwidth(device, (256 if cuda else 32) * 2**20, args.repeats)
    print(f"\ncopy bandwidth (read + write): {copy_bps / 1e9:.1f} GB/s\n")
    print("(a) momentum update: decode, B <- 0.95 B + G, [B / ||B||], requantize, U in NS's dtype\n")
    print("| recipe | shape | codec | path | time (us) | moved GB/s | of copy | min GB/s | of copy |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|")
    for recipe in args.recipes:
        print("\n".join(update_rows(recipe, device, kernels, copy_bps, args)))
    print("\n(b) Muon step over one layer's hidden matrices, relative to fp32 Muon\n")
    print("| recipe | variant | step (ms) | / muon |")
    print("|---|---|---:|---:|")
    muon_step_s = {}
    for recipe in args.recipes:
        rows, muon_step_s[recipe] = step_rows(recipe, device, kernels, args)
        print("\n".join(rows))
    print(f"\n(c) MuonQ's power iteration over one layer (rank min(m, n) // {preset('muonq').muon.store.rank_divisor}), "
          "relative to fp32 Muon's step in (b)\n")
    print("| recipe | work | time (ms) | / muon step |")
    print("|---|---|---:|---:|")
    for recipe in args.recipes:
        print("\n".join(subspace_rows(recipe, device, muon_step_s[recipe], args)))


if __name__ == "__main__":
    main()
