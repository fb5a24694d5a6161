import os

import pytest
import torch
from safetensors.torch import save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# One torch thread per process (this one, CLI subprocesses, Ray actors): the test models are tiny, and on 2 cores a
# multi-threaded step next to any other busy process runs up to ~80x slower (OpenMP threads waiting on each other).
os.environ.setdefault("OMP_NUM_THREADS", "1")
from rankmerge.service.tiny_models import make_family  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.disable_progress_bar()
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def families(tmp_path_factory):
    """One tiny family per supported architecture, built once per test session."""
    cache = {}

    def get(kind: str, **kwargs):
        key = (kind, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = make_family(kind, tmp_path_factory.mktemp(kind), **kwargs)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def vision_smoke_suite(tmp_path_factory):
    """The smoke vision suite, built once per test session (the suite tests and the main-job test share it)."""
    from rankmerge.service.suites import build_suite

    return build_suite("vision-smoke", tmp_path_factory.mktemp("vision-smoke"))


def make_adaptive_spec(families, tmp_path, method="adarank", params=None, steps=4, family="vit", **tta):
    """An adaptive job spec over a tiny family, with random (unlabelled-looking) inputs per task."""
    base, tasks = families(family)
    data = {}
    for i, name in enumerate(tasks):
        gen = torch.Generator().manual_seed(i)
        path = tmp_path / f"{name}.safetensors"
        save_file({"pixel_values": torch.randn(24, 1, 8, 8, generator=gen), "labels": torch.randint(0, 3, (24,), generator=gen)}, path)
        data[name] = str(path)
    spec = {"base": str(base), "models": {k: str(v) for k, v in tasks.items()}, "method": method, "params": params or {},
            "output": str(tmp_path / "out"), "tta": {"data": data, "steps": steps, "batch_size": 6, "checkpoint_every": 2, **tta}}
    return spec


def cli_merge(base, tasks: dict, method: str, out, *sets: str) -> dict:
    """`rankmerge merge` of `tasks` on `base` with `--set` pairs; the merged tensors."""
    from safetensors.torch import load_file
    from rankmerge.service.cli import main

    args = ["merge", "--base", str(base), "--method", method, "--out", str(out)]
    for name, path in tasks.items():
        args += ["--model", f"{name}={path}"]
    for pair in sets:
        args += ["--set", pair]
    assert main(args) == 0
    return load_file(str(out / "model.safetensors"))


def run_local_and_ray(spec: dict, tmp_path, monkeypatch) -> dict:
    """The same adaptive job in-process and on a real local Ray (outputs in tmp_path/local, tmp_path/ray); checks
    both learned the same masks, and that they learned something. Returns the reports by executor."""
    import ray
    from safetensors.torch import load_file

    from rankmerge.service.spec import job_from_dict
    from rankmerge.service.tta_job import run_adaptive_job

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=3, include_dashboard=False, object_store_memory=128 * 1024**2, log_to_driver=False)
    try:
        reports = {ex: run_adaptive_job(job_from_dict(dict(spec, output=str(tmp_path / ex)), tmp_path), executor=ex)
                   for ex in ("local", "ray")}
    finally:
        ray.shutdown()
    assert reports["ray"]["executor"] == "ray" and sum(h["flips"] for h in reports["local"]["history"]) > 0
    local, remote = (load_file(str(tmp_path / ex / "adaptive" / "masks.safetensors")) for ex in ("local", "ray"))
    assert local.keys() == remote.keys() and all(torch.equal(local[k], remote[k]) for k in local)
    return reports
