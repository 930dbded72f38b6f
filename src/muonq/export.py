"""Export a training checkpoint as a Hugging Face model folder.

    python -m muonq.export checkpoint=checkpoints/llama-tiny_muonq out=hf/llama-tiny_muonq
    python -m muonq.export checkpoint=PATH out=DIR dataset=fineweb100B tokenizer=llama2 data_dir=/data

The folder holds ``config.json`` (``LlamaForCausalLM`` or ``GPT2LMHeadModel``, BOS/EOS ids from the
dataset's meta.json), ``model.safetensors``, ``generation_config.json`` and the tokenizer the data
was prepared with, so ``AutoModelForCausalLM.from_pretrained(DIR)`` and ``AutoTokenizer`` load it
and give the same logits as the framework's model.
"""

from __future__ import annotations

import json
import pathlib
import sys
from dataclasses import dataclass
from typing import Any

import torch

from muonq.cli import UsageError, parse_args, run_cli

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

DEFAULT_DATASET = ("tiny_shakespeare", "bpe-8192")


# -- checkpoints -------------------------------------------------------------------------------
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
    """The ``main.pt`` that ``path`` names: the file, a step folder, or a run's checkpoint folder
    (its newest intact step, checksums verified)."""
    from muonq.train.checkpoint import CheckpointManager

    path = pathlib.Path(path).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} not found")
    if (path / "main.pt").is_file():
        return path / "main.pt"
    manager = CheckpointManager(path)
    if not manager.steps():
        raise FileNotFoundError(f"{path} holds no checkpoint (no main.pt, no step_XXXXXX/ folders)")
    step = manager.latest_valid()
    if step is None:
        raise FileNotFoundError(f"{path}: every checkpoint is incomplete or corrupt")
    return manager.step_dir(step) / "main.pt"


def load_checkpoint(path: str | pathlib.Path) -> LoadedCheckpoint:
    file = resolve_checkpoint(path)
    payload = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or "model" not in payload or "model_config" not in payload:
        raise ValueError(f"{file} is not a MuonQ training checkpoint (no model / model_config)")
    return LoadedCheckpoint(file, payload)


def build_from_checkpoint(ckpt: LoadedCheckpoint) -> torch.nn.Module:
    """The framework's model with the checkpoint's weights, in eval mode on the CPU."""
    from muonq.config import ModelConfig
    from muonq.models import build_model

    model = build_model(ModelConfig(**ckpt.model_config))
    model.load_state_dict(ckpt.payload["model"])
    return model.eval()


# -- datasets ----------------------------------------------------------------------------------
def dataset_folder(values: dict[str, Any], ckpt: LoadedCheckpoint) -> tuple[pathlib.Path, str]:
    """(dataset folder, how it was chosen) from data=, dataset=/tokenizer=/data_dir=, the run config."""
    from muonq.data import dataset_dir

    if values.get("data"):
        return pathlib.Path(str(values["data"])).expanduser().absolute(), "data="
    run = ckpt.run_config or {}
    recorded = run.get("recipe", {}).get("dataset", {}) if isinstance(run.get("recipe"), dict) else {}
    name = values.get("dataset") or recorded.get("name")
    tokenizer = values.get("tokenizer") or recorded.get("tokenizer")
    data_dir = values.get("data_dir") or run.get("data_dir")
    how = "arguments" if values.get("dataset") or values.get("tokenizer") else "the checkpoint's run config"
    if not name or not tokenizer:
        how = f"default {DEFAULT_DATASET[0]}-{DEFAULT_DATASET[1]} (the checkpoint does not record its dataset; pass dataset= tokenizer=)"
        name, tokenizer = name or DEFAULT_DATASET[0], tokenizer or DEFAULT_DATASET[1]
    return dataset_dir(data_dir, str(name), str(tokenizer)), how


def read_meta(folder: pathlib.Path) -> dict[str, Any]:
    meta_file = folder / "meta.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{folder}: no meta.json (prepare the dataset with process_data.py, or pass data=FOLDER)")
    return json.loads(meta_file.read_text())


def special_ids(meta: dict[str, Any]) -> tuple[int | None, int | None]:
    """(bos, eos) for the HF config: the dataset's; without a BOS (byte-level BPE, GPT-2) the EOS
    doubles as BOS, GPT-2's convention."""
    eos = meta.get("eos_id")
    bos = meta.get("bos_id")
    return (bos if bos is not None else eos), eos


# -- tokenizers --------------------------------------------------------------------------------
def hf_tokenizer(meta: dict[str, Any], folder: pathlib.Path) -> Any:
    """A transformers tokenizer that encodes text exactly as the data was encoded (no BOS/EOS added,
    special-token text kept as text)."""
    from muonq.data.tokenizers import BPE_FILE, _ByteLevelBPE, _HuggingFace, _SentencePiece, _Tiktoken, load_tokenizer

    spec = meta.get("tokenizer")
    if not spec:
        raise ValueError(f"{folder}/meta.json does not name its tokenizer; pass tokenizer=none to export the model alone")
    tok = load_tokenizer(spec, folder=folder)
    bos, eos = special_ids(meta)
    if isinstance(tok, _HuggingFace):
        return tok.tokenizer
    if isinstance(tok, _ByteLevelBPE):
        from transformers import PreTrainedTokenizerFast

        hf = PreTrainedTokenizerFast(tokenizer_file=str(folder / BPE_FILE), split_special_tokens=True)
        return _set_specials(hf, bos, eos)
    if isinstance(tok, _Tiktoken):
        return _tiktoken_gpt2(bos, eos)
    if isinstance(tok, _SentencePiece):
        return _set_specials(_sentencepiece(tok.processor, spec), bos, eos)
    raise ValueError(f"no Hugging Face conversion for tokenizer {spec!r} ({type(tok).__name__})")


