"""`rankmerge merge` end to end on real HF classes: outputs load with from_pretrained and equal the formulas."""

import json
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModel

from rankmerge.service.cli import main
from rankmerge.workers.methods import elementwise as ew
from rankmerge.workers.roles import ARCHITECTURES, Role, classify

ALL_METHODS = ["weight_average", "task_arithmetic", "ties", "dare", "consensus", "tadrop", "star", "ta_svd", "cart", "tsv_m", "iso_c", "iso_cts",
               "ties_mergekit", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce", "magmax", "karcher", "model_stock"]
FEW_MODEL_METHODS = {"slerp": 1, "nuslerp": 2}  # methods defined for a fixed number of fine-tuned models
PREFIXES = {"vit": "vit.", "clip_vision": "vision_model.", "bert": "bert.", "roberta": "roberta.", "gpt2": "transformer.", "llama": ""}


def merge_args(base, tasks, method, out, *extra):
    args = ["merge", "--base", str(base), "--method", method, "--out", str(out)]
    for name, path in tasks.items():
        args += ["--model", f"{name}={path}"]
    return args + list(extra)


def load_state(path):
    return load_file(str(path / "model.safetensors"))


def backbone(state, prefix, base_keys):
    """A task model's backbone tensors under the base's names."""
    out = {}
    for k, v in state.items():
        name = k[len(prefix):] if prefix and k.startswith(prefix) else k
        if name in base_keys:
            out[name] = v
    return out


@pytest.mark.parametrize("kind", list(PREFIXES))
def test_task_arithmetic_output_loads_and_equals_formula(kind, families, tmp_path):
    base, tasks = families(kind)
    out = tmp_path / "merged"
    assert main(merge_args(base, tasks, "task_arithmetic", out, "--set", "lambda=0.4")) == 0
    model = AutoModel.from_pretrained(out)
    assert model is not None
    base_state = load_state(base)
    task_states = [backbone(load_state(p), PREFIXES[kind], base_state) for p in tasks.values()]
    merged = load_state(out)
    assert set(merged) == set(base_state)
    for key, theta0 in base_state.items():
        if not theta0.is_floating_point() or all(key not in s for s in task_states):
            assert torch.equal(merged[key], theta0)
            continue
        expected = theta0 + 0.4 * sum(s[key] - theta0 for s in task_states)
        torch.testing.assert_close(merged[key], expected, atol=1e-6, rtol=1e-5)
    loaded = model.state_dict()
    for key, value in merged.items():
        if key in loaded:
            assert torch.equal(loaded[key], value)


def test_task_heads_are_kept_per_task(families, tmp_path):
    base, tasks = families("vit")
    out = tmp_path / "merged"
    assert main(merge_args(base, tasks, "ties", out)) == 0
    for name, path in tasks.items():
        head = load_file(str(out / "heads" / f"{name}.safetensors"))
        state = load_state(path)
        assert set(head) == {"classifier.weight", "classifier.bias"}
        for key, value in head.items():
            assert torch.equal(value, state[key])
    report = json.loads((out / "merge_report.json").read_text())
    assert {k: sorted(v) for k, v in report["heads"].items()} == {name: ["classifier.bias", "classifier.weight"] for name in tasks}


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("kind", ["vit", "gpt2"])
def test_every_method_writes_a_loadable_model(kind, method, families, tmp_path):
    base, tasks = families(kind)
    out = tmp_path / "merged"
    assert main(merge_args(base, tasks, method, out)) == 0
    model = AutoModel.from_pretrained(out)
    merged = load_state(out)
    assert all(torch.isfinite(v).all() for v in merged.values() if v.is_floating_point())
    assert any(not torch.equal(merged[k], v) for k, v in load_state(base).items() if v.is_floating_point())
    report = json.loads((out / "merge_report.json").read_text())
    assert report["method"] == method and report["wall_seconds"] >= 0 and report["peak_rss_bytes"] > 0
    assert {t["role"] for t in report["tensors"]} >= {"spectral", "elementwise"}
    merged_entries = [t for t in report["tensors"] if t["role"] in ("spectral", "elementwise")]
    assert all(t["delta_norm"] >= 0 for t in merged_entries)
    del model


@pytest.mark.parametrize("method,count", list(FEW_MODEL_METHODS.items()))
def test_two_model_methods_write_a_loadable_model(method, count, families, tmp_path):
    base, tasks = families("vit")
    out = tmp_path / "merged"
    assert main(merge_args(base, dict(list(tasks.items())[:count]), method, out)) == 0
    AutoModel.from_pretrained(out)
    merged = load_state(out)
    assert all(torch.isfinite(v).all() for v in merged.values() if v.is_floating_point())
    assert any(not torch.equal(merged[k], v) for k, v in load_state(base).items() if v.is_floating_point())
    assert main(merge_args(base, tasks, method, tmp_path / "refused")) != 0


def test_streaming_ties_equals_whole_model_ties(families, tmp_path):
    """The global trim threshold found by streaming passes equals trimming the flattened whole model."""
    base, tasks = families("llama")
    out = tmp_path / "merged"
    assert main(merge_args(base, tasks, "ties", out, "--set", "k=0.15", "--set", "lambda=0.6", "--set", "merge=mean")) == 0
    base_state = load_state(base)
    rules = ARCHITECTURES[-1]
    keys = [k for k, v in base_state.items() if classify(rules, k, tuple(v.shape), v.dtype) in (Role.SPECTRAL, Role.ELEMENTWISE)]
    task_states = [load_state(p) for p in tasks.values()]
    flat = torch.stack([torch.cat([(s[k] - base_state[k]).reshape(-1) for k in keys]) for s in task_states])
    delta = ew.ties(flat, 0.15, 0.6, "mean")
    merged = load_state(out)
    offset = 0
    for k in keys:
        n = base_state[k].numel()
        torch.testing.assert_close(merged[k], base_state[k] + delta[offset : offset + n].reshape(base_state[k].shape), atol=1e-6, rtol=1e-5)
        offset += n


def test_dry_run_prints_plan_and_writes_nothing(families, tmp_path, capsys):
    base, tasks = families("gpt2")
    out = tmp_path / "merged"
    assert main(merge_args(base, tasks, "tsv_m", out, "--dry-run")) == 0
    text = capsys.readouterr().out
    assert "h.0.attn.c_attn.weight" in text and "spectral" in text and "predicted peak memory" in text and "predicted wall time" in text
    assert "score.weight" in text and "head" in text
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


def test_out_dtype_and_yaml_job(families, tmp_path):
    base, tasks = families("bert")
    spec = {"base": str(base), "models": {k: str(v) for k, v in tasks.items()}, "method": "cart",
            "params": {"lambda": 1.5, "rho": 0.25}, "output": "merged", "out_dtype": "bfloat16"}
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(spec))
    assert main(["merge", str(job)]) == 0
    out = tmp_path / "merged"  # relative paths resolve against the spec's folder
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("encoder.layer.0.attention.self.query.weight").dtype == torch.bfloat16
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert AutoModel.from_pretrained(out).dtype == torch.bfloat16


