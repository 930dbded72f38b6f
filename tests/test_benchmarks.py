"""The end-to-end benchmark script runs the real trainer on its synthetic shards (a pipeline check:
the numbers are measured on a GPU, see docs/benchmarks.md); the kernel benchmark's QR candidate
computes what the thin QR computes; the step-time benchmark's profile lists each optimizer's
heaviest operators."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def bench_module(name: str):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


def test_cholesky_qr2_candidate_spans_what_householder_qr_spans():
    """Orthonormal columns with the same span as torch.linalg.qr's, batched or not, for inputs whose
    singular values span three decades (one Cholesky-QR pass leaves ~1e-2 of orthogonality error
    there; the second removes it) and whose scale would underflow a Gram matrix in fp32."""
    import torch

    cholesky_qr2 = bench_module("bench_kernels").cholesky_qr2
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(3, 300, 20, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(3, 20, 20, generator=g, dtype=torch.float64))
    y = ((u * torch.logspace(0, -3, 20, dtype=torch.float64)) @ v.mT * 1e-25).float()
    q = cholesky_qr2(y)
    assert (q.mT @ q - torch.eye(20)).abs().max() < 1e-5
    householder, _ = torch.linalg.qr(y, mode="reduced")
    projector = householder @ householder.mT
    assert (projector @ q - q).abs().max() < 1e-4  # same column space
    assert torch.allclose(cholesky_qr2(y[1]), q[1], atol=1e-5)


def test_synthetic_llmc_shards_load_like_any_dataset(tmp_path):
    write_synthetic_dataset = bench_module("bench_train").write_synthetic_dataset
    from muonq.data import TokenLoader, check_dataset

    folder = write_synthetic_dataset(tmp_path, vocab_size=1000, train_tokens=4097, val_tokens=1025, seed=1)
    meta = check_dataset(folder, seq_len=64, model_vocab_size=1000)
    assert meta.format == "llm.c" and meta.train_tokens == 4097 and meta.vocab_size <= 1000
    x, y = TokenLoader(folder, "train", batch_size=2, seq_len=64, rank=0, world_size=1, seed=0).next_batch()
    assert x.shape == (2, 64) and (x[:, 1:] == y[:, :-1]).all()


def test_bench_train_runs_the_trainer_and_reports(tmp_path):
    out = tmp_path / "results.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_train.py"), "--recipes", "llama-tiny",
           "--optimizers", "muon", "muonq", "--steps", "2", "--warmup", "1", "--batch-size", "2",
           "--context-length", "32", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert [r["optimizer"] for r in results] == ["muon", "muonq"]
    for r in results:
        assert "error" not in r, r
        assert r["tokens_per_s"] > 0 and r["windows"] == 2 and r["peak_memory_bytes"] > 0
    muon, muonq = results
    assert 0 < muonq["state_bytes"] < muon["state_bytes"]
    assert "muonq / muon tokens/s" in proc.stdout


def test_state_memory_table_shows_the_whole_optimizer_next_to_the_muon_matrices():
    """Per row: the Muon matrices' bytes and ratio, then the whole optimizer's (Muon side + AdamW
    side) and its ratio to fp32 Muon + fp32 AdamW; the 4-bit AdamW side is torchao's layout."""
    bench = bench_module("bench_state_memory")
    table = bench.markdown_table(("llama-tiny",))
    header = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    assert header == ["variant", "llama-tiny matrices", "vs fp32 Muon", "B/elem", "llama-tiny whole optimizer",
                      "vs fp32 Muon + AdamW"]
    rows = {label: cells["llama-tiny"] for label, cells in bench.table_rows(("llama-tiny",))}
    d, ffn, layers, vocab = 128, 352, 4, 8192
    hidden, tables, norms = layers * (4 * d * d + 3 * ffn * d), 2 * vocab * d, (2 * layers + 1) * d
    fp32 = 4 * hidden + 8 * (tables + norms)
    assert rows["muon (fp32)"] == (4 * hidden, 1.0, 4.0, fp32, 1.0)
    matrices, _, _, whole, ratio = rows["muonq + 4-bit AdamW side"]
    assert matrices == rows["muonq (default)"][0]
    # per moment of each 8192 x 128 table: 4-bit codes two per byte, an fp32 scale per 64 (the
    # adamw_block_size default), a 16-entry map
    per_moment = vocab * d // 2 + 4 * (vocab * d // 64) + 4 * 16
    assert whole == matrices + 2 * 2 * per_moment + 2 * 4 * norms  # the 1-D gains keep fp32 moments
    assert ratio == pytest.approx(fp32 / whole, rel=1e-12)
    assert f"| {whole:,} | {ratio:.4f}x |" in table


def test_step_time_profile_lists_each_optimizers_operators(tmp_path):
    """``bench_step_time.py --profile`` prints, per optimizer, its heaviest operators per step;
    ``--phases`` the time of each phase of its step."""
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_step_time.py"), "--rounds", "1", "--warmup", "0",
           "--only", "muon8bit linear b256", "--profile", "1", "--top", "3", "--phases", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    phases = {line.split("|")[1].strip(): [float(c) for c in line.split("|")[2:-1]]
              for line in proc.stdout.split("phases of the step")[1].split("\n\n")[0].splitlines()
              if line.startswith("| muon")}
    assert set(phases) == {"muon (fp32)", "muon8bit linear b256"}
    for label, (step, store, ns, apply, decodes, encodes, power) in phases.items():
        assert 0 < store + ns + apply <= step and decodes + encodes <= store
        assert (decodes > 0 and encodes > 0) == (label != "muon (fp32)") and power == 0  # no decomposition here
    for label in ("muon (fp32)", "muon8bit linear b256"):
        section = proc.stdout.split(f"\n{label}: ")[1]
        rows = [line for line in section.splitlines() if line.startswith("| aten::")]
        assert len(rows) >= 3 and rows[:3] == section.splitlines()[3:6]  # the first three, heaviest first
        times = [float(row.split("|")[2]) for row in rows[:3]]
        assert times == sorted(times, reverse=True) and times[0] > 0
