"""Hydra entry point: ``python run_hydra.py ...`` or ``torchrun --nproc-per-node=N run_hydra.py ...``."""

from __future__ import annotations

import os
import sys

from muonq.launch import prepare_argv

prepare_argv(sys.argv)

import hydra  # noqa: E402  (argv must be prepared before Hydra parses it)
from omegaconf import DictConfig  # noqa: E402

from muonq.launch import run  # noqa: E402


@hydra.main(version_base="1.3", config_path="hydra_conf", config_name="test_hydra")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
