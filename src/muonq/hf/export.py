"""Write a training checkpoint as a Hugging Face model folder.

The folder holds ``config.json`` (``LlamaForCausalLM`` or ``GPT2LMHeadModel``, BOS/EOS ids from the
dataset's meta.json), ``model.safetensors``, ``generation_config.json`` and the tokenizer the data
was prepared with, so ``AutoModelForCausalLM.from_pretrained(DIR)`` and ``AutoTokenizer`` load it
and give the same logits as the framework's model. The command line is ``python -m muonq.export``.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import torch

from muonq.checkpoints import LoadedCheckpoint, build_from_checkpoint, load_checkpoint
from muonq.cli import UsageError
from muonq.errors import MissingInputError, UserError
from muonq.hf.tokenizer import hf_tokenizer, special_ids


def read_meta(folder: pathlib.Path) -> dict[str, Any]:
    meta_file = folder / "meta.json"
    if not meta_file.is_file():
        raise MissingInputError(f"{folder}: no meta.json (prepare the dataset with process_data.py, or pass data=FOLDER)")
    try:
        return json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{meta_file}: not valid JSON ({err})") from err


def to_hf_model(model: torch.nn.Module, *, bos: int | None, eos: int | None) -> Any:
    """The transformers model (LlamaForCausalLM / GPT2LMHeadModel) holding ``model``'s weights."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    from muonq.models.hf import hf_config, to_hf_state_dict

    config = hf_config(model.cfg)
    config.bos_token_id, config.eos_token_id = bos, eos
    hf = AutoModelForCausalLM.from_config(config)
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model), strict=False)
    tied = {"lm_head.weight"} if model.cfg.model_type == "gpt" else set()
    # the export map covers every weight of both families: a gap is a bug in muonq.models.hf
    assert not (set(missing) - tied or unexpected), (
        f"weights do not map onto {type(hf).__name__}: missing {sorted(set(missing) - tied)}, unexpected {unexpected}")
    hf.tie_weights()
    hf.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    return hf.eval()


def export(checkpoint: str | pathlib.Path, out: str | pathlib.Path, *, data: pathlib.Path | None = None,
           with_tokenizer: bool = True, dtype: str = "float32", ckpt: LoadedCheckpoint | None = None) -> pathlib.Path:
    """Write the Hugging Face folder ``out`` for ``checkpoint``; ``data`` is the dataset folder whose
    tokenizer and BOS/EOS ids go with it (None: no tokenizer, no BOS/EOS)."""
    if dtype not in ("float32", "bfloat16", "float16"):
        raise UsageError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    ckpt = ckpt or load_checkpoint(checkpoint)
    model = build_from_checkpoint(ckpt)
    meta = read_meta(data) if data is not None else {}
    if meta and meta.get("vocab_size", 0) > model.cfg.vocab_size:
        raise UserError(f"{data}: vocab {meta['vocab_size']} is larger than the model's {model.cfg.vocab_size}: not this model's data")
    tokenizer = hf_tokenizer(meta, data) if with_tokenizer and data is not None else None
    bos, eos = special_ids(meta) if meta else (None, None)
    hf = to_hf_model(model, bos=bos, eos=eos)
    hf = hf.to(getattr(torch, dtype))
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    info = {"checkpoint": str(ckpt.path), "step": ckpt.step, "optimizer": ckpt.payload.get("optimizer_name"),
            "model_config": ckpt.model_config, "dataset": str(data) if data else None,
            "tokenizer": meta.get("tokenizer") if tokenizer is not None else None, "dtype": dtype}
    (out / "muonq_export.json").write_text(json.dumps(info, indent=1))
    return out
