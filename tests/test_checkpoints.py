"""Step checkpoints: atomic commit, pruning, checksum fallback, cleanup of a killed save, and refusal of another spec's
checkpoints or of replaced input files."""

import os
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from rankmerge.cluster.checkpoints import job_identity, load_latest_checkpoint, save_checkpoint
from rankmerge.workers.errors import MergeInputError


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


def test_meta_json_null_is_a_damaged_checkpoint(tmp_path):
    for step in (2, 4):
        save_checkpoint(tmp_path, step, {"x": torch.full((1,), float(step))}, {"spec_hash": "abc"})
    (tmp_path / "checkpoints" / "step_00000004" / "meta.json").write_text("null")
    tensors, meta = load_latest_checkpoint(tmp_path, "abc")
    assert meta["step"] == 2 and torch.equal(tensors["x"], torch.full((1,), 2.0))


def test_half_written_step_of_a_killed_run_is_removed_on_resume(tmp_path):
    save_checkpoint(tmp_path, 2, {"x": torch.zeros(1)}, {"spec_hash": "abc"})
    root = tmp_path / "checkpoints"
    (root / ".tmp-step_00000004-0badc0de").mkdir()  # what kill -9 in the middle of save_checkpoint leaves
    (root / ".tmp-step_00000004-0badc0de" / "state.safetensors").write_bytes(b"half")
    (root / ".LATEST-0badc0de").write_text("step_00000004\n")
    assert load_latest_checkpoint(tmp_path, "abc")[1]["step"] == 2
    assert sorted(p.name for p in root.iterdir()) == ["LATEST", "step_00000002"]


def test_input_fingerprint_follows_content_not_times(tmp_path):
    weights = tmp_path / "model.safetensors"
    save_file({"w": torch.arange(100000, dtype=torch.float32)}, weights)
    data = tmp_path / "data.safetensors"
    save_file({"pixel_values": torch.zeros(4, 3)}, data)
    ck = SimpleNamespace(files=[weights])
    identity = job_identity("abc", [ck], [data])
    assert identity.startswith("abc+")
    os.utime(weights, (0, 0))  # touched, same bytes: the same inputs
    assert job_identity("abc", [ck], [data]) == identity
    save_file({"w": torch.arange(100000, dtype=torch.float32) + 1}, weights)  # same path, size and header
    changed = job_identity("abc", [ck], [data])
    assert changed != identity
    save_checkpoint(tmp_path / "job", 1, {"x": torch.zeros(1)}, {"spec_hash": identity})
    with pytest.raises(MergeInputError, match="files changed since the checkpoints"):
        load_latest_checkpoint(tmp_path / "job", changed)
    with pytest.raises(MergeInputError, match="different job spec"):
        load_latest_checkpoint(tmp_path / "job", "xyz" + changed[3:])
    save_checkpoint(tmp_path / "old", 1, {"x": torch.zeros(1)}, {"spec_hash": "abc"})  # written before fingerprints
    assert load_latest_checkpoint(tmp_path / "old", changed) is not None
