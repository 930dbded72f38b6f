from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from muonq.checkpoints import resolve_checkpoint
from muonq.errors import UserError
from muonq.train.checkpoint import CheckpointManager, read_file


def test_save_keeps_last_k_and_loads(tmp_path) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for step in (10, 20, 30):
        mgr.save(step, {"step": step, "w": torch.full((3,), float(step))})
    assert mgr.steps() == [20, 30]
    assert mgr.newest_intact() == (30, [])
    assert mgr.load(30)["w"].tolist() == [30.0, 30.0, 30.0]


def test_partial_and_corrupt_checkpoints_are_skipped(tmp_path, caplog) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=5)
    mgr.save(10, {"w": torch.ones(4)})
    mgr.save(20, {"w": torch.ones(4) * 2})
    # A write killed before commit leaves a .partial folder: never loaded.
    mgr.begin(30)
    mgr.write_part(30, "main.pt", {"w": torch.ones(4) * 3})
    assert mgr.steps() == [10, 20]
    # Flip one byte of the newest: the checksum catches it and the previous one is used.
    path = mgr.step_dir(20) / "main.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        assert mgr.newest_intact() == (10, ["step_000020 (checksum mismatch in main.pt)"])
    assert "checksum mismatch" in caplog.text


def _flip(path: Path, offset: int = 0) -> None:
    data = bytearray(path.read_bytes())
    for i in range(4):  # four bytes, as bit rot or a bad copy leaves them
        data[len(data) // 2 + offset + i] ^= 0x55
    path.write_bytes(bytes(data))


def test_every_file_loaded_is_verified_against_its_manifest(tmp_path) -> None:
    """A manifest that does not list main.pt, names another step or lacks a file's entry does not
    let anything through unverified; a file the manifest does not list is never loaded."""
    mgr = CheckpointManager(tmp_path, keep_last=5)
    mgr.begin(2)
    mgr.write_part(2, "main.pt", {"w": torch.ones(2)})
    mgr.write_part(2, "optim_rank00000.pt", {"s": torch.ones(2)})
    mgr.commit(2)
    manifest_path = mgr.step_dir(2) / "manifest.json"
    good = json.loads(manifest_path.read_text())
    for change, problem in [({"files": {}}, "does not list main.pt"), ({"files": None}, "holds no file checksums"),
                            ({"step": 4}, "manifest.json is of step 4")]:
        manifest_path.write_text(json.dumps({**good, **change}))
        assert problem in mgr.verify(2)
        assert mgr.newest_intact() == (None, [f"step_000002 ({mgr.verify(2)})"])
    manifest_path.write_text(json.dumps({**good, "files": {"main.pt": good["files"]["main.pt"]}}))
    assert mgr.verify(2) is None
    with pytest.raises(UserError, match="optim_rank00000.pt is not listed in its manifest.json"):
        mgr.load(2, "optim_rank00000.pt")


def test_tools_resolve_only_verified_checkpoints(tmp_path) -> None:
    """Whatever names the checkpoint (run folder, step folder, main.pt), the manifest is checked;
    files that are not checkpoints and unreadable files are one-line UserErrors naming them."""
    mgr = CheckpointManager(tmp_path / "run", keep_last=5)
    for step in (2, 4):
        mgr.save(step, {"step": step, "model": {}, "model_config": {}})
    assert resolve_checkpoint(mgr.step_dir(4) / "main.pt") == mgr.step_dir(4) / "main.pt"
    _flip(mgr.step_dir(4) / "main.pt")
    (mgr.step_dir(2) / "manifest.json").unlink()
    cases = {
        mgr.directory: r"every checkpoint in .*run is corrupt or incomplete: step_000004 \(checksum mismatch in "
                       r"main\.pt\); step_000002 \(no manifest\.json\)",
        mgr.step_dir(4): r"step_000004 is corrupt or incomplete \(checksum mismatch in main\.pt\)",
        mgr.step_dir(4) / "main.pt": r"step_000004 is corrupt or incomplete \(checksum mismatch in main\.pt\)",
        mgr.step_dir(2): r"step_000002 is corrupt or incomplete \(no manifest\.json\)",
        mgr.step_dir(2) / "main.pt": r"main\.pt is not a MuonQ checkpoint",
    }
    for path, message in cases.items():
        with pytest.raises(UserError, match=message):
            resolve_checkpoint(path)
    junk = tmp_path / "junk" / "main.pt"
    junk.parent.mkdir()
    junk.write_bytes(b"not a zip archive, not a pickle")
    with pytest.raises(UserError, match=r"junk/main\.pt is not a readable checkpoint file"):
        read_file(junk)
