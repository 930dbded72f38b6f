from __future__ import annotations

import logging

import torch

from muonq.train.checkpoint import CheckpointManager


def test_save_keeps_last_k_and_loads(tmp_path) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for step in (10, 20, 30):
        mgr.save(step, {"step": step, "w": torch.full((3,), float(step))})
    assert mgr.steps() == [20, 30]
    assert mgr.latest_valid() == 30
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
        assert mgr.latest_valid() == 10
    assert "checksum mismatch" in caplog.text
