"""What ``run_hydra.py`` does around Hydra: one output folder for all ranks, checks, then training."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from dotenv import load_dotenv
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from muonq.config import ConfigError, register_configs, validate

log = logging.getLogger("muonq")


def prepare_argv(argv: list[str]) -> None:
    """Make every torchrun rank agree on one Hydra output folder, written by rank 0 alone.

    Hydra names its folder from the clock, which differs between processes. Under torchrun the
    folder is named from ``MUONQ_RUN_DIR`` (run.sh sets it) or the rendezvous run id, which all
    ranks share; ranks other than 0 skip ``.hydra/`` and Hydra's log file.
    """
    load_dotenv(override=False)
    register_configs()
    if "WORLD_SIZE" not in os.environ:
        return
    overrides = [a for a in argv[1:] if not a.startswith("-")]
    if not any(a.startswith("hydra.run.dir=") for a in overrides):
        run_dir = os.environ.get("MUONQ_RUN_DIR") or f"outputs/torchrun/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}"
        argv.append(f"hydra.run.dir={run_dir}")
    if os.environ.get("RANK", "0") != "0":
        argv += ["hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none"]


def run_name_for(cfg: DictConfig) -> str:
    if cfg.run_name:
        return str(cfg.run_name)
    if cfg.logging_params.wandb.get("name"):
        return str(cfg.logging_params.wandb.name)
    recipe = HydraConfig.get().runtime.choices.get("recipe", "recipe")
    return f"{recipe}_{cfg.optimizer_params.name}"


def run(cfg: DictConfig) -> dict:
    from muonq.train.distributed import shutdown, world_size_from_env

    try:
        validate(cfg, world_size=world_size_from_env())
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)
    from muonq.train.trainer import Trainer

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        # Setup failures caused by the user's input (data, checkpoint, devices) end in one line.
        trainer = Trainer(cfg, run_name=run_name_for(cfg), run_dir=run_dir)
        trainer.maybe_resume()
    except (FileNotFoundError, ValueError) as err:
        shutdown(graceful=False)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    try:
        summary = trainer.fit()
    except BaseException:
        shutdown(graceful=False)
        raise
    shutdown()
    if trainer.dist.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
