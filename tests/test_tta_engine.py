"""AdaRank / AdaMerging engine: closed-form gradients, init invariants, and exact resume after SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from rankmerge.service.merge_job import open_inputs
from rankmerge.service.spec import job_from_dict
from rankmerge.service.tta_job import build_merger
from rankmerge.workers.methods.adaptive import spectral_merge, straight_through_mask
from rankmerge.workers.methods.registry import MergeContext, make_method, method_class, spectral_methods
from rankmerge.workers.checkpoint_reader import ModelCheckpoint
from rankmerge.workers.plan import build_plan
from rankmerge.workers.static_merge import load_inputs
from rankmerge.workers.tta.adapters import build_task_models
from rankmerge.workers.tta.data import TaskStream
from rankmerge.workers.tta.params import AdaRankParams

from conftest import make_adaptive_spec as make_job


def test_spectral_merge_backward_matches_autograd():
    gen = torch.Generator().manual_seed(0)
    origin, U, Vh = torch.randn(7, 5, generator=gen), torch.randn(7, 12, generator=gen), torch.randn(12, 5, generator=gen)
    coef = torch.randn(12, generator=gen, dtype=torch.float32)
    target = torch.randn(7, 5, generator=gen)
    c1 = coef.clone().requires_grad_()
    (spectral_merge(origin, U, Vh, c1) * target).sum().backward()
    c2 = coef.clone().requires_grad_()
    ((origin + (U * c2) @ Vh) * target).sum().backward()
    torch.testing.assert_close(c1.grad, c2.grad, atol=1e-5, rtol=1e-5)
    # diag(Uᵀ G V) route, written out
    torch.testing.assert_close(c1.grad, torch.diagonal(U.T @ target @ Vh.T), atol=1e-5, rtol=1e-5)


def test_straight_through_mask_forward_hard_backward_sigmoid():
    logits = torch.tensor([0.1, -0.1, 2.0, -3.0], requires_grad=True)
    b = straight_through_mask(logits, 10.0)
    assert b.tolist() == [1.0, 0.0, 1.0, 0.0]
    b.sum().backward()
    p = torch.sigmoid(logits.detach() / 10)
    torch.testing.assert_close(logits.grad, p * (1 - p) / 10)


def merger_for(spec, tmp_path, stack):
    job = job_from_dict(spec, tmp_path)
    base, tasks, plan = open_inputs(job, stack)
    return job, base, tasks, plan, build_merger(job, plan, base, tasks)


def static_delta(method, params, plan, base, tasks):
    """Static merge of every merged tensor through the registry (stat passes skipped: none needed here)."""
    m = make_method(method, params, MergeContext(tuple(t.name for t in tasks), plan.merged_numel))
    out = {}
    for entry in plan.merged:
        inputs = load_inputs(entry, base, tasks)
        delta, _ = m.merge(inputs)
        out[entry.key] = delta + inputs.base
    return out


@pytest.mark.parametrize("base", list(spectral_methods()))
@pytest.mark.parametrize("base_params", [{}, {"max_rank": 2}])
def test_adarank_at_init_equals_its_static_method(families, tmp_path, base, base_params):
    """Every registered spectral method, through the one interface: AdaRank's step 0 is its static merge."""
    if "max_rank" in base_params and "max_rank" not in method_class(base).Params.model_fields:
        pytest.skip(f"{base} has no max_rank")
    params = AdaRankParams.model_validate({"base": base, "base_params": base_params})
    static, static_params = params.static_twin()
    assert static == base
    with ExitStack() as stack:
        _, base_ck, tasks, plan, merger = merger_for(make_job(families, tmp_path, params=params.model_dump(by_alias=True)), tmp_path, stack)
        expected = static_delta(static, static_params, plan, base_ck, tasks)
        got = merger.final_weights()
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("factorization,static,params", [
    ("ta", "task_arithmetic", {"lambda": 0.3}),
    ("cart", "cart", {"lambda": 2.3, "rho": 0.16}),
    ("tsv_m", "tsv_m", {"alpha": 1.0}),
    ("iso_cts", "iso_cts", {"alpha": 1.0}),
])
def test_legacy_factorization_specs_start_at_the_same_static_merge(families, tmp_path, factorization, static, params):
    """Specs written before `base` (factorization, lambda, rho at the top level) still parse to the same job."""
    adarank_params = {"factorization": factorization, "lambda": params.get("lambda", params.get("alpha"))}
    if "rho" in params:
        adarank_params["rho"] = params["rho"]
    with ExitStack() as stack:
        _, base, tasks, plan, merger = merger_for(make_job(families, tmp_path, params=adarank_params), tmp_path, stack)
        expected = static_delta(static, params, plan, base, tasks)
        got = merger.final_weights()
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, atol=2e-5, rtol=1e-4)