def _set_specials(hf: Any, bos: int | None, eos: int | None) -> Any:
    kwargs = {}
    if eos is not None:
        kwargs["eos_token"] = hf.convert_ids_to_tokens(eos)
    if bos is not None:
        kwargs["bos_token"] = hf.convert_ids_to_tokens(bos)
    if kwargs:
        hf.add_special_tokens(kwargs)
    return hf


def _tiktoken_gpt2(bos: int | None, eos: int | None) -> Any:
    """GPT-2's vocabulary (the tiktoken file the data used) as a fast HF tokenizer."""
    from tiktoken_ext.openai_public import r50k_pat_str
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from muonq.data import assets

    backend = TikTokenConverter(vocab_file=str(assets.gpt2_tiktoken_path()), pattern=r50k_pat_str, extra_special_tokens=["<|endoftext|>"]).converted()
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, split_special_tokens=True)
    return _set_specials(hf, bos, eos)


def _sentencepiece(processor: Any, spec: str) -> Any:
    """A fast tokenizer with the SentencePiece BPE model's exact segmentation.

    transformers' own conversion (LlamaTokenizer) differs from SentencePiece on runs of spaces and
    on leading spaces: it ranks BPE merges by id where SentencePiece ranks by score (whitespace-only
    pieces come last), and it does not split words where SentencePiece does. Here the merges follow
    the scores, and a pre-tokenizer starts a word at the first space of each run, as SentencePiece
    does. It is saved as a generic fast tokenizer so that loading does not rebuild the pipeline.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    p = processor
    if p.get_piece_size() and not any(p.is_byte(i) for i in range(min(p.get_piece_size(), 512))):
        raise ValueError(f"{spec}: only SentencePiece BPE models with byte fallback (LLaMA layout) are converted")
    vocab = {p.id_to_piece(i): i for i in range(p.get_piece_size())}
    normal = [i for i in range(p.get_piece_size()) if not (p.is_unknown(i) or p.is_control(i) or p.is_byte(i))]
    merges = []
    for i in sorted(normal, key=lambda i: (-p.get_score(i), i)):
        piece = p.id_to_piece(i)
        pairs = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        merges.extend(sorted(pairs, key=lambda lr: (vocab[lr[0]], vocab[lr[1]])))
    unk = p.id_to_piece(p.unk_id())
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("▁+[^▁]*|[^▁]+"), behavior="isolated")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    specials = {"unk_token": unk}
    if p.bos_id() >= 0:
        specials["bos_token"] = p.id_to_piece(p.bos_id())
    if p.eos_id() >= 0:
        specials["eos_token"] = p.id_to_piece(p.eos_id())
    return PreTrainedTokenizerFast(tokenizer_object=backend, split_special_tokens=True, **specials)


# -- export ------------------------------------------------------------------------------------
def to_hf_model(model: torch.nn.Module, *, bos: int | None, eos: int | None) -> Any:
    """The transformers model (LlamaForCausalLM / GPT2LMHeadModel) holding ``model``'s weights."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    from muonq.models.hf import hf_config, to_hf_state_dict

    config = hf_config(model.cfg)
    config.bos_token_id, config.eos_token_id = bos, eos
    hf = AutoModelForCausalLM.from_config(config)
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model), strict=False)
    tied = {"lm_head.weight"} if model.cfg.model_type == "gpt" else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"weights do not map onto {type(hf).__name__}: missing {sorted(set(missing) - tied)}, unexpected {unexpected}")
    hf.tie_weights()
    hf.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    return hf.eval()


def export(checkpoint: str | pathlib.Path, out: str | pathlib.Path, *, data: pathlib.Path | None = None,
           with_tokenizer: bool = True, dtype: str = "float32", ckpt: LoadedCheckpoint | None = None) -> pathlib.Path:
    """Write the Hugging Face folder ``out`` for ``checkpoint``; ``data`` is the dataset folder whose
    tokenizer and BOS/EOS ids go with it (None: no tokenizer, no BOS/EOS)."""
    ckpt = ckpt or load_checkpoint(checkpoint)
    model = build_from_checkpoint(ckpt)
    meta = read_meta(data) if data is not None else {}
    if meta and meta.get("vocab_size", 0) > model.cfg.vocab_size:
        raise ValueError(f"{data}: vocab {meta['vocab_size']} is larger than the model's {model.cfg.vocab_size}: not this model's data")
    tokenizer = hf_tokenizer(meta, data) if with_tokenizer and data is not None else None
    bos, eos = special_ids(meta) if meta else (None, None)
    hf = to_hf_model(model, bos=bos, eos=eos)
    if dtype not in ("float32", "bfloat16", "float16"):
        raise UsageError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
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


def main(argv: list[str]) -> int:
    values, _ = parse_args(argv, keys={"checkpoint": None, "out": None, "dataset": None, "tokenizer": None,
                                       "data_dir": None, "data": None, "dtype": "float32"})
    if not values["checkpoint"] or not values["out"]:
        raise UsageError("checkpoint= and out= are required")
    ckpt = load_checkpoint(str(values["checkpoint"]))
    with_tokenizer = not (isinstance(values["tokenizer"], str) and values["tokenizer"].lower() == "none")
    if with_tokenizer:
        data, how = dataset_folder(values, ckpt)
        if not data.is_dir():
            raise FileNotFoundError(f"dataset folder {data} not found ({how}); pass dataset= tokenizer= data_dir=, "
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
