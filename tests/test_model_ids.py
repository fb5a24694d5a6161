"""`org/name` model ids resolve from a real Hugging Face cache layout (models--org--name/blobs, snapshots/<rev>,
refs/main) with no network; an id that is not cached is one line saying how to fetch it; local folders win."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from rankmerge.service.cli import main
from rankmerge.service.model_ids import is_model_id

ROOT = Path(__file__).resolve().parents[1]
REVISION = "0123456789abcdef0123456789abcdef01234567"


def cache_model(cache: Path, model_id: str, source: Path) -> Path:
    """Store `source`'s files as huggingface_hub does: content-addressed blobs, a snapshot of symlinks, refs/main."""
    repo = cache / f"models--{model_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / REVISION
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in source.iterdir():
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        (repo / "blobs" / digest).write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(Path("..") / ".." / "blobs" / digest)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return snapshot


def rankmerge(args, cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    """The CLI in a fresh process, so huggingface_hub reads HF_HUB_CACHE as it does for users."""
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "rankmerge", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("text, expected", [
    ("google/vit-base-patch16-224", True), ("org/name.v2", True), ("m/base", True),
    ("base", False), ("./org/name", False), ("../m/base", False), ("/abs/org", False), ("a/b/c", False), ("org/na--me", False),
])
def test_what_counts_as_a_model_id(text, expected):
    assert is_model_id(text) is expected


def test_ids_resolve_from_the_cache_in_specs_and_flags(families, tmp_path):
    base, tasks = families("vit")
    cache = tmp_path / "hub"
    cache_model(cache, "acme/vit-base", base)
    cache_model(cache, "acme/vit-cars", tasks["task0"])
    work = tmp_path / "work"
    (work / "acme").mkdir(parents=True)  # a local acme/ folder without vit-cars in it: the id still resolves
    spec = {"base": "no/such-base", "models": {"cars": "acme/vit-cars", "dtd": str(tasks["task1"])},
            "method": "task_arithmetic", "params": {"lambda": 0.5}, "output": "out/spec"}
    (work / "job.yaml").write_text(yaml.safe_dump(spec))
    # an id in the spec and one in a flag (which replaces the spec's base before any lookup)
    done = rankmerge(["merge", "job.yaml", "--base", "acme/vit-base"], work, cache)
    assert done.returncode == 0, done.stderr
    merged = load_file(str(work / "out/spec/model.safetensors"))
    direct = tmp_path / "direct"
    assert main(["merge", "--base", str(base), "--model", f"cars={tasks['task0']}", "--model", f"dtd={tasks['task1']}",
                 "--method", "task_arithmetic", "--set", "lambda=0.5", "--out", str(direct)]) == 0
    expected = load_file(str(direct / "model.safetensors"))
    assert merged.keys() == expected.keys() and all(torch.equal(merged[k], v) for k, v in expected.items())


def test_an_id_that_is_not_cached_is_one_line_naming_the_fetch(families, tmp_path):
    base, tasks = families("vit")
    cache = tmp_path / "hub"
    cache.mkdir()
    done = rankmerge(["merge", "--base", str(base), "--model", "cars=acme/not-here", "--method", "task_arithmetic",
                      "--out", "out"], tmp_path, cache)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "--model cars=acme/not-here: 'acme/not-here' is not a local folder" in done.stderr
    assert f"not in the Hugging Face cache ({cache})" in done.stderr and "hf download acme/not-here" in done.stderr
    assert not (tmp_path / "out").exists()


def test_a_local_folder_wins_over_an_id(tmp_path):
    from rankmerge.service.model_ids import resolve_model_ref

    (tmp_path / "acme" / "vit-base").mkdir(parents=True)
    assert resolve_model_ref("acme/vit-base", tmp_path, "base") == "acme/vit-base"  # no cache lookup at all
