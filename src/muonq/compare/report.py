"""The report folder: report.md (the table, target checks, plots and what each column means) and
report.json (the same numbers), from the runs' results."""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

from muonq.compare.plots import write_plots
from muonq.compare.runs import RunResult, unique_labels
from muonq.compare.table import markdown_table, reference, relative_gap, target_checks


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
    unique_labels(results)
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
        "embeddings, head and norms), the total over all ranks when ZeRO shards it across them, and "
        "*vs fp32 Muon + AdamW* compares it with what fp32 Muon and fp32 AdamW hold on the same model "
        "(4 bytes per hidden-matrix element, 8 per element of the rest); "
        "*Muon-matrix state* is the momentum of the hidden matrices alone (also the total over ranks) and "
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
                        | {"val_ppl": r.val_ppl, "delta_val_vs_muon": relative_gap(r, reference(results))}
                        for r in results],
               "plots": plots}
    (out / "report.json").write_text(json.dumps(payload, indent=1))
    return report
