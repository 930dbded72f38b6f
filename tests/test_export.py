"""Export to a Hugging Face folder: transformers loads it and gives the framework's logits; the
tokenizer encodes text exactly as the data was encoded."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch

from .conftest import TINY, run_tool, run_training

FAMILIES = {  # recipe, HF class
    "llama": ("llama-tiny", "LlamaForCausalLM"),
    "gpt": ("gpt-tiny", "GPT2LMHeadModel"),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, shakespeare_data):
    """A 2-step checkpoint of each model family, saved by the trainer."""
    root = tmp_path_factory.mktemp("ckpt")
    found = {}
    for family, (recipe, _) in FAMILIES.items():
        ckpt_dir = root / f"ckpt_{family}"
        proc, _ = run_training(
            root / f"run_{family}", shakespeare_data, f"recipe={recipe}", *TINY, "optimizer_params=muon",
            "recipe.training_params.max_steps=2", "logging_params.save_checkpoint=true",
            f"logging_params.checkpoint_dir={ckpt_dir}",
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        found[family] = ckpt_dir
    return found


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_round_trip_logits(tmp_path, checkpoints, shakespeare_data, family) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from muonq.checkpoints import build_from_checkpoint, load_checkpoint
    from muonq.data.tokenizers import load_tokenizer

    out = tmp_path / "hf"
    proc = run_tool("muonq.export", f"checkpoint={checkpoints[family]}", f"out={out}", f"data_dir={shakespeare_data}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name

    data = shakespeare_data / "tiny_shakespeare-bpe-8192"
    meta = json.loads((data / "meta.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [FAMILIES[family][1]]
    assert config["eos_token_id"] == meta["eos_id"]
    assert config["bos_token_id"] == (meta["bos_id"] if meta["bos_id"] is not None else meta["eos_id"])

    ours = build_from_checkpoint(load_checkpoint(checkpoints[family]))
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == FAMILIES[family][1]
    idx = torch.randint(0, ours.cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx), atol=1e-5, rtol=1e-5)

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.eos_token_id == meta["eos_id"]
    reference = load_tokenizer("bpe-8192", folder=data)
    texts = ["ROMEO:\nBut soft, what light through yonder window breaks?", "  two  spaces <|endoftext|> kept as text", ""]
    assert tokenizer(texts, add_special_tokens=False)["input_ids"] == reference.encode_batch(texts)


def test_export_bfloat16_and_no_tokenizer(tmp_path, checkpoints) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "hf"
    proc = run_tool("muonq.export", f"checkpoint={checkpoints['llama']}", f"out={out}", "tokenizer=none", "dtype=bfloat16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (out / "tokenizer.json").exists()
    hf = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert hf.model.embed_tokens.weight.dtype == torch.bfloat16


def test_export_cli_errors_in_one_line(tmp_path) -> None:
    proc = run_tool("muonq.export", f"checkpoint={tmp_path / 'nope'}", f"out={tmp_path / 'o'}", timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: checkpoint") and "not found" in proc.stderr
    proc = run_tool("muonq.export", "checkpoint=x", timeout=300)
    assert proc.returncode == 2 and "out= are required" in proc.stderr


@pytest.mark.parametrize("what", ["flipped", "not-a-checkpoint"])
def test_export_refuses_a_corrupt_checkpoint_or_another_file(tmp_path, checkpoints, shakespeare_data, what) -> None:
    """A step folder whose main.pt does not match its manifest, or a file that is no checkpoint
    at all: one line naming it, exit 2, nothing exported."""
    from .test_evaluate import damaged_copy

    if what == "flipped":
        source = damaged_copy(checkpoints["llama"], tmp_path, "flipped")
        message = r"is corrupt or incomplete \(checksum mismatch in main\.pt\)"
    else:
        source = shakespeare_data / "tiny_shakespeare-bpe-8192" / "meta.json"
        message = r"meta\.json is not a MuonQ checkpoint"
    out = tmp_path / "hf"
    proc = run_tool("muonq.export", f"checkpoint={source}", f"out={out}", f"data_dir={shakespeare_data}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and re.search(message, last), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not out.exists()


def _tricky_texts(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    pieces = list("ab cd  e\n\tüé.,'\"-") + ["the", " the", "  ", "   ", "Hello", "ROMEO:", "</s>", "<s>",
                                             "<|endoftext|>", "漢字", "🙂", "\u3000", "\r\n", "\u00a0"]
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 50))) for _ in range(n)] + ["", " ", "  x", "end  "]


def _offline_tokenizer(spec: str):
    from muonq.data.tokenizers import load_tokenizer

    try:
        return load_tokenizer(spec)
    except Exception as err:  # noqa: BLE001 - the PyPI archive is neither cached nor downloadable here
        pytest.skip(f"{spec} unavailable: {err}")


@pytest.mark.parametrize("spec, meta", [("mistral-v1", {"bos_id": 1, "eos_id": 2}), ("gpt2", {"bos_id": None, "eos_id": 50256})])
def test_exported_tokenizer_matches_data_tokenizer(tmp_path, spec, meta) -> None:
    """SentencePiece (mistral-v1) and tiktoken (gpt2) datasets: the HF tokenizer written by export
    segments text exactly like the tokenizer that prepared the data, and decodes it back."""
    from transformers import AutoTokenizer

    from muonq.hf.tokenizer import hf_tokenizer

    reference = _offline_tokenizer(spec)
    hf_tokenizer({"tokenizer": spec, **meta}, tmp_path).save_pretrained(tmp_path / "tok")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok")
    texts = _tricky_texts(0, 2000)
    expected = reference.encode_batch(texts)
    got = tokenizer(texts, add_special_tokens=False)["input_ids"]
    mismatches = [(t, e, g) for t, e, g in zip(texts, expected, got) if e != g]
    assert not mismatches, mismatches[:3]
    assert tokenizer.eos_token_id == meta["eos_id"]
    assert tokenizer.bos_token_id == (meta["bos_id"] if meta["bos_id"] is not None else meta["eos_id"])
    for ids in expected[:200]:
        assert tokenizer.decode(ids) == reference.decode(ids)
