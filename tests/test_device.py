"""The `device` setting: explicit CPU equals the default bit for bit, shard state lives on the configured device,
checkpoints are device-independent, an absent GPU is a one-line error. `gpu`-marked tests compare CUDA with the CPU
(run by benchmarks/gpu_check.sh; skipped where torch sees no GPU)."""

import json
from contextlib import ExitStack

import pytest
import torch
import yaml
from safetensors.torch import save_file

from rankmerge.service.cli import main
from rankmerge.service.merge_job import open_inputs
from rankmerge.service.spec import job_from_dict
from rankmerge.service.tta_job import start_executor
from rankmerge.workers.errors import MergeInputError
from rankmerge.workers.methods.registry import METHODS
from rankmerge.workers.tta.state import ElementwiseSlot, SpectralSlot

from conftest import make_adaptive_spec as make_job

HAS_CUDA = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="torch sees no CUDA GPU")


@pytest.fixture(autouse=True)
def float32_convolutions(monkeypatch):
    """cuDNN convolutions default to TF32 (10-bit mantissa; ViT's patch embedding is one): CUDA is compared with the
    CPU in float32."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


FEW_TASKS = {"slerp": 1, "nuslerp": 2}  # methods defined for a fixed number of fine-tuned models


def merge(families, out, method, *extra):
    base, tasks = families("vit")
    args = ["merge", "--base", str(base), "--method", method, "--out", str(out)]
    for name, path in list(tasks.items())[:FEW_TASKS.get(method)]:
        args += ["--model", f"{name}={path}"]
    assert main(args + list(extra)) == 0
    return (out / "model.safetensors").read_bytes(), json.loads((out / "merge_report.json").read_text())


@pytest.mark.parametrize("method", ["tsv_m", "ties", "dare"])
def test_explicit_cpu_static_merge_equals_the_default_bitwise(families, tmp_path, capsys, method):
    default, _ = merge(families, tmp_path / "default", method)
    explicit, report = merge(families, tmp_path / "cpu", method, "--device", "cpu")
    assert explicit == default
    assert report["device"] == "cpu"
    assert "on cpu in" in capsys.readouterr().out


@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal on a machine without a GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_a_gpu_asked_for_without_one_is_a_one_line_error(families, tmp_path, capsys, device):
    base, tasks = families("vit")
    args = ["merge", "--base", str(base), "--method", "tsv_m", "--out", str(tmp_path / "out"), "--device", device]
    assert main(args + [f"--model={n}={p}" for n, p in tasks.items()]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and " — " in err and device in err
    assert not (tmp_path / "out").exists()


def test_a_malformed_device_is_a_spec_error(families, tmp_path, capsys):
    base, tasks = families("vit")
    args = ["merge", "--base", str(base), "--method", "tsv_m", "--out", str(tmp_path / "out"), "--device", "gpu0"]
    assert main(args + [f"--model={n}={p}" for n, p in tasks.items()]) == 2
    err = capsys.readouterr().err.strip()
    assert "'device'" in err and "cuda[:N]" in err and "\n" not in err


def test_the_device_is_not_part_of_the_job_identity(families, tmp_path):
    data = make_job(families, tmp_path)
    hashes = {job_from_dict({**data, "device": d}, tmp_path).spec_hash() for d in ("auto", "cpu", "cuda:3")}
    assert len(hashes) == 1


def test_explicit_cpu_adaptive_run_equals_the_default(families, tmp_path):
    outputs = []
    for name, extra in (("default", []), ("cpu", ["--device", "cpu"])):
        folder = tmp_path / name
        folder.mkdir()
        spec = folder / "job.yaml"
        spec.write_text(yaml.safe_dump(make_job(families, folder, steps=3)))
        assert main(["run", str(spec), *extra]) == 0
        outputs.append((folder / "out" / "model.safetensors").read_bytes())
        assert json.loads((folder / "out" / "merge_report.json").read_text())["device"] == "cpu"
    assert outputs[0] == outputs[1]


def executor(families, tmp_path, device: str, stack: ExitStack, method: str = "adarank", params: dict | None = None,
             objective: str = "entropy"):
    """An in-process executor over the tiny ViT family (entropy or infomax: no teacher targets needed)."""
    tmp_path.mkdir(exist_ok=True)
    spec = make_job(families, tmp_path, method=method, params=params, objective=objective)
    job = job_from_dict({**spec, "device": device}, tmp_path)
    _, tasks, plan = open_inputs(job, stack)
    runner = start_executor(job, plan, "local", None)
    stack.callback(runner.close)
    return runner, len(tasks)


def test_several_worker_ranks_sharing_a_gpu_are_refused_before_ray_starts(families, tmp_path):
    """NCCL refuses two ranks of one group on one GPU: fractional GPUs per worker with several workers is a spec
    error, caught before a cluster is touched (no GPU needed to see it)."""
    spec = make_job(families, tmp_path, objective="entropy")
    job = job_from_dict({**spec, "resources": {"workers": 2, "gpus_per_worker": 0.5}}, tmp_path)
    with ExitStack() as stack:
        _, _, plan = open_inputs(job, stack)
        with pytest.raises(MergeInputError, match="NCCL refuses two ranks on one GPU.*gpus_per_worker: 1"):
            start_executor(job, plan, "ray", None)


def batch(num_tasks: int, step: int) -> list[torch.Tensor]:
    return [torch.arange(6) + 6 * (step % 3) for _ in range(num_tasks)]


def state_tensors(runner) -> dict[str, torch.Tensor]:
    """Every tensor a shard holds: slots, λ, mask logits, Adam moments."""
    merger = runner.shard.merger
    out = {"lambda": merger.lam, **{f"mask/{k}": v for k, v in merger.logits.items()}}
    for slot in merger.slots:
        fields = ("origin", "U", "s", "Vh", "owner", "initial_mask") if isinstance(slot, SpectralSlot) else ("origin", "taus")
        out.update({f"{slot.key}/{f}": getattr(slot, f) for f in fields})
    for param, moments in merger.optimizer.state.items():
        out.update({f"adam/{id(param)}/{f}": moments[f] for f in ("exp_avg", "exp_avg_sq")})
    return out


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, needs_gpu])])
def test_every_shard_state_tensor_is_on_the_configured_device(families, tmp_path, device):
    with ExitStack() as stack:
        runner, num_tasks = executor(families, tmp_path, device, stack)
        runner.step(batch(num_tasks, 0))
        tensors = state_tensors(runner)
        assert any(k.startswith("adam/") for k in tensors) and any(k.endswith("/U") for k in tensors)
        wrong = {k: str(v.device) for k, v in tensors.items() if v.device.type != device}
        assert not wrong
        float_state = {k: v.dtype for k, v in tensors.items() if k == "lambda" or k.startswith(("mask/", "adam/"))}
        assert set(float_state.values()) == {torch.float32}
        assert all(isinstance(s, (SpectralSlot, ElementwiseSlot)) for s in runner.shard.merger.slots)
        checkpoint = runner.state()
        assert {v.device.type for v in checkpoint.values()} == {"cpu"}  # checkpoints never depend on the device
        assert {v.device.type for v in runner.hard_masks().values()} == {"cpu"}
        assert runner.device.startswith(device)


def run_steps(runner, num_tasks: int, steps: range) -> None:
    for step in steps:
        runner.step(batch(num_tasks, step))


def test_a_checkpoint_resumes_under_another_device_setting(families, tmp_path):
    """Written with `device: cpu`, restored with `device: auto` (the CPU here): the continued run is the uninterrupted one."""
    with ExitStack() as stack:
        first, num_tasks = executor(families, tmp_path / "a", "cpu", stack)
        run_steps(first, num_tasks, range(2))
        checkpoint = first.state()
        run_steps(first, num_tasks, range(2, 4))
        second, _ = executor(families, tmp_path / "b", "auto", stack)
        second.load_state(checkpoint)
        run_steps(second, num_tasks, range(2, 4))
        if HAS_CUDA:  # `auto` picked the GPU: equal within floating-point tolerance
            for key, value in first.state().items():
                torch.testing.assert_close(second.state()[key], value, atol=1e-4, rtol=1e-4)
            return
        a, b = first.state(), second.state()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)


# ---- CUDA against the CPU (benchmarks/gpu_check.sh runs these on a GPU machine) -----------------------------------------
LOOSE = {"wudi": {"atol": 1e-4, "rtol": 1e-3}}  # hundreds of Adam steps: rounding differences compound


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("method", sorted(m for m, cls in METHODS.items() if not cls.needs_data))
def test_cuda_static_merge_matches_cpu(families, tmp_path, method):
    """Every static method (its own masks, draws and statistics included) on the GPU gives the CPU's merge."""
    from safetensors.torch import load_file

    merge(families, tmp_path / "cpu", method, "--device", "cpu")
    _, report = merge(families, tmp_path / "cuda", method, "--device", "cuda")
    assert report["device"].startswith("cuda")
    cpu, cuda = load_file(str(tmp_path / "cpu" / "model.safetensors")), load_file(str(tmp_path / "cuda" / "model.safetensors"))
    assert cpu.keys() == cuda.keys()
    for key in cpu:
        torch.testing.assert_close(cuda[key], cpu[key], **LOOSE.get(method, {"atol": 1e-5, "rtol": 1e-4}))


