"""Memory-lean adaptive merging at LLM scale, on tiny models: the automatic choices (masked-matrix cache, compute
dtype, object-store size), 16-bit task-vector stacks, shards that free their shipped weights, and gradients joined
from ZeRO-3 partitions."""

import json
from contextlib import ExitStack

import pytest
import torch
import yaml
from safetensors.torch import save_file

from rankmerge.cluster.ray_runtime import object_store_size
from rankmerge.service.spec import job_from_dict
from rankmerge.service.tta_job import compute_dtype
from rankmerge.workers.methods.adaptive import TaskVectorSum
from rankmerge.workers.spectral_shard import SpectralShard, join_gradient
from rankmerge.workers.tta.engine import caches_masked
from rankmerge.workers.tta.params import AdaRankParams
from rankmerge.workers.tta.sources import Sources, open_sources
from rankmerge.workers.tta.state import SpectralSlot

GB = 1024**3


def slot(m: int, n: int, rank: int, tasks: int, dtype: torch.dtype) -> SpectralSlot:
    return SpectralSlot("w", torch.zeros(m, n), torch.zeros(m, tasks * rank, dtype=dtype), torch.ones(tasks * rank),
                        torch.zeros(tasks * rank, n, dtype=dtype), torch.arange(tasks).repeat_interleave(rank),
                        torch.ones(tasks * rank, dtype=torch.bool))


def test_auto_cache_only_where_it_costs_no_more_than_the_factors():
    assert caches_masked(slot(64, 64, 64, 8, torch.float32), "auto")  # full-rank fp32 factors: cache ≤ factors
    assert not caches_masked(slot(64, 176, 8, 8, torch.bfloat16), "auto")  # capped bf16 factors: cache would dominate
    assert caches_masked(slot(64, 176, 8, 8, torch.bfloat16), True) and not caches_masked(slot(64, 64, 64, 8, torch.float32), False)


def test_task_vector_sum_over_bf16_stacks_matches_fp32_autograd():
    gen = torch.Generator().manual_seed(0)
    origin, taus = torch.randn(5, 7, generator=gen), torch.randn(3, 5, 7, generator=gen).bfloat16()
    lam = torch.tensor([0.3, -0.2, 0.7], requires_grad=True)
    grad = torch.randn(5, 7, generator=gen)
    out = TaskVectorSum.apply(origin.bfloat16(), lam, taus)
    torch.autograd.backward(out, grad)
    ref_lam = lam.detach().clone().requires_grad_(True)
    ref = origin.bfloat16().float() + torch.tensordot(ref_lam, taus.float(), dims=1)
    torch.autograd.backward(ref, grad)
    assert out.dtype == torch.float32 and taus.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lam.grad, ref_lam.grad)


def test_join_gradient_from_zero3_partitions_or_one_full_gradient():
    full = torch.arange(10.0).reshape(2, 5)
    parts = [torch.arange(0.0, 6.0), torch.cat([torch.arange(6.0, 10.0), torch.zeros(2)])]  # 2 ranks, padded to 12
    assert torch.equal(join_gradient(parts, full.shape), full)
    assert join_gradient([full], full.shape) is full


def test_shard_that_frees_its_shipped_weights_steps_exactly_like_one_that_keeps_them(families):
    base, tasks = families("llama", dtype=torch.bfloat16)
    sources = Sources(base, dict(tasks))
    params = AdaRankParams.model_validate({"factorization": "ta", "max_rank": 4, "factor_dtype": "bfloat16"})
    with ExitStack() as stack:
        columns = list(range(len(open_sources(sources, stack)[2].merged)))
    states = []
    for release in (False, True):
        shard = SpectralShard(sources, params, 0.05, columns, threads=1)
        for step in range(3):
            made = shard.iter_materialize(torch.bfloat16) if release else shard.materialize(torch.bfloat16).items()
            weights = {k: v.clone() for k, v in made}
            gen = torch.Generator().manual_seed(step)
            shard.apply_gradients([{k: torch.randn(v.shape, generator=gen).bfloat16() for k, v in weights.items()}])
        states.append(shard.state())
    assert states[0].keys() == states[1].keys()
    for name in states[0]:
        assert torch.equal(states[0][name], states[1][name]), name
    assert all(slot.taus.dtype == torch.bfloat16 and slot.origin.dtype == torch.bfloat16
               for slot in shard.merger.slots if not isinstance(slot, SpectralSlot))


