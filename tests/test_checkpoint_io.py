"""Lazy reading, the pre-planned streaming writer, and atomic publishing, on real safetensors files."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rankmerge.workers.checkpoint_reader import ModelCheckpoint
from rankmerge.workers.checkpoint_writer import StreamingCheckpointWriter, parse_size
from rankmerge.workers.errors import MergeInputError


def _tensors():
    gen = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(64, 32, generator=gen),
        "b.weight": torch.randn(16, generator=gen).to(torch.bfloat16),
        "c.ids": torch.arange(10, dtype=torch.int64),
        "d.half": torch.randn(8, 8, generator=gen).half(),
        "e.empty": torch.zeros(0, 4),
    }


def test_writer_shards_round_trip_through_safetensors_and_reader(tmp_path):
    tensors = _tensors()
    layout = [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    out = tmp_path / "out"
    with StreamingCheckpointWriter(out, layout, max_shard_bytes=4000) as writer:
        for key in reversed(list(tensors)):  # any order
            writer.write(key, tensors[key])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and shards[0].startswith("model-00001-of-")
    for key, value in tensors.items():
        with safe_open(str(out / index["weight_map"][key]), "pt") as f:
            assert torch.equal(f.get_tensor(key), value)
    with ModelCheckpoint(out) as ck:
        assert set(ck.keys()) == set(tensors)
        for key, value in tensors.items():
            assert torch.equal(ck.read(key), value) and ck.read(key).dtype == value.dtype
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]


@pytest.mark.parametrize("order", ["in order", "one out of order", "reversed", "row blocks", "row blocks reversed"])
def test_writer_large_shards_round_trip_in_any_order(order, tmp_path):
    """Shards larger than a direct-write chunk, written front to back (direct, staged chunks, a buffered tail),
    with one tensor out of order midway (the shard falls back to the page cache) or all reversed."""
    gen = torch.Generator().manual_seed(1)
    sizes = [(3000, 1031), (7,), (1500, 4099), (2048, 2048), (0, 3), (999, 1001)]  # ~55 MB, odd byte counts
    tensors = {f"t{i}": torch.randn(shape, generator=gen) for i, shape in enumerate(sizes)}
    tensors["t1"] = tensors["t1"].half()
    keys = list(tensors)
    if order == "reversed":
        keys.reverse()
    elif order == "one out of order":
        keys[2], keys[3] = keys[3], keys[2]
    layout = [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    out = tmp_path / "out"
    with StreamingCheckpointWriter(out, layout, max_shard_bytes=40 * 10**6) as writer:
        for key in keys:
            value = tensors[key]
            if order.startswith("row blocks") and value.dim() == 2 and len(value):
                starts = list(range(0, len(value), 700))  # a direct chunk is not a whole number of blocks
                for r in reversed(starts) if order.endswith("reversed") else starts:
                    writer.write(key, value[r:r + 700], r)
            else:
                writer.write(key, value)
    assert len(list(out.glob("model-*.safetensors"))) == 2
    with ModelCheckpoint(out) as ck:
        for key, value in tensors.items():
            assert torch.equal(ck.read(key), value), key
        for f in ck.files:  # exact sizes: the header's byte ranges end at the file's end
            with open(f, "rb") as fh:
                header_len = int.from_bytes(fh.read(8), "little")
                ends = [v["data_offsets"][1] for k, v in json.loads(fh.read(header_len)).items() if k != "__metadata__"]
            assert os.path.getsize(f) == 8 + header_len + max(ends)


def test_writer_takes_row_blocks_only_inside_the_tensor_and_wants_all_of_them(tmp_path):
    with pytest.raises(RuntimeError, match="unwritten, e.g. w"):
        with StreamingCheckpointWriter(tmp_path / "o", [("w", torch.float32, (4, 3))]) as writer:
            with pytest.raises(ValueError, match=r"planned shape \(4, 3\), got \(2, 3\) at row 3"):
                writer.write("w", torch.ones(2, 3), 3)
            with pytest.raises(ValueError, match=r"got \(2, 4\)"):
                writer.write("w", torch.ones(2, 4))
            writer.write("w", torch.ones(2, 3), 2)
            with pytest.raises(ValueError, match=r"w: rows 2..3 written twice"):
                writer.write("w", torch.ones(2, 3), 2)  # by bytes alone, rows 0-1 would now look written
            with pytest.raises(ValueError, match=r"w: rows 1..2 written twice"):
                writer.write("w", torch.ones(2, 3), 1)
    assert not (tmp_path / "o").exists()  # rows 0-1 never came


def test_writer_refuses_a_whole_tensor_written_twice(tmp_path):
    with StreamingCheckpointWriter(tmp_path / "o", [("w", torch.float32, (4, 3)), ("s", torch.float32, ())]) as writer:
        writer.write("w", torch.ones(4, 3))
        writer.write("s", torch.tensor(2.0))
        with pytest.raises(ValueError, match=r"w: rows 2..3 written twice"):
            writer.write("w", torch.zeros(2, 3), 2)
        with pytest.raises(ValueError, match=r"s: rows 0..0 written twice"):
            writer.write("s", torch.tensor(3.0))
    with safe_open(str(tmp_path / "o" / "model.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("w"), torch.ones(4, 3)) and f.get_tensor("s").item() == 2.0


def test_writer_casts_to_planned_dtype(tmp_path):
    with StreamingCheckpointWriter(tmp_path / "o", [("w", torch.bfloat16, (4, 4))]) as writer:
        writer.write("w", torch.ones(4, 4))
    with safe_open(str(tmp_path / "o" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("w").dtype == torch.bfloat16


def test_failed_write_publishes_nothing_and_keeps_old_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(RuntimeError):
        with StreamingCheckpointWriter(out, [("w", torch.float32, (2,))], overwrite=True) as writer:
            writer.write("w", torch.ones(2))
            raise RuntimeError("crash mid-merge")
    assert (out / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_unwritten_tensor_is_not_published(tmp_path):
    with pytest.raises(RuntimeError, match="unwritten"):
        with StreamingCheckpointWriter(tmp_path / "o", [("w", torch.float32, (2,)), ("v", torch.float32, (2,))]) as writer:
            writer.write("w", torch.ones(2))
    assert not (tmp_path / "o").exists()


def test_overwrite_replaces_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    with StreamingCheckpointWriter(out, [("w", torch.float32, (2,))], overwrite=True) as writer:
        writer.write("w", torch.ones(2))
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]


def test_reader_reads_sharded_hf_checkpoint_lazily(tmp_path, families):
    base, _ = families("llama")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    with ModelCheckpoint(tmp_path / "sharded") as ck:
        state = model.state_dict()
        assert set(ck.keys()) == set(state)  # llama does not tie lm_head by default
        for key in ck.keys():
            assert torch.equal(ck.read(key), state[key])


def test_reader_loads_pickle_only_when_allowed(tmp_path):
    torch.save({"w": torch.ones(3)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(MergeInputError, match="pickle"):
        ModelCheckpoint(tmp_path)
    with ModelCheckpoint(tmp_path, allow_pickle=True) as ck:
        assert torch.equal(ck.read("w"), torch.ones(3))


def test_reader_rejects_truncated_file(tmp_path):
    save_file({"w": torch.ones(100)}, tmp_path / "model.safetensors")
    path = tmp_path / "model.safetensors"
    os.truncate(path, path.stat().st_size - 10)
    with pytest.raises(MergeInputError, match="truncated"):
        ModelCheckpoint(tmp_path)


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("500MiB") == 500 * 2**20 and parse_size("123") == 123
