"""What ``run_hydra.py`` does around Hydra: one output folder for all ranks, checks, then training."""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from muonq.config import ConfigError, checkpoint_dir_for, register_configs, validate
from muonq.environment import load_dotenv_once, wandb_logged_in, wandb_mode
from muonq.errors import AgreedUserError, UserError
from muonq.exit_codes import EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_PREEMPTED
from muonq.run_log import LOG_DIR
from muonq.train.orphans import end_with_launcher
from muonq.writable import check_writable_dir

if TYPE_CHECKING:
    from muonq.train.trainer import Trainer

log = logging.getLogger("muonq")


def prepare_argv(argv: list[str]) -> None:
    """Make every torchrun rank agree on one Hydra output folder, written by rank 0 alone.

    Hydra names its folder from the clock, which differs between processes. Under torchrun the
    folder is named from ``MUONQ_RUN_DIR`` (run.sh sets it) or the rendezvous run id, which all
    ranks share; ranks other than 0 skip ``.hydra/`` and Hydra's log file. A torchrun worker also
    ends when torchrun dies (:mod:`muonq.train.orphans`).
    """
    end_with_launcher()
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


def run_name_for(cfg: DictConfig, recipe: str | None = None) -> str:
    """``run_name``, else the W&B name, else ``<recipe>_<optimizer>`` (``recipe``: the recipe
    chosen on the command line; by default read from Hydra's runtime config)."""
    if cfg.run_name:
        return str(cfg.run_name)
    if cfg.logging_params.wandb.get("name"):
        return str(cfg.logging_params.wandb.name)
    if recipe is None:
        recipe = HydraConfig.get().runtime.choices.get("recipe", "recipe")
    return f"{recipe}_{cfg.optimizer_params.name}"


_preflight_done = False


def preflight(cfg: DictConfig, *, run_dir: Path, run_name: str) -> None:
    """Every check that needs no model, no process group and no checkpoint: config values, the
    device, the dataset's files, vocab and sizes, the folders the run writes, W&B credentials.
    Bad input raises :class:`UserError`. Every rank reaches the same verdict."""
    from muonq.data import check_dataset, dataset_dir, require_windows, resolve_data_dir
    from muonq.train.distributed import pick_device, world_size_from_env

    world = world_size_from_env()
    validate(cfg, world_size=world)
    # the highest local rank of this node: a GPU missing for one rank fails every rank alike
    pick_device(cfg.device, int(os.environ.get("LOCAL_WORLD_SIZE", "1")) - 1)
    tp, ds = cfg.recipe.training_params, cfg.recipe.dataset
    folder = dataset_dir(resolve_data_dir(cfg.data_dir), ds.name, ds.tokenizer)
    check_dataset(folder, seq_len=tp.context_length, model_vocab_size=cfg.recipe.model.vocab_size)
    require_windows(folder, "train", seq_len=tp.context_length, windows=tp.tokens_processed // tp.context_length,
                    what=f"one optimizer step, recipe.training_params.tokens_processed / context_length = "
                         f"{tp.tokens_processed} / {tp.context_length}", hint="lower tokens_processed or prepare more data")
    require_windows(folder, "val", seq_len=tp.context_length, windows=tp.batch_size * world,
                    what=f"one validation batch, recipe.training_params.batch_size x ranks = {tp.batch_size} x {world}",
                    hint="lower batch_size or prepare a larger validation split (process_data.py --val-fraction)")
    check_writable_dir(run_dir, "hydra.run.dir")
    check_writable_dir(checkpoint_dir_for(cfg, run_name), "logging_params.checkpoint_dir")
    check_writable_dir(LOG_DIR, "the log folder")
    if wandb_mode() == "online" and not wandb_logged_in():
        raise UserError("WANDB_MODE=online needs WANDB_API_KEY (in .env or the environment) or `wandb login`; "
                        "or set WANDB_MODE=offline")


# How long a torchrun worker that leaves an error to local rank 0 waits before exiting: torchrun
# ends the other workers as soon as one exits, which could end rank 0 before it printed.
_QUIET_EXIT_DELAY_S = 2.0


def _report_user_error(err: UserError, *, every_rank_alike: bool) -> None:
    """Print ``err`` in one line: once per node (local rank 0) when every rank raised it alike."""
    if every_rank_alike and os.environ.get("LOCAL_RANK", "0") != "0":
        time.sleep(_QUIET_EXIT_DELAY_S)
        return
    print(f"{'config error' if isinstance(err, ConfigError) else 'error'}: {err}", file=sys.stderr)