def llama_job(families, tmp_path, dtype, **tta):
    base, tasks = families("llama", dtype=dtype)
    data = {}
    for i, name in enumerate(tasks):
        path = tmp_path / f"{name}.safetensors"
        gen = torch.Generator().manual_seed(i)
        save_file({"input_ids": torch.randint(1, 64, (8, 6), generator=gen), "attention_mask": torch.ones(8, 6, dtype=torch.long)}, path)
        data[name] = str(path)
    return {"base": str(base), "models": {k: str(v) for k, v in tasks.items()}, "method": "adarank",
            "params": {"factorization": "ta", "max_rank": 4, "factor_dtype": "bfloat16"}, "output": str(tmp_path / "out"),
            "tta": {"data": data, "steps": 2, "batch_size": 4, "lr": 0.01, **tta}}


@pytest.mark.parametrize("dtype,expected", [(torch.bfloat16, "bfloat16"), (torch.float32, "float32")])
def test_auto_compute_dtype_follows_the_export_dtype(families, tmp_path, dtype, expected):
    from rankmerge.service.merge_job import open_inputs

    job = job_from_dict(llama_job(families, tmp_path, dtype), tmp_path)
    with ExitStack() as stack:
        plan = open_inputs(job, stack)[2]
        assert compute_dtype("auto", plan) == expected
        assert compute_dtype("float32", plan) == "float32"


def test_bf16_llama_adapts_in_bf16_and_reports_entropy_and_timing(families, tmp_path):
    from rankmerge.service.cli import main

    (tmp_path / "job.yaml").write_text(yaml.safe_dump(llama_job(families, tmp_path, torch.bfloat16)))
    assert main(["run", str(tmp_path / "job.yaml")]) == 0
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert [len(h["task_loss"]) for h in report["history"]] == [3, 3]
    assert all(torch.isfinite(torch.tensor(h["task_loss"])).all() for h in report["history"])
    assert len(report["timing"]["step_seconds"]) == 2 and report["timing"]["shard_build_seconds"] > 0
    assert_vocab_static(tmp_path / "out")


def assert_vocab_static(out):
    """A causal LM's vocabulary tensors keep λ0 (`vocab: auto`); every other λ column learns."""
    from safetensors import safe_open

    with safe_open(str(out / "adaptive" / "lambda.safetensors"), "pt") as f:
        lam, columns = f.get_tensor("lambda"), json.loads(f.metadata()["columns"])
    vocab = [i for i, key in enumerate(columns) if key.endswith(("embed_tokens.weight", "lm_head.weight"))]
    others = [i for i in range(len(columns)) if i not in vocab]
    assert len(vocab) == 2 and torch.all(lam[:, vocab] == 0.3)
    assert lam[:-1, others].sub(0.3).abs().min() > 0, "every other λ must have moved"


@pytest.mark.parametrize("vocab,expected", [("auto", 2), ("adapt", 0), ("static", 2)])
def test_vocab_tensors_are_static_for_causal_lms_unless_asked(families, vocab, expected):
    from rankmerge.workers.tta.factory import static_keys

    base, tasks = families("llama")
    params = AdaRankParams.model_validate({"vocab": vocab})
    with ExitStack() as stack:
        plan = open_sources(Sources(base, dict(tasks)), stack)[2]
        assert len(static_keys(params, plan, "causal_lm")) == expected
        assert len(static_keys(params, plan, "classification")) == (2 if vocab == "static" else 0)


