"""The numbers as the report prints them: the Markdown table and the quality-target checks."""

from __future__ import annotations

from muonq.compare.runs import RunResult
from muonq.metric_names import format_bytes, format_ratio

# Quality targets (final validation loss relative to fp32 Muon), checked when the runs are present.
TARGETS = {"muon8bit": 0.005, "muonq": 0.01}

COLUMNS = [
    "optimizer", "final train loss", "final val loss", "val ppl", "Δ val vs muon", "tokens/s",
    "peak memory", "optimizer state", "vs fp32 Muon + AdamW", "Muon-matrix state", "vs fp32 Muon", "wall time",
]


def fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def reference(results: list[RunResult]) -> RunResult | None:
    """fp32 Muon, the run the Δ column compares against (None when absent)."""
    return next((r for r in results if r.optimizer == "muon" and r.final_val_loss is not None), None)


def relative_gap(result: RunResult, ref: RunResult | None) -> float | None:
    if ref is None or result.final_val_loss is None:
        return None
    return (result.final_val_loss - ref.final_val_loss) / ref.final_val_loss


def markdown_table(results: list[RunResult]) -> str:
    ref = reference(results)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * (len(COLUMNS) - 1)]
    for r in results:
        gap = relative_gap(r, ref)
        cells = [
            r.label,
            fmt(r.final_train_loss, ".4f"),
            fmt(r.final_val_loss, ".4f"),
            fmt(r.val_ppl, ".2f"),
            "—" if gap is None else f"{gap * 100:+.2f}%",
            fmt(r.tokens_per_s, ",.0f"),
            format_bytes(r.peak_memory_bytes),
            format_bytes(r.state_bytes),
            format_ratio(r.state_ratio_vs_fp32),
            format_bytes(r.muon_state_bytes),
            format_ratio(r.muon_ratio_vs_fp32),
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