def _preflight_or_exit(cfg: DictConfig, *, run_dir: Path, run_name: str) -> None:
    """Bad input ends in one line and exit 2; any other exception is a bug and keeps its traceback.
    Under torchrun every rank fails alike, and only local rank 0 prints (once per node's console)."""
    try:
        preflight(cfg, run_dir=run_dir, run_name=run_name)
    except UserError as err:
        _report_user_error(err, every_rank_alike=True)
        sys.exit(EXIT_BAD_INPUT)


class Preflight(Callback):
    """Hydra callback (``hydra.callbacks.preflight`` in test_hydra.yaml): runs :func:`preflight`
    before Hydra creates the output folder, so bad input leaves nothing on disk."""

    def on_run_start(self, config: DictConfig, **kwargs: object) -> None:
        global _preflight_done
        cfg = OmegaConf.masked_copy(config, [k for k in config.keys() if k != "hydra"])
        recipe = config.hydra.runtime.choices.get("recipe", "recipe")
        _preflight_or_exit(cfg, run_dir=Path(config.hydra.run.dir), run_name=run_name_for(cfg, recipe))
        _preflight_done = True


def _check_steps_left(done: int, total: int, checkpoint: Path) -> None:
    """A checkpoint past the run's last step would train nothing and report a final loss of
    another run's length: refuse it."""
    if done > total:
        raise UserError(
            f"{checkpoint} is at step {done}, past this run's {total} steps (recipe.training_params.max_steps, "
            "recipe.dataset.total_tokens_B): raise them to train on from it, or start over with resume=false"
        )


def run(cfg: DictConfig) -> dict:
    from muonq.train.distributed import shutdown

    global _preflight_done
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if not _preflight_done:  # multirun jobs, or a root config without the callback
        _preflight_or_exit(cfg, run_dir=run_dir, run_name=run_name_for(cfg))
    _preflight_done = False
    from muonq.train.trainer import Trainer

    try:
        # Setup failures caused by the user's input (data, checkpoint, devices, plugins named in
        # MUONQ_PLUGINS, a checkpoint folder in use) end in one line; anything else is a bug: it
        # keeps its traceback.
        trainer = Trainer(cfg, run_name=run_name_for(cfg), run_dir=run_dir)
    except UserError as err:
        _exit_bad_input(err)
    except BaseException:
        shutdown(graceful=False)
        raise
    try:
        summary, exit_code, message = _resume_and_fit(trainer)
    finally:  # every exit: finished, bad input, stopped, non-finite, a bug
        trainer.close()
    is_main = trainer.dist.is_main
    # Free the model (DDP's reducer, FSDP's state), the optimizer and their pending collectives while
    # the process group and the interpreter are alive: reference cycles otherwise keep them until
    # interpreter exit, where tearing down gloo's threads can abort a rank after a finished run.
    del trainer
    gc.collect()
    shutdown()
    if is_main and message:
        print(message, file=sys.stderr)
    if exit_code:
        sys.exit(exit_code)
    if is_main and summary is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary or {}


def _exit_bad_input(err: UserError) -> NoReturn:
    from muonq.train.distributed import shutdown

    shutdown(graceful=False)
    _report_user_error(err, every_rank_alike=isinstance(err, AgreedUserError))
    sys.exit(EXIT_BAD_INPUT)


def _resume_and_fit(trainer: Trainer) -> tuple[dict | None, int, str]:
    """(the run's summary or None, its exit code, what rank 0 prints at the end). Bad input exits
    here; a bug propagates after the process group is left."""
    from muonq.train.distributed import shutdown
    from muonq.train.guard import StopRequested
    from muonq.train.trainer import NonFiniteError

    try:
        if trainer.maybe_resume():
            _check_steps_left(trainer.state.step, trainer.total_steps, trainer.checkpointer.step_dir(trainer.state.step))
    except UserError as err:
        _exit_bad_input(err)
    except BaseException:
        shutdown(graceful=False)
        raise
    if trainer.state.step == trainer.total_steps:  # resumed from the run's final checkpoint: a repeated command
        return None, 0, (f"nothing to train: {trainer.checkpointer.step_dir(trainer.state.step)} already holds all "
                         f"{trainer.total_steps} steps of this run; raise recipe.training_params.max_steps or "
                         "recipe.dataset.total_tokens_B to train further")
    try:
        return trainer.fit(), 0, ""
    except StopRequested as stop:  # every rank stopped at the same step; the checkpoint is complete
        return None, EXIT_PREEMPTED, str(stop)
    except NonFiniteError as err:
        return None, EXIT_NONFINITE, f"error: {err}"
    except BaseException:
        shutdown(graceful=False)
        raise
