"""RegMean end to end: a job over tiny real HF models and unlabeled data files, its merged linear layers against a
float64 reference that runs each task model itself (HF class, forward hooks) and applies FusionBench's rule."""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers.pytorch_utils import Conv1D

from conftest import make_adaptive_spec
from rankmerge.service.merge_job import run_merge_job
from rankmerge.service.spec import job_from_dict
from rankmerge.workers.errors import MergeInputError
from rankmerge.workers.methods import least_squares as lsq
from rankmerge.workers.tta.adapters import checkpoint_to_module_names

ROWS = 20


def text_spec(families, tmp_path, params):
    """A GPT-2 job (Conv1D layers) whose data has padded rows: padding must not enter the Gram matrices."""
    base, tasks = families("gpt2")
    data = {}
    for i, name in enumerate(tasks):
        gen = torch.Generator().manual_seed(i)
        mask = torch.ones(24, 7, dtype=torch.long)
        mask[::3, 4:] = 0
        path = tmp_path / f"{name}.safetensors"
        save_file({"input_ids": torch.randint(1, 64, (24, 7), generator=gen), "attention_mask": mask}, path)
        data[name] = str(path)
    return {"base": str(base), "models": {k: str(v) for k, v in tasks.items()}, "method": "regmean", "params": params,
            "output": str(tmp_path / "out"), "tta": {"data": data, "eval_batch_size": 8}}


def reference_grams(model_dir, data):
    """Per linear module: XᵀX/N of its inputs over the first ROWS rows, in float64, padding left out."""
    config = transformers.AutoConfig.from_pretrained(model_dir)
    model = getattr(transformers, config.architectures[0]).from_pretrained(model_dir, dtype=torch.float64).eval()
    inputs = {k: v[:ROWS] for k, v in data.items() if k in ("pixel_values", "input_ids", "attention_mask")}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].double()
    grams, layout = {}, {}
    mask = inputs.get("attention_mask")
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)):
            def hook(module, args, output, name=name):
                x = args[0] if mask is None else args[0][mask.bool()]
                x = x.reshape(-1, x.shape[-1])
                grams[name] = x.T @ x / len(x)
            module.register_forward_hook(hook)
            layout[name] = isinstance(module, torch.nn.Linear)  # stored [out, in]
    with torch.no_grad():
        model(**inputs)
    return grams, layout, model


@pytest.mark.parametrize("family", ["vit", "gpt2"])
def test_regmean_job_matches_a_float64_reference(families, tmp_path, family):
    params = {"num_regmean_examples": ROWS, "reduce_non_diagonal_ratio": 0.8}
    spec = make_adaptive_spec(families, tmp_path, method="regmean", params=params, family=family) if family == "vit" \
        else text_spec(families, tmp_path, params)
    if family == "vit":
        spec["tta"]["eval_batch_size"] = 8  # several batches: the running Gram must equal the one-shot one
    job = job_from_dict(spec, tmp_path)
    report = run_merge_job(job)
    merged = load_file(str(job.output / "model.safetensors"))
    per_task = [reference_grams(path, load_file(spec["tta"]["data"][name])) for name, path in job.models.items()]
    task_keys = list(load_file(str(next(iter(job.models.values())) / "model.safetensors")))
    rename = checkpoint_to_module_names(per_task[0][2])  # checkpoint key -> parameter name (transformers' own renames)
    checked = 0
    for key in merged:
        source = next((k for k in task_keys if k == key or k.endswith("." + key)), None)
        module = rename(source).removesuffix(".weight") if source and key.endswith(".weight") else None
        if module not in per_task[0][0]:
            continue
        stored_out_in = per_task[0][1][module]
        reduced = [lsq.reduce_off_diagonal(grams[module], 0.8) for grams, _, _ in per_task]
        own = [model.get_parameter(module + ".weight").detach() for _, _, model in per_task]
        ws = [w.T if stored_out_in else w for w in own]  # FusionBench: (Σ G̃)⁻¹ Σ G̃ Wᵀ on whole weights
        expected = torch.inverse(sum(reduced)) @ sum(g @ w for g, w in zip(reduced, ws))
        torch.testing.assert_close(merged[key].double(), expected.T if stored_out_in else expected, atol=2e-5, rtol=1e-4)
        checked += 1
    assert checked == 12 if family == "vit" else checked >= 8  # every attention and MLP projection of both layers
    assert sum(bool(t.get("regmean")) for t in report["tensors"]) == checked
    tasks = [load_file(str(p / "model.safetensors")) for p in job.models.values()]
    for key in [k for k in merged if k.endswith(".bias") and "layer" in k and ".h." not in k or k.endswith("mlp.c_proj.bias")]:
        own = [next(v for k, v in t.items() if k == key or k.endswith("." + key)) for t in tasks]
        torch.testing.assert_close(merged[key], torch.stack(own).mean(0))  # other parameters: the mean, as FusionBench


def test_regmean_reuses_its_gram_matrices_and_refuses_missing_data(families, tmp_path):
    spec = make_adaptive_spec(families, tmp_path, method="regmean", params={"num_regmean_examples": 12})
    job = job_from_dict(spec, tmp_path)
    assert "method: regmean" in run_merge_job(job, dry_run=True)  # forecast on stand-in Gram matrices, no data pass
    assert not (job.resolved_job_dir / "grams").exists()
    run_merge_job(job)
    grams = sorted((job.resolved_job_dir / "grams").glob("*.safetensors"))
    assert len(grams) == 3 and json.loads(grams[0].with_name(grams[0].name + ".sha256").read_text())["identity"]
    stamps = [p.stat().st_mtime_ns for p in grams]
    first = load_file(str(job.output / "model.safetensors"))
    again = job_from_dict({**spec, "overwrite": True, "params": {"num_regmean_examples": 12, "reduce_non_diagonal_ratio": 1.0}}, tmp_path)
    run_merge_job(again)  # another ratio: the same Gram matrices, not recomputed
    assert [p.stat().st_mtime_ns for p in grams] == stamps
    assert any(not torch.equal(v, load_file(str(job.output / "model.safetensors"))[k]) for k, v in first.items())
    grams[1].write_bytes(grams[1].read_bytes()[:-8] + b"\0" * 8)  # damaged: recomputed, never trusted
    run_merge_job(job_from_dict({**spec, "overwrite": True}, tmp_path))
    assert load_file(str(job.output / "model.safetensors")).keys() == first.keys()
    assert all(torch.equal(v, load_file(str(job.output / "model.safetensors"))[k]) for k, v in first.items())

    no_data = {k: v for k, v in spec.items() if k != "tta"}
    with pytest.raises(MergeInputError, match="regmean.*`tta:` block with `data:`") as err:
        job_from_dict(no_data, tmp_path)
    assert "\n" not in str(err.value)
