"""The report's figures: validation and train loss curves, optimizer state and throughput bars."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from muonq.compare.runs import RunResult
from muonq.compare.table import fmt
from muonq.metric_names import format_bytes


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
             "training throughput", [fmt(r.tokens_per_s, ",.0f") for r in results])
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
         [format_bytes(r.state_bytes) for r in results]),
        (axes[1], [r.muon_state_bytes for r in results], "Muon momentum of the hidden matrices (MiB)",
         [("n/a (no Muon)" if r.muon_state_bytes is None else format_bytes(r.muon_state_bytes))
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
