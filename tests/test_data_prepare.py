"""prepare() / process_data.py: the CLI commands, round trips, determinism, resume, bad inputs."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from muonq.data import check_dataset
from muonq.data import writer as writer_module
from muonq.data.prepare import prepare
from muonq.data.shards import list_shards, open_tokens, read_header
from muonq.data.sources import EmbeddedShakespeare, hashed_split
from muonq.data.tokenizers import Tokenizer, load_tokenizer, mistral_v1_path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
REPO = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def works() -> list:
    """The embedded corpus' documents in stream order (validation works first)."""
    return list(EmbeddedShakespeare(val_fraction=0.05).documents())


def chunk_documents(works: list, *, chars: int = 1500) -> list[str]:
    """Shakespeare cut into ~chars-long documents at paragraph breaks: a FineWeb-like corpus."""
    docs, current = [], ""
    for work in works[:12]:
        for para in work.text.split("\n\n"):
            current += para + "\n\n"
            if len(current) >= chars:
                docs.append(current)
                current = ""
    return docs


def write_parquet(folder: pathlib.Path, docs: list[str], *, files: int = 2, row_group: int = 100) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    per = -(-len(docs) // files)
    for i in range(files):
        table = pa.table({"id": list(range(i * per, min(len(docs), (i + 1) * per))), "text": docs[i * per : (i + 1) * per]})
        pq.write_table(table, folder / f"part-{i:02d}.parquet", row_group_size=row_group)
    return str(folder / "*.parquet")


def read_split(folder: pathlib.Path, split: str) -> np.ndarray:
    return np.concatenate([np.asarray(open_tokens(read_header(p)), dtype=np.int64) for p in list_shards(folder, split)])


def decode_documents(tokens: np.ndarray, tok: Tokenizer) -> list[str]:
    """EOS policy "append": every document is followed by exactly one EOS."""
    assert tokens[-1] == tok.eos_id
    ends = np.flatnonzero(tokens == tok.eos_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tok.decode(tokens[s:e].tolist()) for s, e in zip(starts, ends, strict=True)]


def shard_bytes(folder: pathlib.Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for split in ("val", "train") for p in list_shards(folder, split)}


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory, works: list) -> dict:
    """process_data.py: default, --tokenizer gpt2, a parquet --input, and an offline hub tokenizer, side by side."""
    root = tmp_path_factory.mktemp("cli")
    pattern = write_parquet(root / "src", chunk_documents(works))
    commands = {
        "default": [],
        "gpt2": ["--tokenizer", "gpt2"],
        "parquet": ["--input", pattern, "--name", "mydata", "--tokenizer", "bpe-8192"],
        "llama2": ["--tokenizer", "llama2"],
    }
    procs = {
        key: subprocess.Popen(
            [sys.executable, "process_data.py", "--data-dir", str(root / "data"), *args],
            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for key, args in commands.items()
    }  # fmt: skip
    results = {key: (p.wait(timeout=300), *p.communicate()) for key, p in procs.items()}
    return {"root": root, "data": root / "data", "results": results, "pattern": pattern}


def test_default_commands(cli: dict) -> None:
    expected = {
        "default": ("tiny_shakespeare-bpe-8192", 8192),
        "gpt2": ("tiny_shakespeare-gpt2", 50257),
        "parquet": ("mydata-bpe-8192", 8192),
    }
    for key, (folder, vocab) in expected.items():
        code, out, err = cli["results"][key]
        assert code == 0, err
        assert f"wrote {cli['data'] / folder}" in out and "tokens/s" in out
        meta = check_dataset(cli["data"] / folder, seq_len=1024, model_vocab_size=vocab)
        assert meta.vocab_size == vocab and meta.eos_policy == "append" and meta.val_tokens > 0


def test_hub_tokenizer_offline_fails_in_one_line(cli: dict) -> None:
    code, out, err = cli["results"]["llama2"]
    assert code == 1
    [line] = err.strip().splitlines()
    assert line.startswith("process_data.py: error: cannot load tokenizer 'llama2' (meta-llama/Llama-2-7b-hf)")
    assert "offline alternatives: gpt2, mistral-v1, bpe-<vocab>" in line
    assert not (cli["data"] / "tiny_shakespeare-Llama-2-7b-hf").exists()


@pytest.mark.parametrize("tokenizer", ["bpe-8192", "gpt2"])
def test_round_trip_embedded_corpus(cli: dict, works: list, tokenizer: str) -> None:
    folder = cli["data"] / f"tiny_shakespeare-{tokenizer}"
    tok = load_tokenizer(tokenizer, folder=folder)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["splits"]["val"]["documents"] == 2 and meta["splits"]["train"]["documents"] == 40
    assert decode_documents(read_split(folder, "val"), tok) == [d.text for d in works if d.split == "val"]
    assert decode_documents(read_split(folder, "train"), tok) == [d.text for d in works if d.split == "train"]


def test_round_trip_parquet_input(cli: dict, works: list) -> None:
    folder = cli["data"] / "mydata-bpe-8192"
    docs = chunk_documents(works)
    tok = load_tokenizer("bpe-8192", folder=folder)
    for split in ("val", "train"):
        expected = [d for i, d in enumerate(docs) if hashed_split(i, 0.05) == split]
        assert decode_documents(read_split(folder, split), tok) == expected


def test_rerun_is_a_fast_no_op(cli: dict, capsys: pytest.CaptureFixture) -> None:
    folder = cli["data"] / "tiny_shakespeare-gpt2"
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert prepare("tiny_shakespeare", "gpt2", data_dir=cli["data"]) == folder
    assert "already complete" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before
    with pytest.raises(ValueError, match="prepared with other settings \\(max_tokens: None there, 1000 now\\)"):
        prepare("tiny_shakespeare", "gpt2", data_dir=cli["data"], max_tokens=1000)


def test_output_does_not_depend_on_num_proc(tmp_path: pathlib.Path) -> None:
    folders = [
        prepare(
            "tiny_shakespeare", "gpt2", data_dir=tmp_path / str(n), num_proc=n, max_tokens=400_000, shard_tokens=100_000,
            progress=False,
        )  # fmt: skip
        for n in (1, 2)
    ]
    one, two = (shard_bytes(f) for f in folders)
    assert list(one) == ["val_000000.bin", "train_000001.bin", "train_000002.bin", "train_000003.bin", "train_000004.bin"]
    assert one == two
    meta = json.loads((folders[0] / "meta.json").read_text())
    assert meta["splits"]["train"]["tokens"] == 400_000  # max_tokens caps the train split exactly


def test_resume_after_interruption_matches_uninterrupted(tmp_path: pathlib.Path, works: list, monkeypatch, capsys) -> None:
    pattern = write_parquet(tmp_path / "src", chunk_documents(works), files=3, row_group=50)
    args = dict(input=pattern, num_proc=1, shard_tokens=5_000, val_fraction=0.2, progress=True)
    clean = prepare("docs", "gpt2", data_dir=tmp_path / "clean", **args)

    real_write, calls = writer_module.write_shard, []

    def interrupting_write(*a, **k) -> None:
        calls.append(a[0].name)
        if len(calls) == 30:
            raise KeyboardInterrupt
        real_write(*a, **k)

    monkeypatch.setattr(writer_module, "write_shard", interrupting_write)
    with pytest.raises(KeyboardInterrupt):
        prepare("docs", "gpt2", data_dir=tmp_path / "resumed", **args)
    folder = tmp_path / "resumed" / "docs-gpt2"
    assert "rerun the same command to resume" in capsys.readouterr().out
    assert not (folder / "meta.json").exists() and (folder / "progress.json").exists()
    assert len(list_shards(folder, "val")) + len(list_shards(folder, "train")) == 29 and not list(folder.glob(".*.tmp"))
    with pytest.raises(FileNotFoundError, match="interrupted"):
        check_dataset(folder, seq_len=16, model_vocab_size=50257)
    (folder / ".train_000029.bin.4242.tmp").write_bytes(b"half a shard")  # as a kill -9 would leave it
    monkeypatch.setattr(writer_module, "write_shard", real_write)

    assert prepare("docs", "gpt2", data_dir=tmp_path / "resumed", **{**args, "num_proc": 2}) == folder
    out = capsys.readouterr().out
    replayed_from = int(out.split("replaying from document ")[1].split()[0])
    assert replayed_from > 100  # the validation split was full, so the source restarted near the cut
    assert shard_bytes(folder) == shard_bytes(clean)
    assert json.loads((folder / "meta.json").read_text())["splits"] == json.loads((clean / "meta.json").read_text())["splits"]
    assert not (folder / "progress.json").exists() and not list(folder.glob(".*.tmp"))


def test_ctrl_c_leaves_only_readable_shards(tmp_path: pathlib.Path, works: list) -> None:
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in chunk_documents(works) * 2))
    command = [sys.executable, "process_data.py", "--input", str(src), "--name", "cc", "--tokenizer", "gpt2",
               "--data-dir", str(tmp_path), "--shard-tokens", "1000", "--num-proc", "2"]  # fmt: skip
    folder = tmp_path / "cc-gpt2"
    # a terminal's Ctrl-C: the child starts with SIGINT's default action even where this test runs
    # in a background job (whose processes inherit SIGINT ignored, and Python then never raises it)
    proc = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while not (folder.is_dir() and len(list_shards(folder, "train")) > 20) and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert not (folder / "meta.json").exists()
    for split in ("val", "train"):
        for path in list_shards(folder, split):
            read_header(path)  # every visible shard is complete
    done = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resuming" in done.stdout
    check_dataset(folder, seq_len=16, model_vocab_size=50257)


