"""Checkpoints are written atomically: a write that dies half-way leaves the previous file intact."""

import pytest
import torch

from pipeline.callbacks import AtomicCheckpointIO


def test_atomic_write_replaces_whole_file_or_nothing(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    assert torch.load(path)["step"] == 1

    real_save = torch.save

    def dying_save(obj, f):  # write part of the bytes, then the process "dies"
        real_save(obj, f)
        f.truncate(100)
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.load(path)["step"] == 1  # the old checkpoint survived whole
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # and no temp file is left
    io.save_checkpoint({"step": 3, "w": torch.zeros(3)}, path)
    assert torch.load(path)["step"] == 3
