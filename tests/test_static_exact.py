"""The streaming merge (reused read buffers, read-ahead, direct writes) gives, bit for bit, what each method computes
on whole tensors read plainly: the I/O path may never change a merged value."""

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from rankmerge.service.cli import main
from rankmerge.workers import static_merge
from rankmerge.workers.checkpoint_reader import ModelCheckpoint
from rankmerge.workers.methods.registry import METHODS, MergeContext, TensorInputs, make_method
from rankmerge.workers.plan import build_plan
from rankmerge.workers.roles import Role
from rankmerge.workers.tta.params import ADAPTIVE_METHODS

FEW_MODELS = {"slerp": 1, "nuslerp": 2}
# regmean reads task data first: its end-to-end check is tests/test_regmean_job.py
STATIC = sorted(m for m in set(METHODS) - set(ADAPTIVE_METHODS) if not METHODS[m].needs_data)


def state(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def expected_outputs(base_dir, task_dirs, method_name, out_dtype):
    """Each output tensor from the method's own functions on plainly loaded whole tensors (no streaming path)."""
    with ModelCheckpoint(base_dir, "base") as base:
        cks = {n: ModelCheckpoint(p, n) for n, p in task_dirs.items()}
        plan = build_plan(base, cks, out_dtype)
        for ck in cks.values():
            ck.close()
    base_sd, task_sds = state(base_dir), [state(p) for p in task_dirs.values()]

    def inputs(entry):
        theta0 = base_sd[entry.key].float()
        taus = torch.stack([sd[src].float() - theta0 for sd, src in zip(task_sds, entry.sources)])
        return TensorInputs(entry.key, entry.role, theta0, taus)

    method = make_method(method_name, {}, MergeContext(tuple(task_dirs), plan.merged_numel))
    for stat_pass in method.stat_passes():
        for entry in plan.merged:
            stat_pass.observe(inputs(entry))
        stat_pass.finish()
    out = {}
    for entry in plan.tensors:
        if entry in plan.merged:
            plain = inputs(entry)
            delta, _ = method.merge(plain)
            out[entry.key] = delta.add_(plain.base).to(entry.out_dtype)
        else:
            out[entry.key] = base_sd[entry.key]
    return out


@pytest.mark.parametrize("method", STATIC)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_merge_equals_whole_tensor_math(method, dtype, families, tmp_path):
    check_streamed_merge(method, dtype, families, tmp_path)


# merged entry by entry on the embeddings at least (with their default parameters): in row blocks there
SEPARABLE = [m for m in STATIC if make_method(m, {}, MergeContext(("a", "b", "c")[: FEW_MODELS.get(m, 3)], 10**6))
             .separable(Role.ELEMENTWISE, (64, 32))]


@pytest.mark.parametrize("method", SEPARABLE)
def test_row_blocks_merge_to_the_same_bits(method, families, tmp_path, monkeypatch):
    """Blocks of a few rows (every tensor of the tiny models is split): the same output, bit for bit."""
    monkeypatch.setattr(static_merge, "PART_BYTES", 4096)
    base_dir, tasks = families("llama", dtype=torch.bfloat16)
    with ModelCheckpoint(base_dir, "base") as base:
        cks = [ModelCheckpoint(p, n) for n, p in tasks.items()]
        plan = build_plan(base, dict(zip(tasks, cks)))
        units = static_merge.row_blocks(plan, make_method(method, {}, MergeContext(tuple(tasks), plan.merged_numel)))
        for ck in cks:
            ck.close()
    split = {u.key for u in units if u.rows is not None}
    assert "model.embed_tokens.weight" in split  # factorizing methods merge it entry by entry (`blocks` keys)
    assert len(split) > len(plan.tensors) // 2 or not METHODS[method].entrywise, (len(split), len(plan.tensors))
    assert all(u.shape[0] * 4 * (len(tasks) + 1) * u.numel // u.shape[0] <= 4096 for u in units if u.rows and u.shape[0] > 1)
    check_streamed_merge(method, torch.bfloat16, families, tmp_path)


def test_row_blocks_keep_what_cannot_be_split_whole(families, monkeypatch):
    """Methods with per-tensor statistics and tied tensors are merged whole; a row read is the rows."""
    monkeypatch.setattr(static_merge, "PART_BYTES", 64)
    base_dir, tasks = families("llama")
    with ModelCheckpoint(base_dir, "base") as base:
        cks = [ModelCheckpoint(p, n) for n, p in tasks.items()]
        plan = build_plan(base, dict(zip(tasks, cks)))
        for ck in cks:
            ck.close()
        key = max(plan.tensors, key=lambda e: e.numel).key
        assert torch.equal(base.read(key, rows=(1, 3)), base.read(key)[1:3])
        with pytest.raises(ValueError, match="outside"):
            base.read(key, rows=(0, 10**6))
    ctx = MergeContext(tuple(tasks), plan.merged_numel)
    ta = make_method("task_arithmetic", {}, ctx)
    assert static_merge.row_blocks(plan, make_method("ties", {"scope": "tensor"}, ctx)) == plan.tensors
    assert static_merge.row_blocks(plan, ta) != plan.tensors
    tied = [replace(e, aliases=("copy",)) for e in plan.tensors]
    assert static_merge.row_blocks(replace(plan, tensors=tied), ta) == tied


def check_streamed_merge(method, dtype, families, tmp_path):
    base, tasks = families("llama", dtype=dtype)
    tasks = dict(list(tasks.items())[: FEW_MODELS.get(method, len(tasks))])
    out = tmp_path / "merged"
    args = ["merge", "--base", str(base), "--method", method, "--out", str(out), "--max-shard-size", "20KB"]
    for name, path in tasks.items():
        args += ["--model", f"{name}={path}"]
    if dtype == torch.bfloat16:
        args += ["--out-dtype", "float16"]  # a third dtype: reads convert out of the read slot, writes cast
    assert main(args) == 0
    merged = state(out)
    expected = expected_outputs(base, tasks, method, torch.float16 if dtype == torch.bfloat16 else None)
    assert len(list(out.glob("model-*.safetensors"))) > 1
    assert set(merged) == set(expected)
    for key, value in expected.items():
        assert merged[key].dtype == value.dtype and torch.equal(merged[key], value), key


def test_read_ring_reuses_in_order_waits_when_full_and_wakes_on_close():
    import threading

    from rankmerge.workers.static_merge import SLOT_ALIGN, ReadRing

    ring = ReadRing(4 * SLOT_ALIGN)
    a, block_a = ring.take(2 * SLOT_ALIGN)
    b, block_b = ring.take(SLOT_ALIGN + 1)  # rounded up to two pages: the ring is full now
    a.fill_(1)
    b.fill_(2)
    assert ring.holds(a[5:]) and not ring.holds(torch.zeros(3))
    ring.release(block_b)  # released out of order: reused only once the older block is released too
    got = []
    waiter = threading.Thread(target=lambda: got.append(ring.take(3 * SLOT_ALIGN)))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive()  # no room: block a still lives, and its bytes are untouched
    assert bool((a == 1).all())
    ring.release(block_a)
    waiter.join(5)
    assert got and got[0][0].data_ptr() == a.data_ptr()  # the whole ring is free again: from the start
    errors = []
    blocked = threading.Thread(target=lambda: _take_or_record(ring, 2 * SLOT_ALIGN, errors))
    blocked.start()
    blocked.join(0.2)
    ring.close()
    blocked.join(5)
    assert not blocked.is_alive() and errors == ["read ring closed"]


def _take_or_record(ring, nbytes, errors):
    try:
        ring.take(nbytes)
    except RuntimeError as exc:
        errors.append(str(exc))


def test_a_tensor_merged_in_row_blocks_reports_its_blocks_info_weighted_by_size():
    parts = [(10, {"kept_fraction": 0.5, "note": "x", "flag": True}), (30, {"kept_fraction": 0.1, "note": "x", "flag": True})]
    assert static_merge.joined_info(parts) == {"kept_fraction": 0.2, "note": "x", "flag": True}
    assert type(static_merge.joined_info(parts)["flag"]) is bool
    assert static_merge.joined_info(parts[:1]) == parts[0][1]
