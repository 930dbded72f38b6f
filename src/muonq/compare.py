"""Compare optimizers: run them one after another on the same recipe, data, seed and steps, then
write a readable report (Markdown table + PNG plots) from the runs' own logs.

    python -m muonq.compare recipe=llama-tiny optimizers=[adamw,muon,muon8bit,muonq] steps=300 \\
        [out=reports/NAME] [any Hydra override for every run, e.g. optimizer_params.args.lr=0.006]
    python -m muonq.compare --from-runs DIR1 DIR2 ... [out=DIR]    # report on existing run folders
    python -m muonq.compare runs=[DIR1,DIR2] [out=DIR]              # the same

Each run is ``python run_hydra.py recipe=R optimizer_params=O ...`` in its own Hydra folder
``<out>/runs/<O>`` with ``run_name=<R>_<O>``. Only the run folders' ``metrics.jsonl``,
``summary.json`` and ``.hydra/`` are read, so runs made elsewhere (``run.sh`` on a cluster, copied
back) give the same report.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from muonq.cli import UsageError, as_list, parse_args, run_cli

REPO = Path(__file__).resolve().parents[2]

USAGE = """\
usage: python -m muonq.compare recipe=NAME optimizers=[a,b,...] steps=N [out=DIR] [key=value ...]
       python -m muonq.compare --from-runs RUN_DIR [RUN_DIR ...] [out=DIR]

