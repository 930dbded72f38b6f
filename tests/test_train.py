"""The trainer through its real entry point: learning, the seeded start, 4-bit AdamW state, errors (DDP
equivalence: test_zero; exact resume of every optimizer: test_reliability)."""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

from muonq.data import TokenLoader, check_dataset, validation_batches

from .conftest import TINY, losses, run_training


def unigram_cross_entropy(data_dir) -> float:
    """Validation loss (nats/token) of a unigram model fitted on the training split (add-one
    smoothing): the best a model that ignores context can do."""
    path = data_dir / "tiny_shakespeare-bpe-8192"
    train = TokenLoader(path, "train", batch_size=64, seq_len=128)
    vocab = check_dataset(path, seq_len=128, model_vocab_size=1 << 30).vocab_size
    counts = np.ones(vocab)
    for _ in range(150):  # ~1.2M of the 1.4M training tokens
        np.add.at(counts, train.next_batch()[1].flatten().numpy(), 1)
    log_p = np.log(counts / counts.sum())
    val = np.concatenate([y.flatten().numpy() for _, y in validation_batches(path, batch_size=64, seq_len=128, max_tokens=0)])
    return float(-log_p[val].mean())


@pytest.mark.slow
def test_llama_tiny_learns_below_unigram_entropy(shakespeare_data, tiny_runs) -> None:
    """150 steps of llama-tiny (the shared runs of conftest.tiny_runs): both optimizers use context,
    ending well below the best context-free (unigram) loss, and Muon below AdamW. Measured
    2026-12-02, seeds 0 / 1: unigram 6.611, AdamW 6.283 / 6.326, Muon 5.988 / 5.996 nats/token."""
    baseline = unigram_cross_entropy(shakespeare_data)
    adamw, muon = tiny_runs["adamw"], tiny_runs["muon"]
    assert adamw["loss"] < baseline - 0.2, (adamw["loss"], baseline)
    assert muon["loss"] < baseline - 0.5, (muon["loss"], baseline)
    assert muon["loss"] < adamw["loss"] - 0.2
    for name, run in (("adamw", adamw), ("muon", muon)):
        assert (run["out"] / "summary.json").exists()
        [log_file] = (run["out"].parent / "logs").glob(f"llama-tiny_{name}_*.log")  # one file per run
        assert log_file.read_text().count("val loss") >= 1


def test_resume_true_without_checkpoint_fails_clearly(tmp_path, shakespeare_data) -> None:
    proc, _ = run_training(tmp_path / "out", shakespeare_data, *TINY, "recipe.training_params.max_steps=2",
                           "resume=true", f"logging_params.checkpoint_dir={tmp_path / 'none'}")
    assert proc.returncode == 2
    assert "resume=true but no complete checkpoint" in proc.stderr


def test_missing_dataset_names_the_command(tmp_path) -> None:
    proc, _ = run_training(tmp_path / "out", tmp_path / "empty", *TINY, "recipe.training_params.max_steps=2")
    assert proc.returncode == 2
    assert "process_data.py" in proc.stderr and "Traceback" not in proc.stderr


PROBE = '''
import os, torch
def install(trainer):
    torch.save(trainer.model.state_dict(), os.environ["PROBE_OUT"])
'''


def test_the_run_starts_from_the_seeded_model_initialized_once(tmp_path, shakespeare_data) -> None:
    """The trainer's starting weights are exactly ``build_model`` under the run's seed: the model is
    initialized once (a second init_weights would draw new weights from the advanced RNG)."""
    from muonq.config import compose_config
    from muonq.models import build_model
    from muonq.train.hooks import PLUGINS_ENV

    (tmp_path / "probe_init.py").write_text(PROBE)
    out = tmp_path / "weights.pt"
    pythonpath = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    proc, _ = run_training(tmp_path / "out", shakespeare_data, *TINY, "seed=7", "recipe.training_params.max_steps=1",
                           env={PLUGINS_ENV: "probe_init:install", "PROBE_OUT": str(out), "PYTHONPATH": pythonpath})
    assert proc.returncode == 0, proc.stderr[-2000:]
    torch.manual_seed(7)
    expected = build_model(compose_config(list(TINY)).recipe.model).state_dict()
    got = torch.load(out, weights_only=True)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)


# -- the AdamW side in 4 bits, in process ------------------------------------------------------------