@pytest.mark.gpu
@needs_gpu
def test_cuda_regmean_gram_matrices_match_cpu(families, tmp_path):
    """RegMean's Gram matrices come from forwards of each task model over its data: on the job's device."""
    from safetensors.torch import load_file

    from rankmerge.service.merge_job import run_merge_job

    spec = make_job(families, tmp_path, method="regmean")
    for device in ("cpu", "cuda"):
        assert run_merge_job(job_from_dict({**spec, "device": device, "output": str(tmp_path / device)}, tmp_path))
    for name in ("{}/model.safetensors", *(f"{{}}.job/grams/{t}.safetensors" for t in spec["models"])):
        a, b = (load_file(str(tmp_path / name.format(device))) for device in ("cpu", "cuda"))
        assert a.keys() == b.keys() and a
        for key in a:
            torch.testing.assert_close(b[key], a[key], atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("method, objective", [("adarank", "entropy"), ("adamerging", "entropy"), ("adarank", "infomax")])
def test_cuda_adaptive_steps_match_cpu(families, tmp_path, method, objective):
    with ExitStack() as stack:
        cpu, num_tasks = executor(families, tmp_path / "cpu", "cpu", stack, method, None, objective)
        cuda, _ = executor(families, tmp_path / "cuda", "cuda", stack, method, None, objective)
        run_steps(cpu, num_tasks, range(4))
        run_steps(cuda, num_tasks, range(4))
        a, b = cpu.state(), cuda.state()
        for key in a:
            torch.testing.assert_close(b[key], a[key], atol=1e-4, rtol=1e-4)
        on_cpu, on_cuda = next(cpu.weights_by_shard("final")), next(cuda.weights_by_shard("final"))
        for key, weight in on_cpu.items():
            torch.testing.assert_close(on_cuda[key], weight, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@needs_gpu
def test_cuda_distilled_job_with_its_guard_matches_cpu(families, tmp_path):
    """The driver's own model math runs on the job's device too: teacher targets, the guard's held-out scoring and
    the evaluation; the same job as on the CPU."""
    assert_same_job_on(families, tmp_path, ("cpu", "cuda"))


def assert_same_job_on(families, tmp_path, devices: tuple[str, str]) -> None:
    from safetensors.torch import load_file

    from rankmerge.service.tta_job import run_adaptive_job

    # select: final, so a guard score that moves by a held-out row (2 per task here) cannot change what is published
    spec = make_job(families, tmp_path, params={"factorization": "ta", "lambda": 0.3}, objective="distill", steps=4,
                    select="final")
    reports = [run_adaptive_job(job_from_dict({**spec, "device": device, "output": str(tmp_path / f"out{i}")}, tmp_path))
               for i, device in enumerate(devices)]
    assert reports[1]["device"].startswith(devices[1]) and reports[1]["timing"]["teacher_seconds"] > 0
    for name in ("out{}.job/teachers.safetensors", "out{}/model.safetensors"):
        a, b = (load_file(str(tmp_path / name.format(i))) for i in (0, 1))
        assert a.keys() == b.keys() and a
        for key in a:
            torch.testing.assert_close(b[key], a[key], atol=1e-4, rtol=1e-4)
    curves = [[t["agreement"] for point in r["guard"]["curve"] for t in point["tasks"]] for r in reports]
    assert curves[0] and len(curves[1]) == len(curves[0])
    accuracy = [{(task, col): v for task, row in r["accuracy"].items() for col, v in row.items()} for r in reports]
    assert accuracy[1] == pytest.approx(accuracy[0], abs=1 / 24 + 1e-9)  # within one of a task's 24 rows


# ---- peak device memory in --dry-run ------------------------------------------------------------------------------------
def test_the_device_forecast_is_the_kept_state_plus_the_largest_working_set():
    from rankmerge.workers.forecast import device_peak_bytes

    cuda = torch.device("cuda", 0)  # a device object needs no GPU
    assert device_peak_bytes(cuda, 5 * 2**30, [2**30, 3 * 2**30, 2 * 2**30]) == 8 * 2**30
    assert device_peak_bytes(cuda, 0, [7, 11]) == 11  # a static merge keeps nothing between tensors
    assert device_peak_bytes(cuda, 13, []) == 13
    assert device_peak_bytes(torch.device("cpu"), 5, [1, 2]) is None  # on the CPU the host peak is the forecast


def test_the_summary_names_the_device_peak_only_for_a_gpu():
    from rankmerge.workers.forecast import Forecast

    common = dict(seconds=10.0, peak_bytes=2**30, parts={"write": 1.0}, shapes=3, calibration_s=0.5)
    on_gpu = Forecast(**common, device_peak_bytes=3 * 2**30 // 2, device="cuda:0 (H100)").summary()
    assert "predicted peak memory: 1.00 GiB; predicted peak device memory: 1.50 GiB on cuda:0 (H100) (measured" in on_gpu
    assert "device memory" not in Forecast(**common).summary()


def test_device_peak_counts_nothing_on_the_cpu():
    from rankmerge.workers.device import DevicePeak

    with DevicePeak(torch.device("cpu")) as peak:
        kept = torch.ones(1 << 20)
    assert peak.peak == 0 and kept.sum() == 1 << 20


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, needs_gpu])])
def test_a_static_dry_run_forecasts_device_memory_on_a_gpu_only(families, tmp_path, capsys, device):
    base, tasks = families("vit")
    args = ["merge", "--base", str(base), "--method", "tsv_m", "--out", str(tmp_path / "out"), "--device", device,
            "--dry-run", *[f"--model={n}={p}" for n, p in tasks.items()]]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "predicted peak memory:" in out and ("predicted peak device memory:" in out) == (device == "cuda")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, needs_gpu])])
