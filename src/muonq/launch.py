"""What ``run_hydra.py`` does around Hydra: one output folder for all ranks, checks, then training."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from muonq.config import ConfigError, register_configs, validate
from muonq.environment import load_dotenv_once, wandb_logged_in, wandb_mode
from muonq.errors import UserError
from muonq.exit_codes import EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_PREEMPTED

log = logging.getLogger("muonq")


def prepare_argv(argv: list[str]) -> None:
    """Make every torchrun rank agree on one Hydra output folder, written by rank 0 alone.

    Hydra names its folder from the clock, which differs between processes. Under torchrun the
    folder is named from ``MUONQ_RUN_DIR`` (run.sh sets it) or the rendezvous run id, which all
    ranks share; ranks other than 0 skip ``.hydra/`` and Hydra's log file.
    """
    load_dotenv_once()  # .env of the working directory or a parent, as process_data.py reads it
    register_configs()
    if "WORLD_SIZE" not in os.environ:
        return
    if any(a in ("-m", "--multirun") for a in argv[1:]):
        # each job would tear down and re-create the process group, which hangs under torchrun
        print("error: sweeps (-m/--multirun) run outside torchrun, one job after another: "
              "python run_hydra.py -m ... (or loop over torchrun commands)", file=sys.stderr)
        sys.exit(2)
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


_preflight_done = False


def preflight(cfg: DictConfig) -> None:
    """Every check that needs no model, no process group and no checkpoint: config values, the
    device, the dataset's files and vocab, W&B credentials. Bad input raises :class:`UserError`."""
    from muonq.data import check_dataset, dataset_dir, resolve_data_dir
    from muonq.train.distributed import pick_device, world_size_from_env

    validate(cfg, world_size=world_size_from_env())
    pick_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
    tp, ds = cfg.recipe.training_params, cfg.recipe.dataset
    folder = dataset_dir(resolve_data_dir(cfg.data_dir), ds.name, ds.tokenizer)
    check_dataset(folder, seq_len=tp.context_length, model_vocab_size=cfg.recipe.model.vocab_size)
    if wandb_mode() == "online" and not wandb_logged_in():
        raise UserError("WANDB_MODE=online needs WANDB_API_KEY (in .env or the environment) or `wandb login`; "
                        "or set WANDB_MODE=offline")


def _print_user_error(err: UserError) -> None:
    print(f"{'config error' if isinstance(err, ConfigError) else 'error'}: {err}", file=sys.stderr)


def _preflight_or_exit(cfg: DictConfig) -> None:
    """Bad input ends in one line and exit 2; any other exception is a bug and keeps its traceback."""
    try:
        preflight(cfg)
    except UserError as err:
        _print_user_error(err)
        sys.exit(EXIT_BAD_INPUT)


class Preflight(Callback):
    """Hydra callback (``hydra.callbacks.preflight`` in test_hydra.yaml): runs :func:`preflight`
    before Hydra creates the output folder, so bad input leaves nothing on disk."""

    def on_run_start(self, config: DictConfig, **kwargs: object) -> None:
        global _preflight_done
        _preflight_or_exit(OmegaConf.masked_copy(config, [k for k in config.keys() if k != "hydra"]))
        _preflight_done = True


def run(cfg: DictConfig) -> dict:
    from muonq.train.distributed import shutdown

    global _preflight_done
    if not _preflight_done:  # multirun jobs, or a root config without the callback
        _preflight_or_exit(cfg)
    _preflight_done = False
    from muonq.train.guard import StopRequested
    from muonq.train.trainer import NonFiniteError, Trainer

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        # Setup failures caused by the user's input (data, checkpoint, devices, plugins named in
        # MUONQ_PLUGINS) end in one line; anything else is a bug: it keeps its traceback.
        trainer = Trainer(cfg, run_name=run_name_for(cfg), run_dir=run_dir)
        trainer.maybe_resume()
    except UserError as err:
        shutdown(graceful=False)
        _print_user_error(err)
        sys.exit(EXIT_BAD_INPUT)
    except BaseException:
        shutdown(graceful=False)
        raise
    try:
        summary = trainer.fit()
    except StopRequested as stop:  # every rank stopped at the same step; the checkpoint is complete
        shutdown()
        if trainer.dist.is_main:
            print(str(stop), file=sys.stderr)
        sys.exit(EXIT_PREEMPTED)
    except NonFiniteError as err:
        shutdown()
        if trainer.dist.is_main:
            print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_NONFINITE)
    except BaseException:
        shutdown(graceful=False)
        raise
    shutdown()
    if trainer.dist.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