def test_vocab_above_65535_writes_uint32(cli: dict, tmp_path: pathlib.Path) -> None:
    from tokenizers import Tokenizer as HFTokenizer

    big = HFTokenizer.from_file(str(cli["data"] / "tiny_shakespeare-bpe-8192" / "tokenizer.json"))
    big.add_tokens([f"<x{i}>" for i in range(60_000)])
    tok_dir = tmp_path / "big_tok"
    tok_dir.mkdir()
    big.save(str(tok_dir / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"}
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(config))
    # 5 x 31 tokens: more than one training window (prepare refuses less)
    texts = ["To be, or not <x59999> to be.\n", "Exit <x123>, pursued by a bear <|endoftext|>."] * 5
    for i, text in enumerate(texts):
        (tmp_path / f"doc{i}.txt").write_text(text)
    folder = prepare(
        "big", str(tok_dir), data_dir=tmp_path / "out", input=str(tmp_path / "doc*.txt"), num_proc=1, val_fraction=0.0,
        progress=False,
    )  # fmt: skip
    assert folder.name == "big-big_tok"
    [shard] = list_shards(folder, "train")
    header = read_header(shard)
    assert header.dtype == np.dtype(np.uint32) and header.vocab_size == 68192
    tokens = read_split(folder, "train")
    assert tokens.max() == 8192 + 59999
    tok = load_tokenizer(str(tok_dir))
    assert decode_documents(tokens, tok) == texts  # the literal "<|endoftext|>" stayed text


@pytest.mark.parametrize("kind", ["mistral-v1", "model-file"])
def test_sentencepiece_tokenizers(tmp_path: pathlib.Path, works: list, kind: str) -> None:
    spec = "mistral-v1" if kind == "mistral-v1" else str(shutil.copy(mistral_v1_path(), tmp_path / "spm-test.model"))
    folder = prepare("tiny_shakespeare", spec, data_dir=tmp_path, num_proc=1, max_tokens=20_000, progress=False)
    assert folder.name == ("tiny_shakespeare-mistral-v1" if kind == "mistral-v1" else "tiny_shakespeare-spm-test")
    meta = json.loads((folder / "meta.json").read_text())
    assert (meta["vocab_size"], meta["eos_id"], meta["bos_id"], meta["dtype"]) == (32000, 2, 1, "uint16")
    tok = load_tokenizer(spec)
    assert decode_documents(read_split(folder, "val"), tok) == [d.text for d in works if d.split == "val"]


def test_bad_inputs(tmp_path: pathlib.Path) -> None:
    def run(**kwargs) -> None:
        prepare(**{"data_dir": tmp_path / "out", "num_proc": 1, "progress": False, **kwargs})

    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        run(name="nope")
    with pytest.raises(FileNotFoundError, match="no files match"):
        run(name="x", input=str(tmp_path / "missing" / "*.parquet"))
    pq.write_table(pa.table({"content": ["a"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="bad.parquet: no 'text' column \\(columns: content\\)"):
        run(name="x", input=str(tmp_path / "bad.parquet"), tokenizer="gpt2")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: expected a JSON object with a 'text' string"):
        run(name="x", input=str(tmp_path / "bad.jsonl"), tokenizer="gpt2")
    (tmp_path / "t.csv").write_text("a")
    with pytest.raises(ValueError, match="unsupported input files"):
        run(name="x", input=str(tmp_path / "t.csv"))
    with pytest.raises(ValueError, match="unknown tokenizer 'nonsense'"):
        run(tokenizer="nonsense")
    with pytest.raises(ValueError, match="BPE vocab size must be between 512"):
        run(tokenizer="bpe-10")
    with pytest.raises(ValueError, match="shard_tokens must be"):
        run(shard_tokens=0)
    with pytest.raises(ValueError, match="--input"):
        run(name="fineweb10B", tokenizer="gpt2")  # offline: no datasets package or no network
    # empty or nearly empty text files: refused, naming the files, with nothing left behind
    (tmp_path / "empty").mkdir()
    for name in ("a.txt", "b.txt"):
        (tmp_path / "empty" / name).write_text("")
    with pytest.raises(ValueError, match=r"empty/a\.txt, \S+empty/b\.txt: every input file is empty \(0 bytes\)"):
        run(name="e", input=str(tmp_path / "empty" / "*.txt"), tokenizer="gpt2")
    (tmp_path / "empty" / "c.txt").write_text("hello world")
    for tokenizer in ("gpt2", "bpe-512"):
        with pytest.raises(ValueError, match=r"a\.txt, \S+b\.txt, \S+c\.txt: only \d tokens of text for the train split "
                                             r"\(\d tokens with the end-of-document tokens\), fewer than one training window"):
            run(name="e", input=str(tmp_path / "empty" / "*.txt"), tokenizer=tokenizer)
        assert not (tmp_path / "out" / f"e-{tokenizer}").exists()
    stale = tmp_path / "out" / "tiny_shakespeare-gpt2"
    stale.mkdir(parents=True)
    (stale / "train_000001.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="holds shards but no meta.json or progress.json"):
        run(tokenizer="gpt2")
