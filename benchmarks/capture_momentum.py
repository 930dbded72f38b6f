"""Capture real Muon momentum (and the gradient stream that built it) from a short fp32-Muon run.

Trains a LLaMA (llama-tiny's layout, widened to ``--n-embd``) on the embedded Shakespeare corpus
with fp32 Muon, the trainer's way (warm-up-cosine schedule, global grad-norm clip 1.0, AdamW on
embeddings/head/norms), and writes

- ``--out`` (small, meant to be kept): {matrix name: B / ||B||_F} at the last step, the momentum
  of a handful of hidden matrices as MuonQ would see it (fp32, or fp16 with ``--save-dtype``).
  Read by ``bench_fidelity.py --captured``.
- ``--stream-out`` (large cache, not for git): for the same matrices, the momentum B at step
  T - K (``start``), the K clipped gradients of steps T - K + 1 ... T (``grads``, K x m x n) and the
  final momentum (``final``). Replaying B <- mu B + G over ``grads`` from ``start`` gives ``final``
  exactly; ``bench_fidelity.py --stream`` feeds the same gradients to every quantized store.

Needs the prepared corpus (``python process_data.py`` writes ./data/tiny_shakespeare-bpe-8192).

    python benchmarks/capture_momentum.py [--steps 300] [--n-embd 256] [--stream 50]

The two committed captures (one torch thread). Newton–Schulz runs in fp32 on every CPU. A rerun
gives other matrices of the same kind wherever the fp32 kernels or the training code differ from
the committed file's run: the 256-wide file came back bit-identical on an AVX512 Zen 5
(2026-12-01), an AVX2 Zen 3 gave other matrices (2026-12-03: muonq's NS err on them 0.632 against
the committed file's 0.630), and so did the Zen 5 with the code of 2026-12-06 (largest entry
difference 0.11; the fidelity tables say which stream they used). The stream cache is written by
the rerun, so keep the committed file with --out:

    python benchmarks/capture_momentum.py --out /tmp/m256.pt   # d 256, 4 layers; stream to the cache
    python benchmarks/capture_momentum.py --n-embd 512 --ffn 1376 --n-layer 2 --n-head 8 \
        --matrices model.layers.0.self_attn.q_proj.weight model.layers.1.self_attn.v_proj.weight \
        model.layers.0.self_attn.o_proj.weight model.layers.1.mlp.gate_proj.weight \
        model.layers.0.mlp.up_proj.weight model.layers.1.mlp.down_proj.weight --save-dtype float16 \
        --out benchmarks/data/momentum_llama-2x512.pt \
        --stream-out benchmarks/data/cache/grad_stream_llama-2x512.pt   # llama-60m's widths, 2 layers
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from muonq.config import ModelConfig, preset
from muonq.data import TokenLoader, check_dataset, dataset_dir, resolve_data_dir, validation_batches
from muonq.models import build_model
from muonq.optim.build import build_optimizer
from muonq.train.schedule import lr_multiplier

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "data" / "momentum_llama-tiny-256.pt"
DEFAULT_STREAM = HERE / "data" / "cache" / "grad_stream_llama-tiny-256.pt"
# A handful of hidden matrices: every kind (q, v, o, gate, up, down) at different depths.
DEFAULT_MATRICES = (
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.1.self_attn.v_proj.weight",
    "model.layers.2.self_attn.o_proj.weight",
    "model.layers.3.mlp.gate_proj.weight",
    "model.layers.1.mlp.up_proj.weight",
    "model.layers.2.mlp.down_proj.weight",
)


def short_name(name: str) -> str:
    """``model.layers.2.mlp.down_proj.weight`` -> ``L2.down_proj``."""
    parts = name.split(".")
    return f"L{parts[2]}.{parts[-2]}" if len(parts) > 3 and parts[1] == "layers" else name


@torch.no_grad()
def val_loss(model: torch.nn.Module, path: Path, *, batch_size: int, seq_len: int, max_tokens: int) -> float:
    model.eval()
    losses = [model(x, y).item() for x, y in validation_batches(path, batch_size=batch_size, seq_len=seq_len, max_tokens=max_tokens)]
    model.train()
    return sum(losses) / len(losses)


def capture(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    path = dataset_dir(resolve_data_dir(args.data_dir), "tiny_shakespeare", "bpe-8192")
    check_dataset(path, seq_len=args.context, model_vocab_size=8192)
    cfg = ModelConfig(model_type="llama", n_embd=args.n_embd, n_layer=args.n_layer, n_head=args.n_head,
                      intermediate_size=args.ffn, vocab_size=8192)
    model = build_model(cfg)
    named = dict(model.hidden_matrices())
    missing = [name for name in args.matrices if name not in named]
    if missing:
        raise SystemExit(f"no hidden matrix named {missing}; choose from {list(named)}")
    hidden = list(named.values())
    hidden_ids = {id(p) for p in hidden}
    others = [p for p in model.parameters() if id(p) not in hidden_ids]
    # fp32 Newton-Schulz on every CPU: auto would pick bf16 where the CPU has it natively, and the
    # capture would then depend on the machine's bf16 support, not only on its fp32 kernels
    opt_cfg = preset("muon", lr=args.lr, matmul_dtype="float32")
    optimizer = build_optimizer(opt_cfg, hidden=hidden, others=others)
    muon = optimizer.optimizers["muon"]
    loader = TokenLoader(path, "train", batch_size=args.batch_size, seq_len=args.context, seed=args.seed)
    params = list(model.parameters())
    watched = {name: named[name] for name in args.matrices}
    start: dict[str, torch.Tensor] = {}
    grads: dict[str, list[torch.Tensor]] = {name: [] for name in watched}
    t0 = time.perf_counter()
    for step in range(args.steps):
        optimizer.set_lr_multiplier(lr_multiplier(step, args.steps, name="warm-up-cosine", warm_up_fraction=0.01, min_lr_ratio=0.1))
        x, y = loader.next_batch()
        loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        if step == args.steps - args.stream:
            start = {name: muon.state[p]["momentum_buffer"].clone() for name, p in watched.items()}
        if step >= args.steps - args.stream:
            for name, p in watched.items():
                grads[name].append(p.grad.detach().float().clone())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % 50 == 0 or step + 1 == args.steps:
            print(f"step {step + 1}/{args.steps} loss {loss.item():.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    final = {name: muon.state[p]["momentum_buffer"].clone() for name, p in watched.items()}
    val = val_loss(model, path, batch_size=args.batch_size, seq_len=args.context, max_tokens=32768)
    print(f"val loss {val:.4f} after {args.steps} steps")

    dtype = getattr(torch, args.save_dtype)
    momentum = {short_name(name): (b / b.norm()).to(dtype).contiguous() for name, b in final.items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(momentum, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 2**20:.2f} MiB): "
          + ", ".join(f"{k} {tuple(v.shape)}" for k, v in momentum.items()))
    if args.stream:
        stream = {
            "start": {short_name(n): t for n, t in start.items()},
            "grads": {short_name(n): torch.stack(g) for n, g in grads.items()},
            "final": {short_name(n): t for n, t in final.items()},
            "momentum": opt_cfg.muon.momentum,
            "meta": dict(steps=args.steps, n_embd=args.n_embd, lr=args.lr, seed=args.seed, val_loss=val),
        }
        args.stream_out.parent.mkdir(parents=True, exist_ok=True)
        ignore = args.stream_out.parent / ".gitignore"
        if args.stream_out.parent.name == "cache" and not ignore.exists():
            ignore.write_text("*\n")
        torch.save(stream, args.stream_out)
        print(f"wrote {args.stream_out} ({args.stream_out.stat().st_size / 2**20:.1f} MiB): last {args.stream} gradients")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--n-embd", type=int, default=256)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=688, help="SwiGLU width")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.006)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stream", type=int, default=50, help="gradients of the last K steps to keep (0: none)")
    parser.add_argument("--matrices", nargs="+", default=list(DEFAULT_MATRICES))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 is fastest on a busy shared machine; 0: torch's default)")
    parser.add_argument("--data-dir", default=None, help="default: $DATA_DIR, else ./data")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--save-dtype", choices=["float32", "float16"], default="float32",
                        help="dtype of --out (float16 halves the file; 4-bit storage error is ~100x fp16's rounding)")
    parser.add_argument("--stream-out", type=Path, default=DEFAULT_STREAM)
    args = parser.parse_args()
    if not 0 <= args.stream < args.steps:
        parser.error("--stream must be in [0, --steps)")
    if args.threads:
        torch.set_num_threads(args.threads)
    capture(args)


if __name__ == "__main__":
    main()
