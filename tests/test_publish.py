"""Static and adaptive outputs are published by one path: the same files, the same config dtype, the same report
fields (the adaptive report adds its own)."""

import json
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from rankmerge.service.cli import main
from rankmerge.workers.atomic_io import write_atomic

from conftest import make_adaptive_spec

COMMON = {"method", "params", "base", "models", "roles", "tensors", "heads", "side_files", "wall_seconds", "peak_rss_bytes"}
ADAPTIVE = {"history", "guard", "objective", "published_step", "learned_ranks", "lambda", "accuracy", "data"}


def run_both(families, tmp_path):
    """The same inputs merged by CART (static) and by AdaRank on CART (adaptive), both exported as bfloat16."""
    spec = make_adaptive_spec(families, tmp_path, "adarank", {"factorization": "cart", "lambda": 1.0}, steps=2)
    spec["out_dtype"] = "bfloat16"
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    assert main(["run", str(tmp_path / "job.yaml")]) == 0
    static = ["merge", "--base", spec["base"], "--method", "cart", "--out", str(tmp_path / "static"), "--out-dtype", "bfloat16"]
    for name, path in spec["models"].items():
        static += ["--model", f"{name}={path}"]
    assert main(static) == 0
    return spec, tmp_path / "out", tmp_path / "static"


def report_of(out):
    return json.loads((out / "merge_report.json").read_text())


def test_static_and_adaptive_outputs_share_files_config_and_report_fields(families, tmp_path):
    spec, adaptive_out, static_out = run_both(families, tmp_path)
    adaptive, static = report_of(adaptive_out), report_of(static_out)
    assert COMMON <= set(static) and COMMON | ADAPTIVE <= set(adaptive)
    for out in (adaptive_out, static_out):
        assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
        assert (out / "README.md").read_text().startswith("---\n")
        assert all((out / name).is_file() for name in report_of(out)["side_files"])
    assert "adaptive/masks.safetensors" in adaptive["side_files"] and "config.json" in static["side_files"]
    assert adaptive["base"] == static["base"] and adaptive["models"] == static["models"]
    assert set(adaptive["data"]) == set(spec["models"]) and all(d["fingerprint"] for d in adaptive["data"].values())
    assert adaptive["heads"] == static["heads"] and adaptive["roles"] == static["roles"]
    shape = ("key", "role", "shape", "dtype")
    assert [[t[k] for k in shape] for t in adaptive["tensors"]] == [[t[k] for k in shape] for t in static["tensors"]]
    merged = [t for t in adaptive["tensors"] if t["role"] in ("spectral", "elementwise")]
    assert merged and all("delta_norm" in t for t in merged)
    assert all(t["ranks"] == adaptive["learned_ranks"][t["key"]] for t in merged if t["role"] == "spectral")
    weights, base = load_file(str(adaptive_out / "model.safetensors")), load_file(str(Path(spec["base"]) / "model.safetensors"))
    for record in merged:  # the norm of the published change, up to bfloat16 rounding (relative 2⁻⁹ per entry)
        published = weights[record["key"]].float()
        change = float(torch.linalg.vector_norm(published - base[record["key"]].float()))
        assert abs(change - record["delta_norm"]) <= 2**-8 * float(torch.linalg.vector_norm(published)) + 1e-6


def test_write_atomic_replaces_whole_and_leaves_no_temp(tmp_path):
    target = tmp_path / "record.json"
    write_atomic(target, "old")
    write_atomic(target, b"new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["record.json"]
