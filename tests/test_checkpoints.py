"""Step checkpoints: atomic commit, pruning, checksum fallback, and refusal of another spec's checkpoints."""

import pytest
import torch

from cluster.checkpoints import load_latest_checkpoint, save_checkpoint
from workers.errors import MergeInputError


def test_latest_intact_checkpoint_wins_and_damage_falls_back(tmp_path):
    for step in (2, 4, 6, 8):
        save_checkpoint(tmp_path, step, {"x": torch.full((3,), float(step))}, {"spec_hash": "abc"}, keep=3)
    steps = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert steps == ["step_00000004", "step_00000006", "step_00000008"]  # keep the last 3
    assert (tmp_path / "checkpoints" / "LATEST").read_text().strip() == "step_00000008"
    tensors, meta = load_latest_checkpoint(tmp_path, "abc")
    assert meta["step"] == 8 and torch.equal(tensors["x"], torch.full((3,), 8.0))
    state = tmp_path / "checkpoints" / "step_00000008" / "state.safetensors"
    data = bytearray(state.read_bytes())
    data[-1] ^= 0xFF  # flip bits in the last tensor byte: checksum mismatch
    state.write_bytes(bytes(data))
    tensors, meta = load_latest_checkpoint(tmp_path, "abc")
    assert meta["step"] == 6 and torch.equal(tensors["x"], torch.full((3,), 6.0))
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp")]


def test_checkpoints_of_another_spec_are_refused(tmp_path):
    save_checkpoint(tmp_path, 1, {"x": torch.zeros(1)}, {"spec_hash": "one"})
    with pytest.raises(MergeInputError, match="different job spec"):
        load_latest_checkpoint(tmp_path, "two")
    assert load_latest_checkpoint(tmp_path / "empty", "one") is None
