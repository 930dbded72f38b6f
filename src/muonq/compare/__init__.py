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

Modules: ``runs`` (a run folder into a :class:`~muonq.compare.runs.RunResult`), ``table`` (the
Markdown table and the target checks), ``plots`` (the PNG figures), ``report`` (report.md and
report.json), ``orchestrate`` (plan, train and reuse the runs), ``__main__`` (the command line).
"""