def test_tied_lm_head_gets_the_merged_embedding(tmp_path):
    config = {"model_type": "llama", "tie_word_embeddings": True}
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(10, 4, generator=gen)
    paths = {}
    for name, shift in (("base", 0.0), ("a", 1.0), ("b", 3.0)):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(config))
        save_file({"model.embed_tokens.weight": emb + shift, "lm_head.weight": emb + shift}, d / "model.safetensors")
        paths[name] = d
    out = tmp_path / "out"
    assert main(merge_args(paths["base"], {"a": paths["a"], "b": paths["b"]}, "weight_average", out)) == 0
    merged = load_state(out)
    torch.testing.assert_close(merged["model.embed_tokens.weight"], emb + 2.0)
    assert torch.equal(merged["lm_head.weight"], merged["model.embed_tokens.weight"])


def test_schema_commands(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert {"base", "models", "method", "params", "output"} <= set(schema["properties"])
    assert main(["schema", "--method", "ties"]) == 0
    assert {"k", "lambda", "merge", "scope"} == set(json.loads(capsys.readouterr().out)["properties"])
    assert main(["methods"]) == 0
    listing = capsys.readouterr().out
    assert all(m in listing for m in [*ALL_METHODS, *FEW_MODEL_METHODS])


def test_console_script_runs(families, tmp_path):
    base, tasks = families("vit")
    exe = [sys.executable, "-m", "rankmerge"]
    done = subprocess.run(exe + merge_args(base, tasks, "iso_cts", tmp_path / "m"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "merged 3 models with iso_cts" in done.stdout
