"""ZeRO-1 and FSDP2 on one machine: step time, per-rank optimizer-state bytes and the bytes the
optimizer's collectives move, at 1, 2 and 4 ranks, for muon and muonq side by side.

Each world size runs as spawned ranks (gloo on CPU, NCCL when every rank has a GPU), one thread per
rank as torchrun sets it, training the recipe's model with DDP and the run's optimizer sharded as
the trainer shards it (``build_sharded_optimizer``, ZeRO-1 on) on random tokens: the global batch is
the recipe's ``tokens_processed``, split evenly over the ranks. After ``--warmup`` steps it times
``--steps`` steps: the whole step (forward, backward, DDP all-reduce, optimizer) and the optimizer
step alone (owned updates + parameter broadcast), each the slowest rank's median. At more than
one rank each optimizer runs twice, side by side on two copies of the model (steps alternate):
with the broadcast after every update ("ddp, after", ``overlap=False``) and with Muon's broadcasts
overlapping its next owner round ("ddp, overlapped", the default); a third copy runs under FSDP2
("fsdp": ``fully_shard`` per block and root, as ``parallelism=fsdp`` applies it, and the owned Muon
optimizer: gradient rows to each matrix's owner and update rows back, by all-to-all).

Under FSDP the collectives column counts the optimizer's all-to-alls (FSDP's own all-gathers and
reduce-scatters of the forward and backward are in the step time, not in that column); bytes
received are the all-to-all payload, and ideal is each gradient row reaching its owner once and
each update row coming back once.

"Bytes received" is the payload each rank receives from the parameter broadcasts per step (the
parameters it does not own); "ideal" is every parameter reaching every rank once, total parameter
bytes x (world - 1) / world. Payload, not wire bytes: gloo's broadcast algorithm may send more.

    python benchmarks/bench_distributed.py [--recipe llama-tiny] [--worlds 1 2 4] [--steps 10]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from muonq.config import CONF_DIR, ModelConfig, preset
from muonq.models import build_model
from muonq.optim.owned import OwnedMuonOptimizer
from muonq.optim.zero import build_sharded_optimizer
from muonq.train.distributed import DistInfo
from muonq.train.parallelize import shard_fsdp


def _recipe(name: str, model_overrides: list[str]) -> tuple[dict, int, int]:
    from omegaconf import OmegaConf

    recipe = OmegaConf.load(CONF_DIR / "recipe" / f"{name}.yaml")
    model = OmegaConf.to_container(recipe.model)
    for item in model_overrides:
        key, value = item.split("=", 1)
        model[key] = type(model.get(key, 0))(value) if model.get(key) is not None else int(value)
    tp = recipe.training_params
    return model, tp.tokens_processed // tp.context_length, tp.context_length


def _worker(rank: int, world: int, args: argparse.Namespace, tmp: str) -> None:
    torch.set_num_threads(1)
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{tmp}/rdzv_{world}", rank=rank,
                                world_size=world)
    model_cfg, global_batch, seq = _recipe(args.recipe, args.model)
    if global_batch % world:
        raise ValueError(f"global batch {global_batch} does not split over {world} ranks")
    results = []
    # At more than one rank, the plain ZeRO-1 step (every update, then every broadcast) and the
    # overlapped one (Muon's rounds with their broadcasts in flight) on two copies of the model,
    # stepped alternately (the order flips every step) so that load changes hit both alike.
    variants = [("ddp, after", False), ("ddp, overlapped", True), ("fsdp", None)] if world > 1 else [("-", True)]
    for name in args.optimizers:
        runs = []
        for label, overlap in variants:
            torch.manual_seed(0)
            model = build_model(ModelConfig(**model_cfg))
            model.to(device)
            hidden = model.hidden_matrices()
            ids = {id(p) for _, p in hidden}
            others = [(n, p) for n, p in model.named_parameters() if id(p) not in ids]
            cfg = dataclasses.replace(preset(name), zero=True)
            if overlap is None:  # FSDP2: the model's parameters become row shards before the optimizer is built
                shard_fsdp(model, DistInfo(rank, rank, world, device), SimpleNamespace(autocast=False))
                hidden = [(n, p) for n, p in model.named_parameters() if n in dict(hidden)]
                others = [(n, p) for n, p in model.named_parameters() if n in dict(others)]
                opt = OwnedMuonOptimizer(cfg, hidden, others, rank=rank, world_size=world, device_type=device.type)
                train = model
            else:
                opt = build_sharded_optimizer(cfg, named_hidden=hidden, named_others=others, rank=rank, world_size=world,
                                              device_type=device.type, overlap=overlap)
                train = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
            runs.append({"label": label, "opt": opt, "train": train, "step": [], "opt_step": []})
        gen = torch.Generator().manual_seed(1234 + rank)
        for i in range(args.warmup + args.steps):
            tokens = torch.randint(0, model_cfg["vocab_size"], (global_batch // world, seq + 1), generator=gen).to(device)
            for run in runs if i % 2 == 0 else runs[::-1]:
                if world > 1:
                    dist.barrier()
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                run["train"](tokens[:, :-1], tokens[:, 1:]).backward()
                if cuda:
                    torch.cuda.synchronize()
                t1 = time.perf_counter()
                run["opt"].step()
                run["opt"].zero_grad(set_to_none=True)
                if cuda:
                    torch.cuda.synchronize()
                t2 = time.perf_counter()
                if i >= args.warmup:
                    run["step"].append(t2 - t0)
                    run["opt_step"].append(t2 - t1)
        for run in runs:
            opt = run["opt"]
            mine = torch.tensor([statistics.median(run["step"]), statistics.median(run["opt_step"])], dtype=torch.float64,
                                device=device)
            if world > 1:
                dist.all_reduce(mine, op=dist.ReduceOp.MAX)
            report, plan = opt.state_report(), opt.comm_plan()
            received = torch.tensor([plan["bytes_received"]], dtype=torch.float64, device=device)
            ideal = torch.tensor([plan["ideal_bytes_received"]], dtype=torch.float64, device=device)
            if world > 1:
                dist.all_reduce(received, op=dist.ReduceOp.MAX)
                dist.all_reduce(ideal, op=dist.ReduceOp.MAX)
            results.append({
                "optimizer": name, "world": world, "broadcast": run["label"], "step_s": mine[0].item(),
                "opt_step_s": mine[1].item(), "state_per_rank": report["per_rank"], "state_total": report["total"],
                "collectives": plan["collectives"], "max_bytes_received": int(received.item()),
                "ideal_bytes_received": int(ideal.item()),
                "device": str(device.type), "backend": dist.get_backend() if world > 1 else "-",
            })  # fmt: skip
        del runs
    if rank == 0:
        Path(tmp, f"world{world}.json").write_text(json.dumps(results))
    if world > 1:
        dist.barrier()  # no rank tears gloo down while a peer still finishes a collective
        dist.destroy_process_group()


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="llama-tiny")
    parser.add_argument("--model", nargs="*", default=[], metavar="KEY=VALUE", help="model overrides, e.g. n_layer=8")
    parser.add_argument("--worlds", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--optimizers", nargs="+", default=["muon", "muonq"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in args.worlds:
            mp.spawn(_worker, args=(world, args, tmp), nprocs=world, join=True)
            rows += json.loads(Path(tmp, f"world{world}.json").read_text())
    base = {r["optimizer"]: r for r in rows if r["world"] == min(args.worlds) and r["broadcast"] in ("-", "ddp, after")}
    model_cfg, global_batch, seq = _recipe(args.recipe, args.model)
    print(f"recipe {args.recipe} {' '.join(args.model)}: {model_cfg}; global batch {global_batch} x {seq} tokens; "
          f"{os.cpu_count()} CPU cores, 1 thread per rank; backend {rows[-1]['backend']} on {rows[-1]['device']}\n")
    print("| optimizer | ranks | layout | step ms | vs 1 rank | optimizer step ms | state MiB per rank (max) "
          "| vs 1 rank | state MiB total | optimizer collectives / step | MiB received / rank / step (max) | ideal MiB (max) |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.optimizers:
        for r in (r for r in rows if r["optimizer"] == name):
            b = base[name]
            per_rank = max(r["state_per_rank"])
            print(f"| {name} | {r['world']} | {r['broadcast']} | {1e3 * r['step_s']:.1f} | {r['step_s'] / b['step_s']:.2f}x "
                  f"| {1e3 * r['opt_step_s']:.1f} | {_mib(per_rank)} | {per_rank / max(b['state_per_rank']):.3f}x "
                  f"| {_mib(r['state_total'])} | {r['collectives']} | {_mib(r['max_bytes_received'])} "
                  f"| {_mib(r['ideal_bytes_received'])} |")
    for name in args.optimizers:
        for world in args.worlds:
            pair = {r["broadcast"]: r for r in rows if r["optimizer"] == name and r["world"] == world}
            if "ddp, after" in pair and "ddp, overlapped" in pair:
                a, o = pair["ddp, after"], pair["ddp, overlapped"]
                print(f"{name}, {world} ranks: optimizer step {1e3 * a['opt_step_s']:.1f} ms with the broadcast after "
                      f"every update -> {1e3 * o['opt_step_s']:.1f} ms overlapped ({o['opt_step_s'] / a['opt_step_s']:.2f}x); "
                      f"whole step {o['step_s'] / a['step_s']:.2f}x")
            if "fsdp" in pair and "ddp, overlapped" in pair:
                f, o = pair["fsdp"], pair["ddp, overlapped"]
                print(f"{name}, {world} ranks: fsdp step {1e3 * f['step_s']:.1f} ms vs ddp (overlapped) "
                      f"{1e3 * o['step_s']:.1f} ms ({f['step_s'] / o['step_s']:.2f}x)")
    print("\nper-rank state bytes:")
    for r in rows:
        print(f"  {r['optimizer']:6s} {r['world']} ranks ({r['broadcast']}): {r['state_per_rank']}")


if __name__ == "__main__":
    main()
