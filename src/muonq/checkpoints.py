"""A run's checkpoint, as the tools read it: find and verify its ``main.pt`` (always against its
step folder's manifest, whether a run folder, a step folder or the file is named), load it,
rebuild the framework's model with its weights, and what it records of its run (dataset, window
layout, precision). Used by ``muonq.evaluate``, ``muonq.export`` and the library behind them."""

from __future__ import annotations

import pathlib
from dataclasses import dataclass
from typing import Any

import torch

from muonq.errors import MissingInputError, UserError

DEFAULT_DATASET = ("tiny_shakespeare", "bpe-8192")


@dataclass
class LoadedCheckpoint:
    path: pathlib.Path  # the .pt file
    payload: dict[str, Any]

    @property
    def step(self) -> int | None:
        return self.payload.get("step")

    @property
    def model_config(self) -> dict[str, Any]:
        return self.payload["model_config"]

    @property
    def run_config(self) -> dict[str, Any] | None:
        """The whole run config, where the trainer recorded it in the checkpoint."""
        cfg = self.payload.get("config")
        return cfg if isinstance(cfg, dict) else None


def resolve_checkpoint(path: str | pathlib.Path) -> pathlib.Path:
    """The verified ``main.pt`` that ``path`` names: the file itself, its step folder, or a run's
    checkpoint folder (its newest intact step). Whatever is named, the step folder's manifest
    must be there and every checksum in it must match; anything else is a :class:`UserError`."""
    from muonq.train.checkpoint import MAIN, MANIFEST, CheckpointManager, every_checkpoint_rejected, verify_folder

    path = pathlib.Path(path).expanduser()
    if path.is_file():
        if path.name != MAIN or not (path.parent / MANIFEST).is_file():
            raise UserError(f"{path} is not a MuonQ checkpoint: pass a step_XXXXXX/ folder (its {MAIN} and "
                            f"{MANIFEST}) or the run's checkpoint folder")
        folder = path.parent
    elif not path.is_dir():
        raise MissingInputError(f"checkpoint {path} not found")
    elif (path / MAIN).is_file() or (path / MANIFEST).is_file():
        folder = path
    else:
        manager = CheckpointManager(path)
        if not manager.steps():
            raise MissingInputError(f"{path} holds no checkpoint (no {MAIN}, no step_XXXXXX/ folders)")
        step, rejected = manager.newest_intact()
        if step is None:
            raise UserError(every_checkpoint_rejected(path, rejected))
        return manager.step_dir(step) / MAIN
    problem = verify_folder(folder)
    if problem is not None:
        raise UserError(f"checkpoint {folder} is corrupt or incomplete ({problem})")
    return folder / MAIN


def load_checkpoint(path: str | pathlib.Path) -> LoadedCheckpoint:
    from muonq.train.checkpoint import read_file

    file = resolve_checkpoint(path)
    payload = read_file(file)
    if not isinstance(payload, dict) or not {"model", "model_shards"} & set(payload) or "model_config" not in payload:
        raise UserError(f"{file} is not a MuonQ training checkpoint (no model / model_config)")
    return LoadedCheckpoint(file, payload)


def build_from_checkpoint(ckpt: LoadedCheckpoint) -> torch.nn.Module:
    """The framework's model with the checkpoint's weights (whole in ``main.pt``, or put together
    from the rows that FSDP ranks wrote), in eval mode on the CPU."""
    from muonq.config import ModelConfig
    from muonq.models import build_model
    from muonq.train.checkpoint import read_listed
    from muonq.train.model_rows import checkpoint_shards, load_weights

    model = build_model(ModelConfig(**ckpt.model_config))
    try:
        load_weights(model, checkpoint_shards(ckpt.payload, lambda name: read_listed(ckpt.path.parent, name, mmap=True)))
    except ValueError as err:
        raise UserError(f"{ckpt.path}: {err}") from err
    return model.eval()


# -- what the checkpoint records of its run ----------------------------------------------------
def dataset_folder(ckpt: LoadedCheckpoint, *, data: Any = None, dataset: Any = None, tokenizer: Any = None,
                   data_dir: Any = None) -> tuple[pathlib.Path, str]:
    """(dataset folder, how it was chosen): ``data`` (the folder itself), else ``dataset`` /
    ``tokenizer`` / ``data_dir``, each falling back on the run config, else the default dataset."""
    from muonq.data import dataset_dir

    if data:
        return pathlib.Path(str(data)).expanduser().absolute(), "data="
    run = ckpt.run_config or {}
    recorded = run.get("recipe", {}).get("dataset", {}) if isinstance(run.get("recipe"), dict) else {}
    name = dataset or recorded.get("name")
    tok = tokenizer or recorded.get("tokenizer")
    data_dir = data_dir or run.get("data_dir")
    how = "arguments" if dataset or tokenizer else "the checkpoint's run config"
    if not name or not tok:
        how = f"default {DEFAULT_DATASET[0]}-{DEFAULT_DATASET[1]} (the checkpoint does not record its dataset; pass dataset= tokenizer=)"
        name, tok = name or DEFAULT_DATASET[0], tok or DEFAULT_DATASET[1]
    return dataset_dir(data_dir, str(name), str(tok)), how


def recorded_layout(ckpt: LoadedCheckpoint) -> tuple[int | None, int | None, str]:
    """(seq_len, batch_size) of the run where the checkpoint records them."""
    run = ckpt.run_config or {}
    tp = (run.get("recipe") or {}).get("training_params") or {}
    seq_len = tp.get("context_length") or (ckpt.payload.get("loader") or {}).get("seq_len")
    batch = tp.get("batch_size")
    world = ckpt.payload.get("world_size") or run.get("world_size") or 1
    return seq_len, (batch * world if batch else None), "run config" if tp else "loader state"


def recorded_precision(ckpt: LoadedCheckpoint) -> tuple[bool, str]:
    """(autocast, mixed_precision) of the run's ``recipe.training_params`` where the checkpoint
    records them, else the defaults: the forward passes run in the precision they trained in."""
    from muonq.config import TrainingParams

    tp = ((ckpt.run_config or {}).get("recipe") or {}).get("training_params") or {}
    return bool(tp.get("autocast", TrainingParams.autocast)), str(tp.get("mixed_precision", TrainingParams.mixed_precision))
