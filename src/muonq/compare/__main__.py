"""The command line of ``python -m muonq.compare`` (see the package docstring and ``--help``)."""

from __future__ import annotations

import shlex
import sys
from datetime import datetime
from pathlib import Path

from muonq.cli import UsageError, as_list, parse_args, run_cli
from muonq.compare.orchestrate import plan_runs, run_all
from muonq.compare.report import host_description, write_report
from muonq.compare.runs import load_run
from muonq.compare.table import markdown_table, target_checks

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

    results, failed = run_all(planned, rerun=bool(values["rerun"]), verbose=bool(values["verbose"]),
                              threads=threads, nproc=nproc)
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