def test_object_store_holds_a_step_with_margin_within_half_the_memory():
    assert object_store_size(0, 24 * GB) == int(2.4 * GB)  # the small-job default: 10 % of memory
    assert object_store_size(4 * GB, 24 * GB) == 8 * GB
    assert object_store_size(40 * GB, 24 * GB) == 12 * GB


@pytest.fixture
def local_ray():
    import os

    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=128 * 1024**2, log_to_driver=False)
    yield
    ray.shutdown()


def test_bf16_llama_on_zero3_workers_matches_the_local_executor(families, tmp_path, local_ray):
    """The LLM path end to end: bf16 ZeRO-3 ranks with frozen vocabulary parameters, partitioned gradients."""
    from rankmerge.service.tta_job import run_adaptive_job

    spec = llama_job(families, tmp_path, torch.bfloat16)
    spec["resources"] = {"shards": 2, "workers": 2, "partition": "zero3"}
    reports = {}
    for executor in ("local", "ray"):
        job = job_from_dict(dict(spec, output=str(tmp_path / executor)), tmp_path)
        reports[executor] = run_adaptive_job(job, executor=executor)
        assert_vocab_static(tmp_path / executor)
    local, ray_ = (torch.tensor([h["task_loss"] for h in reports[e]["history"]]) for e in ("local", "ray"))
    torch.testing.assert_close(ray_, local, rtol=2e-2, atol=0)  # bf16 forward over other batch splits
    assert reports["ray"]["timing"]["bytes_per_step"] > 0


def test_a_static_merge_never_imports_model_classes(families, tmp_path):
    """transformers (≈ 150 MB and a second of imports) is for adaptive jobs, zero-shot heads and RegMean's data pass;
    a plain static merge, also one with a job spec, reads headers and tensors only."""
    import subprocess
    import sys

    base, tasks = families("vit")
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({"base": str(base), "models": {n: str(p) for n, p in tasks.items()},
                                    "method": "tsv_m", "output": str(tmp_path / "spec-out")}))
    args = ["merge", "--base", str(base), "--method", "ties", "--out", str(tmp_path / "out")]
    args += [a for name, path in tasks.items() for a in ("--model", f"{name}={path}")]
    code = ("import sys\nfrom rankmerge.service.cli import main\n"
            f"assert main({args!r}) == 0 and main(['merge', {str(spec)!r}]) == 0\n"
            "print(sorted(m for m in ('transformers', 'datasets', 'peft') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_a_task_arithmetic_merge_holds_row_blocks_not_whole_embeddings(tmp_path):
    """The embeddings' inputs (base + 3 fine-tunes: 4 × 66 MB) never sit in memory at once: an entrywise method merges
    them in row blocks of ~16 MiB of inputs, so the merge's peak stays far below one embedding's inputs."""
    import subprocess
    import sys

    from rankmerge.service.tiny_models import make_family

    base, tasks = make_family("llama", tmp_path / "family", sizes={"vocab_size": 32000, "hidden_size": 512,
                                                                    "num_hidden_layers": 1, "intermediate_size": 64})
    args = ["merge", "--base", str(base), "--method", "task_arithmetic", "--out", str(tmp_path / "out"), "--overwrite"]
    args += [a for name, path in tasks.items() for a in ("--model", f"{name}={path}")]
    warm_up = args + ["--model", f"d={tasks['task0']}", "--set", "lambda=0.0"]  # every import done, no more
    code = ("from rankmerge.service.cli import main\nfrom rankmerge.workers.memory import current_rss_bytes, peak_rss_bytes\n"
            f"assert main({warm_up!r}) == 0\nbefore = current_rss_bytes()\n"
            f"assert main({args!r}) == 0\nprint(peak_rss_bytes() - before)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    grown = int(done.stdout.strip().splitlines()[-1])
    one_embedding_inputs = 4 * 32000 * 512 * 4
    assert grown < one_embedding_inputs / 2, (grown / 2**20, one_embedding_inputs / 2**20)