def test_an_adaptive_dry_run_forecasts_device_memory_on_a_gpu_only(families, tmp_path, capsys, device):
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({**make_job(families, tmp_path, objective="entropy"), "device": device}))
    assert main(["run", str(spec), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "predicted peak memory:" in out and ("predicted peak device memory:" in out) == (device == "cuda")
    assert not (tmp_path / "out").exists()


def larger_vit(tmp_path):
    """Tensors large enough that the allocator's rounding and fixed costs do not decide the comparison."""
    from rankmerge.service.tiny_models import make_family

    return make_family("vit", tmp_path / "models", sizes={"hidden_size": 256, "intermediate_size": 1024,
                                                           "num_hidden_layers": 2, "num_attention_heads": 4})


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("method", ["tsv_m", "ties", "task_arithmetic"])
def test_the_static_device_forecast_is_near_the_measured_peak(tmp_path, method):
    from rankmerge.service.merge_job import forecast_merge, prepare, run_merge_job

    base, tasks = larger_vit(tmp_path)
    job = job_from_dict({"base": str(base), "models": {k: str(v) for k, v in tasks.items()}, "method": method,
                         "output": str(tmp_path / "out"), "device": "cuda"}, tmp_path)
    with ExitStack() as stack:
        predicted = forecast_merge(prepare(job, stack), torch.device("cuda", 0)).device_peak_bytes
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    run_merge_job(job)
    measured = torch.cuda.max_memory_allocated() - before
    # the forecast counts the next inputs going up and the last result coming down at their largest; a run where
    # the copies happen not to overlap the merge peaks lower
    assert 0.5 * measured <= predicted <= 3 * measured + 2**20, (predicted, measured)


@pytest.mark.gpu
@needs_gpu
def test_the_adaptive_device_forecast_is_near_the_measured_peak(tmp_path):
    from rankmerge.service.tta_job import dry_run_adaptive_job

    base, tasks = larger_vit(tmp_path)
    data = {}
    for i, name in enumerate(tasks):
        data[name] = str(tmp_path / f"{name}.safetensors")
        save_file({"pixel_values": torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(i))}, data[name])
    job = job_from_dict({"base": str(base), "models": {k: str(v) for k, v in tasks.items()}, "method": "adarank",
                         "params": {"factorization": "ta"}, "output": str(tmp_path / "out"), "device": "cuda",
                         "tta": {"data": data, "steps": 2, "batch_size": 8, "objective": "entropy", "holdout": 0}}, tmp_path)
    text = dry_run_adaptive_job(job)
    predicted = float(text.split("predicted peak device memory: ")[1].split(" GiB")[0]) * 2**30
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with ExitStack() as stack:
        _, opened, plan = open_inputs(job, stack)
        runner = start_executor(job, plan, "local", None)
        stack.callback(runner.close)
        for step in range(2):
            runner.step([torch.arange(8) for _ in opened])
    measured = torch.cuda.max_memory_allocated() - before
    assert 0.5 * measured <= predicted + 0.01 * 2**30 and predicted <= 2 * measured + 0.01 * 2**30, (predicted, measured)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("partition", ["replicated", "zero3"])
def test_ray_shard_and_worker_on_the_gpu_match_the_local_executor(families, tmp_path, partition):
    """One GPU shared by a shard actor and a worker actor (half each): factors, masks, λ, Adam on the shard's GPU,
    the worker's model on its own (ZeRO-3: DeepSpeed over NCCL); the result is the in-process one on the same GPU."""
    ray = pytest.importorskip("ray")
    if partition == "zero3":
        pytest.importorskip("deepspeed")
    from safetensors.torch import load_file

    from rankmerge.service.tta_job import run_adaptive_job

    spec = {**make_job(families, tmp_path, params={"factorization": "ta", "lambda": 0.3}, objective="entropy", steps=4)}
    local = job_from_dict({**spec, "device": "cuda", "output": str(tmp_path / "local")}, tmp_path)
    assert run_adaptive_job(local)["device"].startswith("cuda")
    resources = {"shards": 1, "workers": 1, "partition": partition, "gpus_per_shard": 0.5, "gpus_per_worker": 0.5}
    remote = job_from_dict({**spec, "device": "auto", "output": str(tmp_path / "ray"), "resources": resources}, tmp_path)
    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        report = run_adaptive_job(remote, executor="ray")
    finally:
        ray.shutdown()
    assert report["device"] == "cuda (shards), cuda (workers)"
    for name in ("adaptive/lambda.safetensors", "adaptive/masks.safetensors", "model.safetensors"):
        a, b = load_file(str(tmp_path / "ray" / name)), load_file(str(tmp_path / "local" / name))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, needs_gpu])])