ADAMW4 = (*TINY, "optimizer_params=muonq", "optimizer_params.args.adamw_bits=4", "optimizer_params.args.lr=0.006",
          "recipe.training_params.max_steps=6", "logging_params.save_checkpoint=true",
          "logging_params.save_ckpt_step=3", "logging_params.keep_last=5")


def train_in_process(run_dir, data_dir, *overrides: str) -> list[dict]:
    """The trainer as ``launch.run`` drives it (resume when asked, fit, close), in this process;
    the rows of its metrics.jsonl."""
    from muonq.config import compose_config, validate
    from muonq.train.trainer import Trainer

    cfg = compose_config([f"data_dir={data_dir}", *overrides])
    validate(cfg)
    trainer = Trainer(cfg, run_name=run_dir.name, run_dir=run_dir)
    try:
        trainer.maybe_resume()
        trainer.fit()
    finally:
        trainer.close()
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def adamw4_runs(tmp_path_factory, shakespeare_data) -> dict[str, list[dict]]:
    """muonq with 4-bit AdamW state: 6 steps with checkpoints at 3 and 6, then the step-3
    checkpoint resumed to step 6. torchao's step runs eagerly (its torch.compile takes ~50 s per
    parameter shape on a CPU; the arithmetic is the same, and both runs run it the same way)."""
    tmp = tmp_path_factory.mktemp("adamw4")
    ckpt = f"logging_params.checkpoint_dir={tmp / 'ckpt'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCHDYNAMO_DISABLE", "1")
        mp.chdir(tmp)  # the runs' logs/ folder
        full = train_in_process(tmp / "full", shakespeare_data, *ADAMW4, ckpt)
        shutil.rmtree(tmp / "ckpt" / "step_000006")
        resumed = train_in_process(tmp / "resumed", shakespeare_data, *ADAMW4, ckpt, "resume=true")
    return {"full": full, "resumed": resumed}


def test_muonq_with_4bit_adamw_state_trains(adamw4_runs) -> None:
    got = losses(adamw4_runs["full"])
    assert sorted(got) == list(range(1, 7)) and all(math.isfinite(v) for v in got.values())
    assert got[6] < got[1] - 0.1, got


def test_4bit_adamw_state_bytes_are_torchaos_layout_and_planned(adamw4_runs) -> None:
    """The logged AdamW-side bytes are torchao's OptimState4bit layout (per moment: two 4-bit codes
    per uint8, one fp32 scale per 64-element block (the adamw_block_size default), a 16-entry fp32 code map; tensors under 4096
    elements keep two fp32 moments) and what ``muonq.plan`` predicts; the whole-optimizer ratio is
    fp32 Muon + fp32 AdamW's bytes over the logged total."""
    from muonq import metric_names as M
    from muonq.config import compose_config
    from muonq.plan import plan

    row = next(r for r in adamw4_runs["full"] if M.STATE_BYTES_TOTAL in r)
    vocab, d, ffn, layers = 8192, 64, 160, 2
    table = vocab * d  # the embedding and the (untied) LM head
    per_moment = table // 2 + 4 * (table // 64) + 4 * 16
    norms = 2 * layers + 1
    assert row[M.state_bytes_of("adamw")] == 2 * 2 * per_moment + norms * 2 * 4 * d
    _, whole = plan(compose_config(list(ADAMW4)), 1)
    assert (whole.adamw_state, whole.muon_state, whole.state) == (
        row[M.state_bytes_of("adamw")], row[M.state_bytes_of("muon")], row[M.STATE_BYTES_TOTAL])
    hidden = layers * (4 * d * d + 3 * ffn * d)
    fp32 = 4 * hidden + 8 * (2 * table + norms * d)
    assert row[M.STATE_RATIO_VS_FP32] == pytest.approx(fp32 / row[M.STATE_BYTES_TOTAL], rel=1e-12)
    assert whole.state_ratio_vs_fp32 == pytest.approx(row[M.STATE_RATIO_VS_FP32], rel=1e-12)


def test_4bit_adamw_state_resumes_bit_identically(adamw4_runs) -> None:
    full, resumed = losses(adamw4_runs["full"]), losses(adamw4_runs["resumed"])
    assert sorted(resumed) == [4, 5, 6]
    assert all(resumed[s] == full[s] for s in resumed), (full, resumed)
    final = [[r["val/final_loss"] for r in rows if "val/final_loss" in r] for rows in adamw4_runs.values()]
    assert final[0] == final[1] and len(final[0]) == 1
