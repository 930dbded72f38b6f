"""Optimizer step time on CPU of every Muon variant, relative to fp32 Muon, on the same matrices.

The matrices are the hidden matrices of one llama-60m layer (q, k, v, o: 512 x 512; gate, up:
1376 x 512; down: 512 x 1376; 3.16M elements). Each optimizer is built the way training builds it
(``muonq.optim.build.build_optimizer`` from its YAML in hydra_conf/optimizer_params/), over its own
copy of the weights, with fixed random gradients. After warm-up steps, the optimizers are stepped
in rounds, one step of each per round in a shuffled order (so load changes on a shared machine hit
all of them alike), and the median step time of each is reported with its ratio to fp32 Muon's
median: wall-clock time, and the process's CPU time, which other jobs on a shared machine inflate
far less (with one torch thread, the default, CPU time is the step's compute time).
Newton–Schulz and the power iteration run in the dtype ``optimizer_params.args.matmul_dtype=auto``
picks on this machine (bf16 where the CPU multiplies bf16 natively, fp32 where it emulates it);
the header says which. ``torch.optim.Muon`` runs in the same round, like for like with the row
above it: the same matrices and gradients, the EMA momentum, AdamW-matched scale, no Nesterov,
and bf16 Newton–Schulz (torch's is always bf16, so that project row pins matmul_dtype=bfloat16).
Two rows pin ``matmul_dtype=float32`` (the other choice, to see what auto buys), and the rows
"PyTorch codecs (kernels=reference)" run muonq, muonq-hifi and grasp without the 4-bit codecs' C
loops (to see what those buy; the header says whether they were built). AdamW rows are for
reference (they run no Newton–Schulz).

    python benchmarks/bench_step_time.py [--rounds 15] [--threads 1] [--only "muonq-hifi,grasp"] [--profile 5] [--phases 20]

``--profile N`` then steps each optimizer N more times under ``torch.profiler`` and prints, per
optimizer, the operators that take the most CPU time per step (self time: an operator's own work,
not that of the operators it calls), to see where a variant's extra time goes. ``--phases N``
steps each of the project's Muon optimizers N more times with a timer around each phase of the
step (the momentum's update through its store, Newton–Schulz, applying the update) and, inside the
store, around the codecs' encodes and decodes and the power iteration: median milliseconds per
step, in place, without the profiler's per-operator cost.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import platform
import random
import statistics
import time

import torch

from muonq.config import VARIANTS, preset
from muonq.optim import stores
from muonq.optim.build import build_optimizer
from muonq.optim.codecs import native
from muonq.optim.codecs.quant import QuantCodec
from muonq.optim.muon import Muon
from muonq.optim.precision import cpu_bf16, describe_matmul_dtype

LIKE_TORCH = "muon in torch.optim.Muon's form (EMA; bf16 NS)"
TORCH = "torch.optim.Muon (bf16 NS)"
# (label, optimizer YAML, overrides of optimizer_params.args; "kernels": of optimizer_params.kernels);
# labels without commas, so that --only can name them
ROWS: list[tuple[str, str, dict]] = [
    ("muon (fp32)", "muon", {}),
    ("muon + MuonQ's normalisation (fp32)", "muon", {"norm": True}),
    ("muon8bit linear b256", "muon8bit", {}),
    ("muon8bit dynamic b256", "muon8bit", {"quant": "dynamic"}),
    ("muon8 (per-tensor 8-bit)", "muon8", {}),
    ("muon4 (per-tensor 4-bit)", "muon4", {}),
    ("muonq (default)", "muonq", {}),
    ("muonq with PyTorch codecs (kernels=reference)", "muonq", {"kernels": "reference"}),
    ("muonq-hifi", "muonq-hifi", {}),
    ("muonq-hifi with PyTorch codecs (kernels=reference)", "muonq-hifi", {"kernels": "reference"}),
    ("muonq + residual b128", *VARIANTS["muonq-block128"]),
    ("muonq mu 15 + residual b128", "muonq", {"mu": 15.0, "residual_block_size": 128}),
    ("muonq mu 15 rank/32 + residual b256", "muonq", {"mu": 15.0, "rank": 32, "residual_block_size": 256}),
    ("grasp", "grasp", {}),
    ("grasp with PyTorch codecs (kernels=reference)", "grasp", {"kernels": "reference"}),
    ("muoneq (row; fp32 momentum)", "muoneq", {}),
    ("muon with matmul_dtype=float32", "muon", {"matmul_dtype": "float32"}),
    ("muonq with matmul_dtype=float32", "muonq", {"matmul_dtype": "float32"}),
    (LIKE_TORCH, "muon", {"momentum_form": "ema", "matmul_dtype": "bfloat16"}),
    (TORCH, "torch", {}),
    ("adamw (reference)", "adamw", {}),
    ("adamw8bit from torchao (reference)", "adamw8bit", {}),
]
assert not any("," in label for label, _, _ in ROWS), "--only splits its argument at commas"

LAYER = [(512, 512)] * 4 + [(1376, 512)] * 2 + [(512, 1376)]


def make(yaml_name: str, overrides: dict, weights: list[torch.Tensor], grads: list[torch.Tensor]):
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    if yaml_name == "torch":  # the hyper-parameters of muon.yaml (lr, decay, momentum), in torch's Muon
        spec = preset("muon").muon
        return torch.optim.Muon(params, lr=spec.lr, weight_decay=spec.weight_decay, momentum=spec.momentum,
                                nesterov=False, adjust_lr_fn=spec.scale_mode)
    args = {key: value for key, value in overrides.items() if key != "kernels"}
    spec = dataclasses.replace(preset(yaml_name, **args), kernels=overrides.get("kernels", "auto"))
    return build_optimizer(spec, hidden=params, others=[])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="timed steps of each optimizer")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each optimizer first")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default="", help="comma-separated row labels to run with fp32 Muon (default: all)")
    parser.add_argument("--profile", type=int, default=0, help="profiled steps of each optimizer after the timing (0: none)")
    parser.add_argument("--top", type=int, default=12, help="operators listed per optimizer with --profile")
    parser.add_argument("--phases", type=int, default=0,
                        help="steps of each Muon optimizer timed phase by phase after the timing (0: none)")
    args = parser.parse_args()
    only = [label.strip() for label in args.only.split(",") if label.strip()]
    unknown = sorted(set(only) - {label for label, _, _ in ROWS})
    if unknown:
        parser.error(f"--only: no row {', '.join(map(repr, unknown))}; rows: {', '.join(label for label, _, _ in ROWS)}")
    rows = [row for row in ROWS if not only or row[0] == ROWS[0][0] or row[0] in only]
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    weights = [torch.randn(shape, generator=gen) * 0.02 for shape in LAYER]
    grads = [torch.randn(shape, generator=gen) * 1e-3 for shape in LAYER]
    opts = {label: make(yaml_name, overrides, weights, grads) for label, yaml_name, overrides in rows}
    for opt in opts.values():
        for _ in range(args.warmup):
            opt.step()
    times: dict[str, list[float]] = {label: [] for label in opts}
    cpu: dict[str, list[float]] = {label: [] for label in opts}
    order = list(opts)
    rng = random.Random(args.seed)
    t0 = time.perf_counter()
    for _ in range(args.rounds):
        rng.shuffle(order)
        for label in order:
            start, start_cpu = time.perf_counter(), time.process_time()
            opts[label].step()
            times[label].append(time.perf_counter() - start)
            cpu[label].append(time.process_time() - start_cpu)
    wall = time.perf_counter() - t0

    numel = sum(w.numel() for w in weights)
    try:
        load = " · load average %.1f %.1f %.1f" % tuple(__import__("os").getloadavg())
    except OSError:
        load = ""
    chip = cpu_bf16()
    print(f"{chip.model or platform.processor() or platform.machine()}: bf16 matmuls "
          f"{'native' if chip.native else 'emulated'} ({chip.reason}); {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}{load}")
    print(describe_matmul_dtype("auto", "cpu"))
    print("4-bit codecs: C loops (kernels=auto)" if native.available() else
          "4-bit codecs: PyTorch only (the C loops could not be built)")
    print(f"one llama-60m layer: {len(LAYER)} matrices, {numel / 1e6:.2f}M elements; {args.rounds} rounds after "
          f"{args.warmup} warm-up steps, shuffled order per round; {wall:.0f} s\n")
    base = statistics.median(times[ROWS[0][0]])
    base_cpu = statistics.median(cpu[ROWS[0][0]])
    print("| optimizer | wall ms (median) | wall min-max | vs fp32 Muon (wall) | CPU ms (median) | vs fp32 Muon (CPU) | CPU overhead ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label in times:
        t, c = times[label], cpu[label]
        med, med_cpu = statistics.median(t), statistics.median(c)
        print(f"| {label} | {1e3 * med:.1f} | {1e3 * min(t):.0f}-{1e3 * max(t):.0f} | {med / base:.2f}x "
              f"| {1e3 * med_cpu:.1f} | {med_cpu / base_cpu:.2f}x | {1e3 * (med_cpu - base_cpu):+.1f} |")
    if LIKE_TORCH in times and TORCH in times:
        ours, theirs = statistics.median(times[LIKE_TORCH]), statistics.median(times[TORCH])
        ours_cpu, theirs_cpu = statistics.median(cpu[LIKE_TORCH]), statistics.median(cpu[TORCH])
        print(f"\nlike for like: the project's Muon / torch.optim.Muon = {ours / theirs:.3f}x wall, "
              f"{ours_cpu / theirs_cpu:.3f}x CPU")
    if args.phases:
        print_phases(opts, args.phases)
    if args.profile:
        for label, opt in opts.items():
            print_profile(label, opt, args.profile, args.top)


# Timed phases of a step (label: the function timed); the last three run inside the first.
PHASES = {
    "momentum in (store)": (Muon, "_ns_input"),
    "Newton–Schulz": (Muon, "_orthogonalize"),
    "apply": (Muon, "_apply"),
    "codec decodes": (QuantCodec, "decode"),
    "codec encodes": (QuantCodec, "encode"),
    "power iteration": (stores, "power_iteration_step"),
}


@contextlib.contextmanager
def phase_timers(totals: dict[str, float]):
    """Every function of :data:`PHASES` wrapped, while inside, to add its wall time to ``totals``."""
    originals = {label: getattr(owner, name) for label, (owner, name) in PHASES.items()}

    def timed(label: str, function):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                totals[label] += time.perf_counter() - start
        return wrapper

    for label, (owner, name) in PHASES.items():
        setattr(owner, name, timed(label, originals[label]))
    try:
        yield
    finally:
        for label, (owner, name) in PHASES.items():
            setattr(owner, name, originals[label])


def print_phases(opts: dict, steps: int) -> None:
    """Median ms per step of each phase, over ``steps`` steps of each project Muon optimizer."""
    print(f"\nphases of the step (median ms over {steps} steps; the last three are inside \"momentum in\")")
    print("| optimizer | step | " + " | ".join(PHASES) + " |")
    print("|---|" + "---:|" * (len(PHASES) + 1))
    for label, opt in opts.items():
        if not isinstance(getattr(opt, "optimizers", {}).get("muon"), Muon):
            continue  # torch.optim.Muon and the AdamW rows
        per_step: dict[str, list[float]] = collections.defaultdict(list)
        for _ in range(steps):
            totals: dict[str, float] = collections.defaultdict(float)
            with phase_timers(totals):
                start = time.perf_counter()
                opt.step()
                totals["step"] = time.perf_counter() - start
            for phase in ("step", *PHASES):
                per_step[phase].append(totals[phase])
        cells = " | ".join(f"{1e3 * statistics.median(per_step[phase]):.1f}" for phase in ("step", *PHASES))
        print(f"| {label} | {cells} |")


def print_profile(label: str, opt, steps: int, top: int) -> None:
    """The ``top`` operators by self CPU time per step over ``steps`` profiled steps of ``opt``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            opt.step()
    events = [e for e in prof.key_averages() if e.key != "ProfilerStep*" and not e.key.startswith("Optimizer.step")]
    total = sum(e.self_cpu_time_total for e in events) / steps / 1e3
    print(f"\n{label}: {total:.1f} ms of operators per step (profiled; the profiler adds its own cost)")
    print("| operator | self CPU ms per step | calls per step |")
    print("|---|---:|---:|")
    for e in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]:
        print(f"| {e.key} | {e.self_cpu_time_total / steps / 1e3:.2f} | {e.count / steps:.0f} |")

if __name__ == "__main__":
    main()