def test_adamerging_at_init_is_task_arithmetic(families, tmp_path):
    with ExitStack() as stack:
        _, base, tasks, plan, merger = merger_for(make_job(families, tmp_path, method="adamerging", params={"lambda": 0.3}), tmp_path, stack)
        expected = static_delta("task_arithmetic", {"lambda": 0.3}, plan, base, tasks)
        for key, value in merger.final_weights().items():
            torch.testing.assert_close(value, expected[key], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("factorization", ["cart", "iso_cts"])
@pytest.mark.parametrize("cache_masked", [True, False])
def test_mask_and_lambda_gradients_match_plain_autograd_on_a_real_model(families, tmp_path, factorization, cache_masked):
    """Both custom backwards (cached masked matrices; one GEMM) give autograd's mask and λ gradients through a tiny ViT."""
    params = {"factorization": factorization, "lambda": 1.5, "cache_masked": cache_masked}
    with ExitStack() as stack:
        job, base, tasks, plan, merger = merger_for(make_job(families, tmp_path, params=params), tmp_path, stack)
        models = build_task_models(plan, base, tasks)
        streams = [TaskStream(t.name, {"pixel_values": torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(i))}, 0) for i, t in enumerate(tasks)]
        batches = [s.next_batch(6) for s in streams]

        def loss(weights):
            return sum(models.entropy(weights, t, b) for t, b in enumerate(batches))

        loss(merger.merged_weights()).backward()
        fast = {"lambda": merger.lam.grad.clone(), **{k: v.grad.clone() for k, v in merger.logits.items()}}
        for p in [merger.lam, *merger.logits.values()]:
            p.grad = None
        # the same merge with plain autograd ops
        lam = merger.lam
        weights = {}
        for k, slot in enumerate(merger.slots):
            if hasattr(slot, "U"):
                coef = lam[slot.owner, k] * merger.masks(slot.key) * slot.s
                weights[slot.key] = slot.origin + (slot.U * coef) @ slot.Vh
            else:
                weights[slot.key] = slot.origin + torch.tensordot(lam[: merger.num_tasks, k], slot.taus, dims=1)
        loss(weights).backward()
        torch.testing.assert_close(fast["lambda"], merger.lam.grad, atol=1e-6, rtol=1e-4)
        for key, logits in merger.logits.items():
            torch.testing.assert_close(fast[key], logits.grad, atol=1e-8, rtol=1e-4)
        assert float(merger.lam.grad.abs().sum()) > 0 and any(float(v.grad.abs().sum()) > 0 for v in merger.logits.values())