Runs each optimizer with run_hydra.py (same recipe, data, seed and steps), then writes
DIR/report.md (a table), DIR/report.json (the same numbers) and PNG plots.

  recipe=NAME          recipe of every run (default llama-tiny)
  optimizers=[a,b]     optimizer_params of each run, in order (default [adamw,muon,muon8bit,muonq])
  steps=N              optimizer steps of every run (default: the recipe's token budget)
  out=DIR              report folder (default reports/<recipe>_<date>_<time>); runs go to DIR/runs/<opt>
  runs=[DIR,...]       make the report from existing run folders instead of training
  title=TEXT           report title
  rerun=false          true: retrain runs whose folder already has a finished run with the same arguments
  verbose=false        true: stream the runs' console output
  nproc=N              launch each run with torchrun --standalone --nproc-per-node=N (default 1: plain python)
  threads=N            OMP_NUM_THREADS of each run (default: torch's choice, all cores). On a shared,
                       busy CPU threads=1 is often several times faster: idle-waiting OpenMP threads
                       of several processes slow each other down
  any other key=value  passed to every run as a Hydra override (optimizer_params.args.lr=0.006,
                       seed=1, data_dir=..., device=cpu, ...). Validation points for the curves:
                       logging_params.val_step defaults to steps/10 (0: final validation only).
"""

DEFAULT_OPTIMIZERS = ["adamw", "muon", "muon8bit", "muonq"]
# Quality targets (final validation loss relative to fp32 Muon), checked when the runs are present.
TARGETS = {"muon8bit": 0.005, "muonq": 0.01}


# -- reading runs ------------------------------------------------------------------------------
@dataclass
class RunResult:
    label: str
    run_dir: str
    optimizer: str | None = None
    recipe: str | None = None
    steps: int | None = None
    tokens: int | None = None
    final_train_loss: float | None = None
    final_val_loss: float | None = None
    final_val_full: bool | None = None  # the final validation covered the whole split
    tokens_per_s: float | None = None  # median over the logged intervals, the first one excluded
    peak_memory_bytes: int | None = None
    state_bytes: int | None = None  # all optimizer state (Muon matrices + AdamW parameters)
    muon_state_bytes: int | None = None  # the Muon matrices' momentum alone
    muon_ratio_vs_fp32: float | None = None  # fp32 Muon bytes / this run's Muon-matrix bytes
    wall_s: float | None = None
    val_curve: list[tuple[int, float]] = field(default_factory=list)  # (tokens, val loss)
    train_curve: list[tuple[int, float]] = field(default_factory=list)  # (tokens, train loss)

    @property
    def val_ppl(self) -> float | None:
        return math.exp(min(self.final_val_loss, 50.0)) if self.final_val_loss is not None else None


def _read_yaml(path: Path) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else None


def _get(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl rows; a resumed run appends, so a later row for the same step and keys wins."""
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill
                continue
    return rows


def _series(rows: list[dict[str, Any]], key: str) -> dict[int, dict[str, Any]]:
    return {int(r["step"]): r for r in rows if key in r and r[key] is not None}


def load_run(run_dir: str | os.PathLike, label: str | None = None) -> RunResult:
    """The numbers of one run folder (a Hydra run dir holding metrics.jsonl)."""
    run_dir = Path(run_dir)
    metrics_file = run_dir / "metrics.jsonl"
    if not metrics_file.is_file():
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (not a run folder, or the run never started)")
    rows = read_metrics(metrics_file)
    config = _read_yaml(run_dir / ".hydra" / "config.yaml") or {}
    hydra = _read_yaml(run_dir / ".hydra" / "hydra.yaml") or {}
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    optimizer = _get(config, "optimizer_params.name")
    recipe = _get(hydra, "hydra.runtime.choices.recipe")
    name = config.get("run_name") or _get(config, "logging_params.wandb.name")
    result = RunResult(label=label or name or optimizer or run_dir.name, run_dir=str(run_dir), optimizer=optimizer, recipe=recipe)

    train = _series(rows, "train/loss")
    val = _series(rows, "val/loss")
    final = [r for r in rows if r.get("val/final_loss") is not None]
    if train:
        last = train[max(train)]
        result.final_train_loss = float(last["train/loss"])
        result.train_curve = [(int(r.get("train/tokens", s)), float(r["train/loss"])) for s, r in sorted(train.items())]
    if final:
        result.final_val_loss = float(final[-1]["val/final_loss"])
        result.final_val_full = _get(config, "logging_params.final_full_val")
    result.val_curve = [(int(r.get("train/tokens", s)), float(r["val/loss"])) for s, r in sorted(val.items())]
    steps = [int(r["step"]) for r in rows if "step" in r]
    result.steps = summary.get("steps", max(steps) if steps else None)
    tokens = [int(r["train/tokens"]) for r in rows if "train/tokens" in r]
    result.tokens = max(tokens) if tokens else None

    speeds = [float(r["perf/tokens_per_s"]) for _, r in sorted(_series(rows, "perf/tokens_per_s").items())]
    if speeds:
        kept = speeds[1:] if len(speeds) >= 3 else speeds  # the first interval holds the warm-up
        result.tokens_per_s = _median(kept)
    memory = [int(r["perf/peak_memory_bytes"]) for r in rows if r.get("perf/peak_memory_bytes") is not None]
    result.peak_memory_bytes = max(memory) if memory else None
    state = [r for r in rows if r.get("optim/state_bytes") is not None]
    if state:
        first = state[-1]
        result.state_bytes = int(first["optim/state_bytes"])
        if first.get("optim/state_bytes_muon") is not None:
            result.muon_state_bytes = int(first["optim/state_bytes_muon"])
        ratio = first.get("optim/muon_ratio_vs_fp32")
        result.muon_ratio_vs_fp32 = float(ratio) if ratio is not None and math.isfinite(float(ratio)) else None
    if summary.get("wall_s") is not None:
        result.wall_s = float(summary["wall_s"])
    elif len(rows) >= 2 and "time" in rows[0]:
        result.wall_s = float(rows[-1]["time"] - rows[0]["time"])
    return result


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


def _unique_labels(results: list[RunResult]) -> None:
    """Label runs by optimizer when that names each one, else by run name (made unique)."""
    optimizers = [r.optimizer for r in results]
    if all(optimizers) and len(set(optimizers)) == len(optimizers):
        for r in results:
            r.label = r.optimizer
        return
    seen: dict[str, int] = {}
    for r in results:
        seen[r.label] = seen.get(r.label, 0) + 1
    for r in results:
        if seen[r.label] > 1:
            r.label = f"{r.label} ({Path(r.run_dir).name})"


# -- formatting --------------------------------------------------------------------------------
def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _reference(results: list[RunResult]) -> RunResult | None:
    """fp32 Muon, the run the Δ column compares against (None when absent)."""
    return next((r for r in results if r.optimizer == "muon" and r.final_val_loss is not None), None)


def relative_gap(result: RunResult, ref: RunResult | None) -> float | None:
    if ref is None or result.final_val_loss is None:
        return None
    return (result.final_val_loss - ref.final_val_loss) / ref.final_val_loss


COLUMNS = [
    "optimizer", "final train loss", "final val loss", "val ppl", "Δ val vs muon", "tokens/s",
    "peak memory", "optimizer state", "Muon-matrix state", "vs fp32 Muon", "wall time",
]


def markdown_table(results: list[RunResult]) -> str:
    ref = _reference(results)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * (len(COLUMNS) - 1)]
    for r in results:
        gap = relative_gap(r, ref)
        cells = [
            r.label,
            _fmt(r.final_train_loss, ".4f"),
            _fmt(r.final_val_loss, ".4f"),
            _fmt(r.val_ppl, ".2f"),
            "—" if gap is None else f"{gap * 100:+.2f}%",
            _fmt(r.tokens_per_s, ",.0f"),
            fmt_bytes(r.peak_memory_bytes),
            fmt_bytes(r.state_bytes),
            fmt_bytes(r.muon_state_bytes),
            "—" if r.muon_ratio_vs_fp32 is None else f"{r.muon_ratio_vs_fp32:.2f}x smaller",
            "—" if r.wall_s is None else f"{r.wall_s:.1f} s",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def target_checks(results: list[RunResult]) -> list[str]:
    """The quality targets in TARGETS, where the runs they need are present: one line each."""
    by_opt = {r.optimizer: r for r in results if r.optimizer and r.final_val_loss is not None}
    ref = by_opt.get("muon")
    lines = []
    if ref is not None:
        for opt, limit in TARGETS.items():
            if opt in by_opt:
                gap = relative_gap(by_opt[opt], ref)
                verdict = "met" if gap <= limit else "NOT met"
                lines.append(f"- {opt} within {limit:.1%} of fp32 Muon's final validation loss: "
                             f"{gap * 100:+.2f}% → **{verdict}**")
        if "adamw" in by_opt:
            diff = ref.final_val_loss - by_opt["adamw"].final_val_loss
            verdict = "met" if diff < 0 else "NOT met"
            lines.append(f"- muon below adamw: {ref.final_val_loss:.4f} vs {by_opt['adamw'].final_val_loss:.4f} "
                         f"({diff:+.4f}) → **{verdict}**")
    return lines


# -- plots -------------------------------------------------------------------------------------
def _colors(n: int) -> list[Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def write_plots(results: list[RunResult], out: Path, *, title: str) -> dict[str, str]:
    """val_loss.png, train_loss.png, state_memory.png, tokens_per_s.png; returns name -> file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = _colors(len(results))
    files: dict[str, str] = {}

    def curve_plot(attr: str, ylabel: str, name: str, heading: str) -> None:
        curves = [(r, getattr(r, attr)) for r in results]
        if not any(c for _, c in curves):
            return
        fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
        tails = []
        for (r, curve), color in zip(curves, colors):
            if not curve:
                continue
            xs, ys = zip(*curve)
            ax.plot(xs, ys, marker="o" if len(xs) <= 30 else None, markersize=3, linewidth=1.6, label=r.label, color=color)
            tails.extend(ys[len(ys) // 5:] if len(ys) >= 5 else ys)
        if tails:  # zoom on the part where the optimizers differ, not the first drop from ln(vocab)
            lo, hi = min(tails), max(tails)
            pad = 0.08 * max(hi - lo, 1e-3)
            ax.set_ylim(lo - pad, hi + pad)
        ax.set_xlabel("training tokens")
        ax.set_ylabel(ylabel)
        ax.set_title(heading)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
        fig.tight_layout()
        fig.savefig(out / name)
        plt.close(fig)
        files[attr] = name

    curve_plot("val_curve", "validation loss", "val_loss.png", f"{title}: validation loss")
    curve_plot("train_curve", "train loss (mean over each log interval)", "train_loss.png", f"{title}: train loss")

    def bar_plot(values: list[float | None], xlabel: str, name: str, heading: str, labels: list[str]) -> None:
        if all(v is None for v in values):
            return
        fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(results) + 1.5), dpi=110)
        ys = list(range(len(results)))
        bars = ax.barh(ys, [v or 0 for v in values], color=colors)
        for bar, text in zip(bars, labels):
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, " " + text, va="center", fontsize=8)
        ax.set_yticks(ys, [r.label for r in results])
        ax.invert_yaxis()
        ax.set_xlabel(xlabel)
        ax.set_title(heading)
        ax.set_xlim(0, max(v or 0 for v in values) * 1.35 or 1)
        ax.grid(True, axis="x", alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / name)
        plt.close(fig)
        files[name.removesuffix(".png")] = name

    state_plot(results, out, colors, files)
    bar_plot([r.tokens_per_s for r in results], "tokens / s (median over log intervals)", "tokens_per_s.png",
             "training throughput", [_fmt(r.tokens_per_s, ",.0f") for r in results])
    return files


def state_plot(results: list[RunResult], out: Path, colors: list[Any], files: dict[str, str]) -> None:
    """Two panels: all optimizer state, and the hidden matrices' Muon momentum with its ratio to fp32."""
    import matplotlib.pyplot as plt

    if all(r.state_bytes is None for r in results):
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.45 * len(results) + 1.6), dpi=110, sharey=True)
    ys = list(range(len(results)))
    panels = [
        (axes[0], [r.state_bytes for r in results], "all optimizer state (MiB)",
         [fmt_bytes(r.state_bytes) for r in results]),
        (axes[1], [r.muon_state_bytes for r in results], "Muon momentum of the hidden matrices (MiB)",
         [("n/a (no Muon)" if r.muon_state_bytes is None else fmt_bytes(r.muon_state_bytes))
          + ("" if r.muon_ratio_vs_fp32 is None else f", {r.muon_ratio_vs_fp32:.2f}x smaller") for r in results]),
    ]
    for ax, values, xlabel, labels in panels:
        mib = [(v or 0) / 2**20 for v in values]
        bars = ax.barh(ys, mib, color=colors)
        for bar, text in zip(bars, labels):
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, " " + text, va="center", fontsize=7.5)
        ax.set_xlim(0, (max(mib) or 1) * 1.6)
        ax.set_xlabel(xlabel)
        ax.grid(True, axis="x", alpha=0.3)
    axes[0].set_yticks(ys, [r.label for r in results])
    axes[0].invert_yaxis()
    fig.suptitle("optimizer state (the ratio is against fp32 Muon's momentum)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "state_memory.png")
    plt.close(fig)
    files["state_memory"] = "state_memory.png"


# -- the report --------------------------------------------------------------------------------
def host_description() -> str:
    """This machine in a few words: CPU model and cores, GPU if any, torch version."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    parts = [f"{os.cpu_count()}-core CPU ({cpu})"]
    if torch.cuda.is_available():
        parts.append(f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}")
    parts.append(f"torch {torch.__version__}")
    return " · ".join(parts)


def write_report(results: list[RunResult], out: str | os.PathLike, *, title: str | None = None,
                 command: str | None = None, failed: dict[str, str] | None = None, host: str | None = None) -> Path:
    """report.md, report.json and the PNGs under ``out``; returns the path of report.md. ``host``
    describes the machine the runs trained on (None: unknown, e.g. runs copied from a cluster)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not results:
        raise ValueError("no finished runs to report on")
    _unique_labels(results)
    recipes = sorted({r.recipe for r in results if r.recipe})
    title = title or f"Optimizer comparison: {', '.join(recipes) or 'runs'}"
    plots = write_plots(results, out, title=recipes[0] if len(recipes) == 1 else "runs")

    def rel(path: str) -> str:
        try:
            return os.path.relpath(path, out)
        except ValueError:
            return path

    lines = [f"# {title}", ""]
    lines.append(f"{datetime.now():%Y-%m-%d} · " + (f"trained on this machine: {host}" if host else
                 "report made from existing run folders (the machine they trained on is not recorded here)"))
    lines.append("")
    if command:
        lines += ["Made with:", "", "```bash", command, "```", ""]
    steps = sorted({r.steps for r in results if r.steps is not None})
    tokens = sorted({r.tokens for r in results if r.tokens is not None})
    if steps:
        lines.append(f"Steps per run: {', '.join(map(str, steps))}; training tokens per run: "
                     f"{', '.join(f'{t:,}' for t in tokens)}.")
        lines.append("")
    lines += [markdown_table(results), ""]
    checks = target_checks(results)
    if checks:
        lines += ["Targets (final validation loss relative to fp32 Muon):", "", *checks, ""]
    if failed:
        lines += ["Runs that did not finish (not in the table):", ""]
        lines += [f"- {name}: {why}" for name, why in failed.items()]
        lines.append("")
    for key, heading in (("val_curve", "Validation loss"), ("train_curve", "Train loss"),
                         ("state_memory", "Optimizer state"), ("tokens_per_s", "Throughput")):
        if key in plots:
            lines += [f"![{heading}]({plots[key]})", ""]
    lines += [
        "Columns: *final train loss* is the mean training loss over the last logging interval; *final val "
        "loss* is the last validation (the whole validation split when `logging_params.final_full_val` is on, "
        "the default) and *val ppl* its exponential; *Δ val vs muon* is relative to the fp32 Muon run; "
        "*tokens/s* is the median over the logging intervals after the first (validation time excluded); "
        "*peak memory* is the CUDA peak allocation on GPU and the process's peak resident memory on CPU; "
        "*optimizer state* counts every optimizer state tensor (Muon momentum and the AdamW state of "
        "embeddings, head and norms; rank 0's share when ZeRO shards it across ranks); *Muon-matrix state* is "
        "the momentum of the hidden matrices alone and "
        "*vs fp32 Muon* how many times smaller it is than fp32 Muon's; *wall time* is the training loop's, "
        "validation included. Validation curves: validation loss on a fixed window of "
        "`logging_params.val_tokens_processed` tokens"
        + (", the last point on the whole split." if any(r.final_val_full for r in results) else "."),
        "",
        "Runs:",
        "",
        *[f"- {r.label}: `{rel(r.run_dir)}`" for r in results],
        "",
    ]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    payload = {"title": title, "command": command, "failed": failed or {},
               "runs": [{k: v for k, v in asdict(r).items() if k not in ("val_curve", "train_curve")}
                        | {"val_ppl": r.val_ppl, "delta_val_vs_muon": relative_gap(r, _reference(results))}
                        for r in results],
               "plots": plots}
    (out / "report.json").write_text(json.dumps(payload, indent=1))
    return report


# -- running -----------------------------------------------------------------------------------
def _given(overrides: list[str], key: str) -> bool:
    return any(o.lstrip("+~").split("=", 1)[0] == key for o in overrides)


def plan_runs(recipe: str, optimizers: list[str], steps: int | None, extra: list[str], runs_root: Path,
              *, world_size: int = 1) -> list[tuple[str, Path, list[str]]]:
    """(optimizer, run folder, overrides) for each run; the config of each is composed and validated."""
    from muonq.config import ConfigError, compose_config, validate
    from muonq.data import check_dataset, dataset_dir, resolve_data_dir
    from muonq.train.schedule import budget_steps, total_steps

    base = compose_config([f"recipe={recipe}", *extra])
    tp = base.recipe.training_params
    budget = budget_steps(tp.tokens_processed, base.recipe.dataset.total_tokens_B)
    if steps is None:
        steps = total_steps(base)
    if steps < 1:
        raise UsageError(f"steps must be >= 1, got {steps}")
    common = [f"recipe={recipe}", f"recipe.training_params.max_steps={steps}"]
    if budget < steps:  # raise the token budget so max_steps decides (half a step of slack for rounding)
        common.append(f"recipe.dataset.total_tokens_B={(steps + 0.5) * tp.tokens_processed / 1e9!r}")
    if not _given(extra, "logging_params.val_step"):
        common.append(f"logging_params.val_step={max(1, steps // 10)}")
    if not _given(extra, "logging_params.log_step"):
        common.append(f"logging_params.log_step={max(1, min(10, steps // 20))}")
    user_name = next((o.split("=", 1)[1] for o in extra if o.split("=", 1)[0] == "run_name"), None)
    extra = [o for o in extra if o.split("=", 1)[0] != "run_name"]

    data = dataset_dir(resolve_data_dir(base.data_dir), base.recipe.dataset.name, base.recipe.dataset.tokenizer)
    if not data.is_dir() and base.recipe.dataset.name == "tiny_shakespeare":
        from muonq.data.prepare import prepare

        print(f"preparing the embedded corpus in {data} (once)")
        prepare("tiny_shakespeare", base.recipe.dataset.tokenizer, data_dir=data.parent, progress=False)
    check_dataset(data, seq_len=tp.context_length, model_vocab_size=base.recipe.model.vocab_size)

    planned = []
    for opt in optimizers:
        name = f"{user_name}_{opt}" if user_name else f"{recipe}_{opt}"
        overrides = [*common, f"optimizer_params={opt}", *extra, f"run_name={name}"]
        cfg = compose_config(overrides)
        try:
            validate(cfg, world_size=world_size)
        except ConfigError as err:
            raise ValueError(f"{opt}: {err}") from err
        planned.append((opt, runs_root / opt, overrides))
    return planned


def _finished_same(run_dir: Path, overrides: list[str], threads: int | None, nproc: int) -> bool:
    marker = run_dir / "compare_args.json"
    if not (run_dir / "summary.json").is_file() or not marker.is_file():
        return False
    recorded = json.loads(marker.read_text())
    same = recorded.get("overrides") == overrides and recorded.get("threads") == threads
    return same and recorded.get("nproc", 1) == nproc


def run_one(opt: str, run_dir: Path, overrides: list[str], *, verbose: bool, threads: int | None = None,
            nproc: int = 1) -> float:
    """Train one run in a subprocess; returns its wall time. Raises RuntimeError on failure."""
    import shutil

    if run_dir.exists():
        shutil.rmtree(run_dir)  # an unfinished or different earlier run: metrics.jsonl would append
    run_dir.mkdir(parents=True)
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc-per-node={nproc}"]
    cmd = [*launcher, str(REPO / "run_hydra.py"), f"hydra.run.dir={run_dir.absolute()}", *overrides]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    start = time.perf_counter()
    with open(run_dir / "console.log", "w") as console:
        console.write(shlex.join(cmd) + "\n")
        console.flush()
        if verbose:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stdout.write(line)
                console.write(line)
            code = proc.wait()
        else:
            code = subprocess.run(cmd, stdout=console, stderr=subprocess.STDOUT, env=env).returncode
    elapsed = time.perf_counter() - start
    if code != 0:
        tail = (run_dir / "console.log").read_text().strip().splitlines()[-3:]
        raise RuntimeError(f"exit {code}: " + " / ".join(line.strip() for line in tail))
    marker = {"optimizer": opt, "overrides": overrides, "threads": threads, "nproc": nproc, "wall_s": round(elapsed, 1)}
    (run_dir / "compare_args.json").write_text(json.dumps(marker, indent=1))
    return elapsed


def command_line(argv: list[str]) -> str:
    return "python -m muonq.compare " + " ".join(shlex.quote(a) for a in argv)


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--from-runs":
        dirs = [a for a in argv[1:] if "=" not in a]
        kv = [a for a in argv[1:] if "=" in a]
        values, _ = parse_args(kv, keys={"out": None, "title": None})
        if not dirs:
            raise UsageError("--from-runs needs at least one run folder")
        values["runs"] = dirs
    else:
        values, extra = parse_args(argv, keys={"recipe": "llama-tiny", "optimizers": DEFAULT_OPTIMIZERS, "steps": None,
                                               "out": None, "runs": None, "title": None, "rerun": False,
                                               "verbose": False, "threads": None, "nproc": 1}, passthrough=True)
        if values["runs"] is not None and extra:
            raise UsageError(f"runs=[...] reports on existing runs; these training overrides do not apply: {' '.join(extra)}")

    if values.get("runs") is not None:
        run_dirs = as_list(values["runs"], "runs")
        out = Path(values["out"] or f"reports/runs_{datetime.now():%Y-%m-%d_%H-%M-%S}")
        results = [load_run(d) for d in run_dirs]
        report = write_report(results, out, title=values["title"], command=command_line(argv))
        print(report.read_text().split("\n\n![")[0])
        print(f"\nreport: {report}")
        return 0

    recipe = str(values["recipe"])
    optimizers = as_list(values["optimizers"], "optimizers")
    if not optimizers:
        raise UsageError("optimizers=[...] is empty")
    if len(set(optimizers)) != len(optimizers):
        raise UsageError(f"optimizers lists one twice: {optimizers}")
    steps = values["steps"]
    if steps is not None and not isinstance(steps, int):
        raise UsageError(f"steps must be an integer, got {steps!r}")
    threads = values["threads"]
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise UsageError(f"threads must be a positive integer, got {threads!r}")
    nproc = values["nproc"]
    if not isinstance(nproc, int) or nproc < 1:
        raise UsageError(f"nproc must be a positive integer, got {nproc!r}")
    out = Path(values["out"] or f"reports/{recipe}_{datetime.now():%Y-%m-%d_%H-%M-%S}")
    planned = plan_runs(recipe, optimizers, steps, extra, out / "runs", world_size=nproc)

    results, failed = [], {}
    for i, (opt, run_dir, overrides) in enumerate(planned, 1):
        if not values["rerun"] and _finished_same(run_dir, overrides, threads, nproc):
            print(f"[{i}/{len(planned)}] {opt}: finished earlier in {run_dir}, reused (rerun=true to train again)")
        else:
            print(f"[{i}/{len(planned)}] {opt}: training in {run_dir} ...", flush=True)
            try:
                run_one(opt, run_dir, overrides, verbose=bool(values["verbose"]), threads=threads, nproc=nproc)
            except RuntimeError as err:
                failed[opt] = str(err)
                print(f"[{i}/{len(planned)}] {opt}: FAILED ({err}); log: {run_dir / 'console.log'}", file=sys.stderr)
                continue
        result = load_run(run_dir)
        results.append(result)
        print(f"[{i}/{len(planned)}] {opt}: final val loss {_fmt(result.final_val_loss, '.4f')}, "
              f"{_fmt(result.tokens_per_s, ',.0f')} tok/s, {_fmt(result.wall_s, '.1f')} s", flush=True)
    if not results:
        print("error: every run failed; no report written", file=sys.stderr)
        return 1
    report = write_report(results, out, title=values["title"], command=command_line(argv), failed=failed,
                          host=host_description())
    print()
    print(markdown_table(results))
    checks = target_checks(results)
    if checks:
        print("\n" + "\n".join(checks))
    print(f"\nreport: {report}")
    return 1 if failed else 0


def cli() -> int:
    return run_cli(main, USAGE)


if __name__ == "__main__":
    sys.exit(cli())