def test_static_inputs_are_staged_pinned_for_a_gpu_and_stay_put_for_the_cpu(families, tmp_path, device):
    """A GPU merge reads each tensor into page-locked buffers (their copy to the device is asynchronous); the CPU path
    gets the very tensors it read."""
    from rankmerge.workers.static_merge import inputs_on, load_inputs

    base, tasks = families("vit")
    job = job_from_dict({"base": str(base), "models": {k: str(v) for k, v in tasks.items()}, "method": "tsv_m",
                         "output": str(tmp_path / "out"), "device": device}, tmp_path)
    with ExitStack() as stack:
        base_ck, task_cks, plan = open_inputs(job, stack)
        entry = max(plan.merged, key=lambda e: e.numel)
        staged = load_inputs(entry, base_ck, task_cks, pin=device == "cuda")
        assert staged.base.is_pinned() == staged.taus.is_pinned() == (device == "cuda")
        moved = inputs_on(staged, torch.device(device))
        assert moved.taus.device.type == moved.base.device.type == device
        assert (moved is staged) == (device == "cpu")
        assert torch.equal(moved.taus.cpu(), staged.taus) and torch.equal(moved.base.cpu(), staged.base)


def test_the_cli_and_the_in_process_path_import_neither_ray_nor_deepspeed(tmp_path):
    """What an air-gapped GPU machine without them runs (README, GPU machines): the CLI, static merges, the local
    executor and the forecasts load ray and deepspeed only when a Ray or ZeRO-3 job asks for them."""
    import subprocess
    import sys

    modules = ["rankmerge.service.cli", "rankmerge.service.merge_job", "rankmerge.service.tta_job",
               "rankmerge.cluster.executor", "rankmerge.workers.forecast", "rankmerge.workers.tta.forecast"]
    code = (f"import sys\nfor m in {modules!r}: __import__(m)\n"
            "print(sorted(m for m in ('ray', 'deepspeed') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal on a machine without a GPU")