def close(a, b) -> bool:
    """Equal structure and text, numbers within float tolerance (reports of runs on a GPU)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return a == pytest.approx(b, rel=1e-4, abs=1e-5)
    return a == b


def run_cli(job_file, *extra):
    return subprocess.Popen([sys.executable, "-m", "rankmerge", "run", str(job_file), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="torch sees no CUDA GPU")])])
def test_resume_after_sigkill_is_bitwise_identical(families, tmp_path, device):
    """On the CPU bit for bit; on a GPU (benchmarks/gpu_check.sh) within float tolerance, kernels may differ in order."""
    spec = make_job(families, tmp_path, params={"factorization": "ta", "lambda": 0.3}, steps=12, lr=0.05, checkpoint_every=3)
    spec["device"] = device
    reference_spec = dict(spec, output=str(tmp_path / "reference"))
    (tmp_path / "ref.yaml").write_text(yaml.safe_dump(reference_spec))
    done = run_cli(tmp_path / "ref.yaml")
    out, err = done.communicate(timeout=300)
    assert done.returncode == 0, err

    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    victim = run_cli(tmp_path / "job.yaml")
    checkpoints = tmp_path / "out.job" / "checkpoints"
    deadline = time.time() + 240
    while not list(checkpoints.glob("step_00000006")) and time.time() < deadline and victim.poll() is None:
        time.sleep(0.02)
    assert victim.poll() is None, "the run ended before it could be killed"
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "out").exists()
    resumed = run_cli(tmp_path / "job.yaml", "--resume")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert report["resumed_from_step"] >= 6, "the resumed run must start after the last checkpoint"
    assert report["timing"]["teacher_seconds"] == 0, "the resumed run reuses the job's teacher targets"
    reference = json.loads((tmp_path / "reference" / "merge_report.json").read_text())
    assert report["device"].startswith(device)
    same = (lambda a, b: a == b) if device == "cpu" else close
    assert same(report["history"], reference["history"])
    assert same(report["guard"]["curve"], reference["guard"]["curve"]) and report["published_step"] == reference["published_step"]
    for name in ("adaptive/masks.safetensors", "adaptive/owners.safetensors", "adaptive/lambda.safetensors", "model.safetensors"):
        a, b = load_file(str(tmp_path / "out" / name)), load_file(str(tmp_path / "reference" / name))
        assert a.keys() == b.keys()
        for key in a:
            if device == "cpu":
                assert torch.equal(a[key], b[key]), f"{name}:{key} differs after resume"
            else:
                torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
    assert same(report["lambda"], reference["lambda"])
    masks, owners = (load_file(str(tmp_path / "out" / "adaptive" / f)) for f in ("masks.safetensors", "owners.safetensors"))
    assert owners.keys() == masks.keys() and all(owners[k].shape == masks[k].shape for k in masks)
    for key, ranks in report["learned_ranks"].items():  # each mask entry's owner, as exported, gives the learned ranks
        assert torch.bincount(owners[key][masks[key].bool()], minlength=len(ranks)).tolist() == ranks


def test_rerun_without_resume_refuses_existing_checkpoints(families, tmp_path, capsys):
    from rankmerge.service.cli import main

    spec = make_job(families, tmp_path, params={"factorization": "ta"}, steps=2)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    assert main(["run", str(tmp_path / "job.yaml")]) == 0
    capsys.readouterr()
    assert main(["run", str(tmp_path / "job.yaml"), "--overwrite"]) == 2
    assert "--resume" in capsys.readouterr().err


def test_task_stream_cursor_resumes_exactly():
    data = {"input_ids": torch.arange(10).unsqueeze(1)}
    a = TaskStream("t", data, seed=3)
    seen = [a.next_batch(4)["input_ids"].flatten().tolist() for _ in range(3)]
    b = TaskStream("t", data, seed=3)
    b.next_batch(4)
    c = TaskStream("t", data, seed=3)
    c.load_state(b.state())
    assert [c.next_batch(4)["input_ids"].flatten().tolist() for _ in range(2)] == seen[1:]
    assert sorted(seen[0] + seen[1] + seen[2][:2]) == list(range(10))  # one epoch covers every row once


FAMILY_INPUTS = {
    "vit": lambda g: {"pixel_values": torch.randn(12, 1, 8, 8, generator=g)},
    "clip_vision": lambda g: {"pixel_values": torch.randn(12, 3, 8, 8, generator=g)},
    "bert": lambda g: {"input_ids": torch.randint(2, 64, (12, 6), generator=g), "attention_mask": torch.ones(12, 6, dtype=torch.long)},
    "roberta": lambda g: {"input_ids": torch.randint(3, 64, (12, 6), generator=g), "attention_mask": torch.ones(12, 6, dtype=torch.long)},
    "gpt2": lambda g: {"input_ids": torch.randint(1, 64, (12, 6), generator=g), "attention_mask": torch.ones(12, 6, dtype=torch.long)},
    "llama": lambda g: {"input_ids": torch.randint(1, 64, (12, 6), generator=g),
                        "attention_mask": torch.tensor([[1] * 6] * 6 + [[1] * 4 + [0] * 2] * 6)},
}


@pytest.mark.parametrize("family", list(FAMILY_INPUTS))
@pytest.mark.parametrize("method,params", [("adarank", {"base": "cart", "base_params": {"lambda": 1.0}}), ("adamerging", {"clamp": True})])
def test_every_adapter_adapts_and_exports(families, tmp_path, family, method, params):
    from rankmerge.service.cli import main
    from transformers import AutoModel

    base, tasks = families(family)
    data = {}
    for i, name in enumerate(tasks):
        path = tmp_path / f"{name}.safetensors"
        save_file(FAMILY_INPUTS[family](torch.Generator().manual_seed(i)), path)
        data[name] = str(path)
    spec = {"base": str(base), "models": {k: str(v) for k, v in tasks.items()}, "method": method, "params": params,
            "output": str(tmp_path / "out"), "tta": {"data": data, "steps": 2, "batch_size": 4, "lr": 0.01, "select": "final"}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    assert main(["run", str(tmp_path / "job.yaml")]) == 0
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in report["history"])
    assert torch.tensor(report["lambda"]).sub(params.get("base_params", params).get("lambda", 0.3)).abs().max() > 0, "λ must have moved"
    AutoModel.from_pretrained(tmp_path / "out")


def test_cached_and_gemm_merges_agree_after_masks_flip(families, tmp_path):
    """After many flips, the exactly-refreshed cache gives the same masks and weights as the plain GEMM path."""
    results = []
    for cache_masked in (True, False):
        spec = make_job(families, tmp_path, params={"factorization": "ta", "cache_masked": cache_masked}, lr=0.05)
        with ExitStack() as stack:
            job, base, tasks, plan, merger = merger_for(spec, tmp_path, stack)
            models = build_task_models(plan, base, tasks)
            streams = [TaskStream(t.name, {"pixel_values": torch.randn(12, 1, 8, 8, generator=torch.Generator().manual_seed(i))}, 0) for i, t in enumerate(tasks)]
            flips = 0
            for _ in range(6):
                batches = [s.next_batch(6) for s in streams]
                _, _, f = merger.step(lambda w: (sum(models.entropy(w, t, b) for t, b in enumerate(batches)), []))
                flips += f
            results.append((flips, merger.hard_masks(), merger.final_weights()))
    assert results[0][0] > 0, "the test needs mask flips"
    for key in results[0][1]:
        assert torch.equal(results[0][1][key], results[1][1][key])
    for key in results[0][2]:
        torch.testing.assert_close(results[0][2][key], results[1][2][key], atol=1e-4, rtol=1e-4)


def test_memory_options_cap_components_and_keep_bf16_factors(families, tmp_path):
    params = {"factorization": "ta", "max_rank": 3, "mask_range": 0.5, "factor_dtype": "bfloat16", "learn_lambda": False}
    with ExitStack() as stack:
        _, base, tasks, plan, merger = merger_for(make_job(families, tmp_path, params=params), tmp_path, stack)
        spectral = [s for s in merger.slots if hasattr(s, "U")]
        assert spectral and all(s.U.dtype == torch.bfloat16 and s.Vh.dtype == torch.bfloat16 for s in spectral)
        for s in spectral:
            rank = min(s.origin.shape)
            assert torch.bincount(s.owner).max() <= min(3, -(-rank // 2))
        assert not merger.lam.requires_grad and all(v.requires_grad for v in merger.logits.values())
        assert all(len(r) == len(tasks) for r in merger.learned_ranks().values())


@pytest.mark.parametrize("kind", ["vit", "clip_vision"])
def test_images_of_another_size_use_interpolated_position_embeddings(families, kind):
    """Adapting on smaller (or larger) unlabeled images than the checkpoint's size works for ViT and CLIP."""
    base_dir, task_dirs = families(kind)
    with ExitStack() as stack:
        base = stack.enter_context(ModelCheckpoint(base_dir, "base"))
        tasks = [stack.enter_context(ModelCheckpoint(p, n)) for n, p in task_dirs.items()]
        plan = build_plan(base, {t.name: t for t in tasks})
        models = build_task_models(plan, base, tasks)
        weights = {e.key: base.read(e.key).float() for e in plan.merged}
        channels = 1 if kind == "vit" else 3
        for size in (8, 16):
            logits = models.logits(weights, 0, {"pixel_values": torch.randn(2, channels, size, size)})
            assert logits.shape == (2, 3) and bool(torch.isfinite(logits).all())


