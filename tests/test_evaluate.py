"""Evaluation: the loss of a checkpoint on a prepared validation split equals the trainer's final
full validation; zero-shot tasks that cannot run are reported one line each, exit status 0."""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
import types
from pathlib import Path

import pytest

from muonq.data import validation_batches
from muonq.data.tokenizers import load_tokenizer

from .conftest import TINY, run_tool, run_training

DATASET = ("mini", "bpe-1024")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shakespeare_data):
    """A small dataset (so the full validation split is quick) and a 3-step run on it whose final
    validation covers the whole split, with a checkpoint."""
    from muonq.data.prepare import prepare

    root = tmp_path_factory.mktemp("eval")
    source = shakespeare_data / "tiny_shakespeare-bpe-8192"
    tokenizer = load_tokenizer("bpe-8192", folder=source)
    docs = [tokenizer.decode(x.flatten().tolist()) for x, _ in validation_batches(source, batch_size=1, seq_len=400, max_tokens=0)][:60]
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    data_dir = root / "data"
    prepare(*DATASET, data_dir=data_dir, input=str(root / "docs.jsonl"), val_fraction=0.1, progress=False, num_proc=1)
    ckpt_dir = root / "ckpt"
    overrides = [o for o in TINY if not o.startswith("logging_params.final_full_val")]
    proc, rows = run_training(
        root / "run", data_dir, *overrides, "logging_params.final_full_val=true", "optimizer_params=muonq",
        f"recipe.dataset.name={DATASET[0]}", f"recipe.dataset.tokenizer={DATASET[1]}",
        "recipe.training_params.max_steps=3", "logging_params.save_checkpoint=true",
        f"logging_params.checkpoint_dir={ckpt_dir}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = [r["val/final_loss"] for r in rows if "val/final_loss" in r]
    assert len(final) == 1
    return {"data_dir": data_dir, "ckpt": ckpt_dir, "final": final[0], "root": root}


def test_loss_equals_trainer_final_full_validation(trained, tmp_path) -> None:
    out = tmp_path / "eval.json"
    # seq_len is read from the checkpoint's loader state; TINY's batch_size is 4
    proc = run_tool("muonq.evaluate", f"checkpoint={trained['ckpt']}", f"data_dir={trained['data_dir']}",
                    f"dataset={DATASET[0]}", f"tokenizer={DATASET[1]}", "batch_size=4", "tasks=none", f"out={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["seq_len"] == 64
    assert math.isclose(result["val_loss"], trained["final"], rel_tol=1e-6, abs_tol=1e-6), (result["val_loss"], trained["final"])
    assert math.isclose(result["val_ppl"], math.exp(trained["final"]), rel_tol=1e-5)
    assert result["zero_shot"] == {} and result["unavailable"] == {}


def damaged_copy(ckpt_dir: Path, where: Path, damage: str) -> Path:
    """A copy of the newest step folder of ``ckpt_dir``: main.pt with four bytes flipped, or the
    folder without its manifest."""
    from muonq.train.checkpoint import CheckpointManager

    mgr = CheckpointManager(ckpt_dir)
    folder = where / mgr.step_dir(mgr.steps()[-1]).name
    shutil.copytree(mgr.step_dir(mgr.steps()[-1]), folder)
    if damage == "flipped":
        main = folder / "main.pt"
        data = bytearray(main.read_bytes())
        for i in range(4):
            data[len(data) // 2 + i] ^= 0x55
        main.write_bytes(bytes(data))
    else:
        (folder / "manifest.json").unlink()
    return folder


@pytest.mark.parametrize("damage, name, message", [
    ("flipped", "main.pt", r"error: checkpoint \S+step_000003 is corrupt or incomplete \(checksum mismatch in main\.pt\)"),
    ("no-manifest", "", r"error: checkpoint \S+step_000003 is corrupt or incomplete \(no manifest\.json\)"),
], ids=["flipped-main.pt", "no-manifest-step-folder"])
def test_damaged_checkpoint_is_refused_in_one_line(trained, tmp_path, damage, name, message) -> None:
    """Named by its main.pt or its step folder, a checkpoint is verified against its manifest
    before anything is evaluated."""
    folder = damaged_copy(trained["ckpt"], tmp_path, damage)
    proc = run_tool("muonq.evaluate", f"checkpoint={folder / name}", f"data_dir={trained['data_dir']}",
                    f"dataset={DATASET[0]}", f"tokenizer={DATASET[1]}", "tasks=none")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert re.fullmatch(message, proc.stderr.strip().splitlines()[-1]), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "validation loss" not in proc.stdout


def test_cli_offline_reports_unavailable_tasks_and_exits_0(trained) -> None:
    env = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    proc = run_tool("muonq.evaluate", f"checkpoint={trained['ckpt']}", f"data_dir={trained['data_dir']}",
                    f"dataset={DATASET[0]}", f"tokenizer={DATASET[1]}", "batch_size=4", "tasks=[hellaswag,arc_easy]",
                    "limit=4", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    loss_line = next(line for line in lines if line.startswith("validation loss"))
    assert f"{trained['final']:.4f}" in loss_line
    for task in ("hellaswag", "arc_easy"):
        task_lines = [line for line in lines if line.startswith(f"{task}:")]
        assert len(task_lines) == 1, lines
        # without lm-eval: "not installed"; with it but offline: its data could not be loaded
        assert "unavailable:" in task_lines[0] or "acc" in task_lines[0]


def test_zero_shot_reasons_one_line_each(monkeypatch) -> None:
    """With lm-eval importable, an unknown task and a task whose data cannot be loaded are named
    with their reasons, and no model is built when nothing can run."""
    fake = types.ModuleType("lm_eval")
    fake.__version__ = "0.4.test"
    tasks_mod = types.ModuleType("lm_eval.tasks")

    class TaskManager:
        all_tasks = ["hellaswag"]

    def get_task_dict(names, manager):
        raise ConnectionError("Couldn't reach 'Rowan/hellaswag' on the Hub (LocalEntryNotFoundError)\nsecond line")

    tasks_mod.TaskManager, tasks_mod.get_task_dict = TaskManager, get_task_dict
    monkeypatch.setitem(sys.modules, "lm_eval", fake)
    monkeypatch.setitem(sys.modules, "lm_eval.tasks", tasks_mod)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from muonq.evaluation import zero_shot

    def no_export():
        raise AssertionError("no task can run: nothing should be exported")

    results, unavailable = zero_shot(None, ["hellaswag", "nosuchtask"], limit=2, device="cpu", export_fn=no_export)
    assert results == {}
    assert set(unavailable) == {"hellaswag", "nosuchtask"}
    assert "not a task" in unavailable["nosuchtask"]
    assert "offline" in unavailable["hellaswag"] and "ConnectionError" in unavailable["hellaswag"]
    assert all("\n" not in why for why in unavailable.values())


def test_zero_shot_without_lm_eval(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import fails as if not installed
    from muonq.evaluation import zero_shot

    results, unavailable = zero_shot(None, ["piqa"], limit=None, device="cpu")
    assert results == {} and "not installed" in unavailable["piqa"]


def test_zero_shot_on_a_local_task_through_the_exported_model(trained, tmp_path) -> None:
    """Where lm-evaluation-harness is installed: a multiple-choice task with local data runs end to
    end on the exported HF model (offline)."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("datasets")

    rows = [{"question": "To be, or not to be,", "choices": [" that is the question", " purple xylophone"], "label": 0},
            {"question": "Now is the winter of our", "choices": [" discontent", " spreadsheet"], "label": 0}]
    (tmp_path / "toy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "toy.yaml").write_text(
        "task: muonq_toy\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'toy.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    out = tmp_path / "eval.json"
    proc = run_tool("muonq.evaluate", f"checkpoint={trained['ckpt']}", f"data_dir={trained['data_dir']}",
                    f"dataset={DATASET[0]}", f"tokenizer={DATASET[1]}", "batch_size=4", "tasks=[muonq_toy]",
                    f"tasks_dir={tmp_path}", "device=cpu", f"out={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["zero_shot"]) == {"muonq_toy"} and 0.0 <= result["zero_shot"]["muonq_toy"]["acc"] <= 1.0
