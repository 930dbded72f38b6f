"""Command line: export a training checkpoint as a Hugging Face model folder (the work is in
``muonq.hf.export``; what the folder holds is said there).

    python -m muonq.export checkpoint=checkpoints/llama-tiny_muonq out=hf/llama-tiny_muonq
    python -m muonq.export checkpoint=PATH out=DIR dataset=fineweb100B tokenizer=llama2 data_dir=/data
"""

from __future__ import annotations

import pathlib
import sys

from muonq.checkpoints import dataset_folder, load_checkpoint
from muonq.cli import UsageError, parse_args, run_cli
from muonq.errors import MissingInputError
from muonq.hf.export import export

USAGE = """\
usage: python -m muonq.export checkpoint=PATH out=DIR [dataset=NAME tokenizer=TOK data_dir=DIR | data=FOLDER]
                              [dtype=float32|bfloat16|float16]

  checkpoint=PATH   a checkpoint: checkpoints/<run>/ (its newest intact step), a step_XXXXXX/ folder or main.pt
  out=DIR           the Hugging Face model folder to write
  dataset=, tokenizer=, data_dir=
                    the prepared dataset whose tokenizer and BOS/EOS ids go with the model (folder
                    $DATA_DIR/<dataset>-<tokenizer tag>); default: the run's, where the checkpoint
                    records it, else tiny_shakespeare / bpe-8192
  data=FOLDER       the dataset folder itself, instead of the three above
  tokenizer=none    export the model alone, without a tokenizer
  dtype=float32     weight dtype in the safetensors file (training keeps fp32 weights)
"""


def main(argv: list[str]) -> int:
    values, _ = parse_args(argv, keys={"checkpoint": None, "out": None, "dataset": None, "tokenizer": None,
                                       "data_dir": None, "data": None, "dtype": "float32"})
    if not values["checkpoint"] or not values["out"]:
        raise UsageError("checkpoint= and out= are required")
    ckpt = load_checkpoint(str(values["checkpoint"]))
    with_tokenizer = not (isinstance(values["tokenizer"], str) and values["tokenizer"].lower() == "none")
    if with_tokenizer:
        data, how = dataset_folder(ckpt, data=values["data"], dataset=values["dataset"],
                                   tokenizer=values["tokenizer"], data_dir=values["data_dir"])
        if not data.is_dir():
            raise MissingInputError(f"dataset folder {data} not found ({how}); pass dataset= tokenizer= data_dir=, "
                                    "data=FOLDER, or tokenizer=none to export without a tokenizer")
    else:  # the model alone; BOS/EOS ids still come from data=FOLDER when given
        data, how = (pathlib.Path(str(values["data"])), "data=") if values["data"] else (None, "")
    out = export(ckpt.path, str(values["out"]), data=data, with_tokenizer=with_tokenizer, dtype=str(values["dtype"]), ckpt=ckpt)
    print(f"exported {ckpt.path} (step {ckpt.step}, {ckpt.model_config['model_type']}) -> {out}")
    if data is not None:
        print(f"tokenizer and BOS/EOS from {data} ({how})" if with_tokenizer else f"BOS/EOS from {data} ({how})")
    return 0


def cli() -> int:
    return run_cli(main, USAGE)


if __name__ == "__main__":
    sys.exit(cli())