@pytest.mark.parametrize("method,params", [("adarank", {"base": "tsv_m", "base_params": {"svd": "randomized", "oversample": 2}}), ("adamerging", {})])
def test_adaptive_dry_run_predicts_time_and_memory_and_writes_nothing(families, tmp_path, capsys, method, params):
    from rankmerge.service.cli import main

    spec = make_job(families, tmp_path, method=method, params=params)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["run", str(path), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "predicted wall time" in text and "factorization" in text and "predicted peak memory" in text
    seconds = float(text.split("predicted wall time: ")[1].split(" s")[0])
    gib = float(text.split("predicted peak memory: ")[1].split(" GiB")[0])
    assert seconds > 0 and 0.05 < gib < 64
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no job dir


def test_a_job_log_gets_periodic_progress_lines(families, tmp_path):
    """stderr is a pipe here (a job log): no bar, but progress lines with step counts, without -v."""
    spec = make_job(families, tmp_path, params={"factorization": "ta"}, steps=6)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    done = subprocess.run([sys.executable, "-m", "rankmerge", "run", str(tmp_path / "job.yaml")], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "RANKMERGE_PROGRESS_SECONDS": "0"})
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("INFO rankmerge.workers.progress: adapt")]
    assert lines and any("6/6" in line for line in lines), done.stderr[-2000:]
    assert "\r" not in done.stderr
