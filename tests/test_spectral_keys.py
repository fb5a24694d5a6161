"""`spectral_keys: all_2d` factorizes every merged 2-D tensor (embeddings, position embeddings, lm_head), as
FusionBench does; `blocks` (the default) only the block weights; 1-D tensors and heads are never factorized."""

from contextlib import ExitStack

import pytest
import torch
from safetensors.torch import load_file

from rankmerge.service.cli import main
from rankmerge.service.merge_job import open_inputs
from rankmerge.service.spec import job_from_dict
from rankmerge.service.tta_job import build_merger
from rankmerge.workers.methods.registry import MergeContext, make_method, spectral_methods
from rankmerge.workers.roles import Role

from conftest import cli_merge, make_adaptive_spec



def task_vectors(base, tasks, key, prefix):
    theta0 = load_file(str(base / "model.safetensors"))[key]
    return torch.stack([load_file(str(p / "model.safetensors"))[prefix + key] - theta0 for p in tasks.values()]), theta0


@pytest.mark.parametrize("family,prefix,outside_blocks", [
    ("gpt2", "transformer.", ("wte.weight", "wpe.weight")),
    ("llama", "", ("model.embed_tokens.weight", "lm_head.weight")),
])
def test_all_2d_gives_embeddings_iso_c_s_flat_spectrum(families, tmp_path, family, prefix, outside_blocks):
    base, tasks = families(family)
    blocks = cli_merge(base, tasks, "iso_c", tmp_path / "blocks")
    all_2d = cli_merge(base, tasks, "iso_c", tmp_path / "all", "spectral_keys=all_2d")
    assert blocks.keys() == all_2d.keys()
    for key in outside_blocks:
        taus, theta0 = task_vectors(base, tasks, key, prefix)
        u, s, vh = torch.linalg.svd(taus.sum(0).double(), full_matrices=False)
        expected = theta0.double() + s.mean() * u @ vh  # Iso-C, alpha 1, written out
        torch.testing.assert_close(all_2d[key].double(), expected, atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(blocks[key], theta0 + taus.mean(0), atol=2e-6, rtol=1e-5)  # blocks: the mean
    for key in blocks:  # every other tensor (block weights, 1-D tensors) is the same under both settings
        if key not in outside_blocks:
            torch.testing.assert_close(all_2d[key], blocks[key], atol=0, rtol=0)


def test_all_2d_leaves_non_2d_tensors_and_heads_alone(families, tmp_path):
    """ViT: the position embeddings and CLS token are 3-D, the patch projection 4-D: averaged under both settings."""
    base, tasks = families("vit")
    blocks = cli_merge(base, tasks, "tsv_m", tmp_path / "blocks")
    all_2d = cli_merge(base, tasks, "tsv_m", tmp_path / "all", "spectral_keys=all_2d")
    for key in blocks:
        torch.testing.assert_close(all_2d[key], blocks[key], atol=0, rtol=0)
    for t in tasks:
        assert load_file(str(tmp_path / "all" / "heads" / f"{t}.safetensors")).keys() == \
            load_file(str(tmp_path / "blocks" / "heads" / f"{t}.safetensors")).keys()


@pytest.mark.parametrize("method", [*spectral_methods(), "star"])
def test_every_spectral_method_takes_spectral_keys(method):
    m = make_method(method, {"spectral_keys": "all_2d"}, MergeContext(("a", "b"), 10))
    assert m.factorized(Role.ELEMENTWISE, (8, 4)) and m.factorized(Role.SPECTRAL, (8, 4))
    assert not m.factorized(Role.ELEMENTWISE, (8,)) and not m.factorized(Role.ELEMENTWISE, (1, 8, 4))
    assert not make_method(method, {}, MergeContext(("a", "b"), 10)).factorized(Role.ELEMENTWISE, (8, 4))


def test_adarank_over_all_2d_starts_at_the_static_all_2d_merge(families, tmp_path):
    """gpt2's wte/wpe get masks too; step 0 equals the static tsv_m with spectral_keys all_2d."""
    base, tasks = families("gpt2")
    spec = make_adaptive_spec(families, tmp_path, params={"base": "tsv_m", "base_params": {"spectral_keys": "all_2d"}}, family="vit")
    spec.update(base=str(base), models={k: str(v) for k, v in tasks.items()})
    expected = cli_merge(base, tasks, "tsv_m", tmp_path / "static", "spectral_keys=all_2d")
    with ExitStack() as stack:
        job = job_from_dict(spec, tmp_path)
        b, cks, plan = open_inputs(job, stack)
        merger = build_merger(job, plan, b, cks)
        got = merger.final_weights()
    for key, value in got.items():
        torch.testing.assert_close(value, expected[key].float(), atol=2e-5, rtol=1e-4)


def test_ray_shards_weigh_an_all_2d_embedding_as_the_svd_it_is(families, tmp_path):
    """With all_2d an LLM's embedding (32000 × 4096) is the largest SVD of the model, 7.8 block weights' worth: the
    job's shards balance that work, where counting it as a read (its role) stacks it on top of half the blocks."""
    import dataclasses

    from rankmerge.cluster.sharding import shard_columns, tensor_cost
    from rankmerge.service.tta_job import adaptive_work
    from rankmerge.workers.plan import TensorPlan

    base, tasks = families("gpt2")
    spec = make_adaptive_spec(families, tmp_path, params={"base": "tsv_m", "base_params": {"spectral_keys": "all_2d"}}, family="vit")
    spec.update(base=str(base), models={k: str(v) for k, v in tasks.items()})
    with ExitStack() as stack:
        job = job_from_dict(spec, tmp_path)
        _, _, plan = open_inputs(job, stack)
    sources = plan.merged[0].sources
    shaped = [TensorPlan("transformer.wte.weight", Role.ELEMENTWISE, (32000, 4096), torch.float32, sources),
              *(TensorPlan(f"transformer.h.{i}.attn.c_attn.weight", Role.SPECTRAL, (4096, 4096), torch.float32, sources)
                for i in range(8))]
    plan = dataclasses.replace(plan, tensors=shaped)
    method = make_method("tsv_m", {"spectral_keys": "all_2d"}, MergeContext(tuple(plan.task_names), plan.merged_numel))

    def spread(shards):  # the busiest shard's SVD work over the idlest's
        loads = [sum(tensor_cost(plan.merged[c].shape, method.factorized(plan.merged[c].role, plan.merged[c].shape),
                                 len(plan.task_names)) for c in cols) for cols in shards]
        return max(loads) / min(loads)

    columns = adaptive_work(job, plan, 2).columns
    assert columns == [[0], list(range(1, 9))] and spread(columns) < 1.05
    by_role = shard_columns(plan, 2, lambda role, shape: role is Role.SPECTRAL)  # the embedding counted as a read
    assert spread(by_role) > 2.5