def test_gpu_check_without_a_gpu_stops_at_once_with_one_line_even_given_a_relative_python():
    """benchmarks/gpu_check.sh leaves the checkout before importing anything: a relative PYTHON must still be found."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHON": os.path.relpath(sys.executable, repo)}
    env.pop("GPU_CHECK_DEVICE", None)
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=120)
    err = done.stderr.strip()
    assert done.returncode != 0 and "sees no CUDA GPU" in err and "GPU_CHECK_DEVICE=cpu" in err and "\n" not in err


@pytest.mark.gpu
@needs_gpu
def test_copy_streams_move_tensors_beside_the_compute_stream_and_back():
    """What a GPU merge does per tensor: a read-ahead thread uploads on the side stream, the compute stream waits for
    it, the result comes down on the other side stream; memory freed meanwhile is not reused under the copies."""
    from concurrent.futures import ThreadPoolExecutor

    from rankmerge.workers.device import CopyStreams

    cuda = torch.device("cuda", 0)
    assert CopyStreams.of(torch.device("cpu")) is None
    streams = CopyStreams.of(cuda)
    host = torch.randn(4096, 1024).pin_memory()
    with ThreadPoolExecutor(1) as pool:
        moved, done = pool.submit(streams.upload, lambda: host.to(cuda, non_blocking=True)).result()
    streams.arrived([moved], done)
    result = moved * 2 + 1
    copy, copied = streams.download(result)
    assert copy.is_pinned() and copy.device.type == "cpu"
    del moved, result
    filler = [torch.full((4096, 1024), 7.0, device=cuda) for _ in range(4)]
    copied.synchronize()
    torch.testing.assert_close(copy, host * 2 + 1)
    assert all(bool((f == 7).all()) for f in filler)
