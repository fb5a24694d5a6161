"""mergekit configs through `rankmerge merge CONFIG --out DIR` equal mergekit's formulas (computed here in float64
from the checkpoints): linear, task_arithmetic, ties and breadcrumbs(_ties) with per-model weights (and densities) and mergekit's
normalisation rules; the methods rankmerge would not reproduce are one-line errors. Also rankmerge's own per-task
`lambda: {task: value}`. (benchmarks/mergekit_configs.py runs the same configs through mergekit itself.)"""

import pytest
import torch
import yaml
from safetensors.torch import load_file

from rankmerge.service.cli import main
from test_merge_cli import PREFIXES, backbone, load_state, merge_args


def states(base, tasks):
    """The base's tensors and each task model's backbone under the base's names, in float64."""
    base_state = {k: v.double() for k, v in load_state(base).items()}
    return base_state, {n: {k: v.double() for k, v in backbone(load_state(p), PREFIXES["vit"], base_state).items()}
                        for n, p in tasks.items()}


def assert_merged(out, expected):
    merged = {k.removeprefix("vit."): v for k, v in load_file(str(out / "model.safetensors")).items()}  # a task model as origin
    for key, value in expected.items():
        torch.testing.assert_close(merged[key].double(), value, atol=1e-6, rtol=1e-5, msg=key)


def run_config(tmp_path, monkeypatch, config, out="out"):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mergekit.yml").write_text(yaml.safe_dump(config))
    return main(["merge", "mergekit.yml", "--out", out])


@pytest.fixture
def family(families, tmp_path):
    base, tasks = families("vit")
    return base, tasks, states(base, tasks)


def merged_keys(base_state, task_states):
    return [k for k, v in base_state.items() if v.is_floating_point() and all(k in s for s in task_states.values())]


@pytest.mark.parametrize("normalize", [False, True])
def test_task_arithmetic_with_per_model_weights(family, tmp_path, monkeypatch, normalize):
    base, tasks, (b, t) = family
    weights = {"task0": 0.3, "task1": 0.7, "task2": -0.2}
    config = {"merge_method": "task_arithmetic", "base_model": str(base), "dtype": "float32",
              "parameters": {"weight": 0.5, **({"normalize": True} if normalize else {})},
              "models": [{"model": str(base)},  # mergekit skips the base's own (zero) task vector
                         {"model": str(tasks["task0"]), "parameters": {"weight": 0.3}},
                         {"model": str(tasks["task1"]), "parameters": {"weight": 0.7}},
                         {"model": str(tasks["task2"]), "parameters": {"weight": -0.2, "density": 1.0}}]}
    assert run_config(tmp_path, monkeypatch, config) == 0
    divisor = sum(weights.values()) if normalize else 1.0
    assert_merged(tmp_path / "out", {k: b[k] + sum(w * (t[n][k] - b[k]) for n, w in weights.items()) / divisor
                                     for k in merged_keys(b, t)})


def mergekit_ties(base, deltas, weights, densities, normalize, lam):
    """TIES as mergekit defines it, for one tensor: per task keep the max(1, ⌊d·n⌋) largest |τ| (chosen in float32,
    as both tools compute), weight, elect the sign of the weighted sum (0 → +), sum the agreeing weighted values and
    divide by the agreeing weights."""
    kept = []
    for delta, d in zip(deltas, densities):
        if d >= 1:
            kept.append(delta)
            continue
        flat = delta.float().reshape(-1)
        top = flat.abs().topk(max(1, int(d * flat.numel()))).indices
        mask = torch.zeros_like(flat, dtype=torch.float64)
        mask[top] = 1
        kept.append(delta * mask.reshape(delta.shape))
    weighted = [w * k for w, k in zip(weights, kept)]
    elected = torch.where(sum(weighted) >= 0, 1.0, -1.0).double()
    agree = [(x.sign() == elected).double() for x in weighted]
    mixed = sum(x * a for x, a in zip(weighted, agree))
    divisor = sum(w * a for w, a in zip(weights, agree))
    divisor[divisor == 0] = 1
    return base + lam * (mixed / divisor if normalize else mixed)


@pytest.mark.parametrize("normalize", [True, False])
def test_ties_with_per_model_weights_and_densities(family, tmp_path, monkeypatch, normalize):
    base, tasks, (b, t) = family
    weights, densities = {"task0": 0.6, "task1": 1.0, "task2": 0.3}, {"task0": 0.3, "task1": 0.5, "task2": 0.5}
    config = {"merge_method": "ties", "base_model": str(base), "dtype": "float32",
              "parameters": {"density": 0.5, "lambda": 0.9, **({} if normalize else {"normalize": False})},
              "models": [{"model": str(base)},
                         {"model": str(tasks["task0"]), "parameters": {"weight": 0.6, "density": 0.3}},
                         {"model": str(tasks["task1"]), "parameters": {"weight": 1.0}},
                         {"model": str(tasks["task2"]), "parameters": {"weight": 0.3}}]}
    assert run_config(tmp_path, monkeypatch, config) == 0
    # τ as both tools compute it: float32 differences of the stored float32 tensors
    deltas = {n: {k: (t[n][k].float() - b[k].float()).double() for k in merged_keys(b, t)} for n in weights}
    assert_merged(tmp_path / "out", {k: mergekit_ties(b[k], [deltas[n][k] for n in weights], list(weights.values()),
                                                      list(densities.values()), normalize, 0.9) for k in merged_keys(b, t)})


def mergekit_breadcrumbs(delta, density, gamma):
    """mergekit's outlier cut for one task vector: of |τ| sorted ascending (in float32), keep positions
    n − ⌊dn⌋ − ⌊γn⌋ … n − ⌊γn⌋ − 1 (nothing when ⌊γn⌋ = 0, mergekit's empty slice)."""
    flat = delta.float().reshape(-1)
    n, top = flat.numel(), int(gamma * flat.numel())
    order = flat.abs().argsort()
    mask = torch.zeros(n, dtype=torch.float64)
    if top > 0:
        mask[order[max(0, n - int(density * n) - top): n - top]] = 1
    return delta * mask.reshape(delta.shape)


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs_with_per_model_weights_densities_and_gammas(family, tmp_path, monkeypatch, method):
    base, tasks, (b, t) = family
    weights, gammas = {"task0": 0.6, "task1": 1.0, "task2": 0.3}, {"task0": 0.05, "task1": 0.1, "task2": 0.1}
    config = {"merge_method": method, "base_model": str(base), "dtype": "float32",
              "parameters": {"density": 0.5, "gamma": 0.1, "lambda": 0.9},
              "models": [{"model": str(base)},
                         {"model": str(tasks["task0"]), "parameters": {"weight": 0.6, "gamma": 0.05}},
                         {"model": str(tasks["task1"]), "parameters": {"weight": 1.0}},
                         {"model": str(tasks["task2"]), "parameters": {"weight": 0.3}}]}
    assert run_config(tmp_path, monkeypatch, config) == 0
    expected = {}
    for k in merged_keys(b, t):
        kept = [mergekit_breadcrumbs((t[n][k].float() - b[k].float()).double(), 0.5, gammas[n]) for n in weights]
        if method == "breadcrumbs":
            expected[k] = b[k] + 0.9 * sum(w * x for w, x in zip(weights.values(), kept))
        else:  # sign consensus without normalisation: mergekit_ties on already-sparsified vectors, density 1
            expected[k] = mergekit_ties(b[k], kept, list(weights.values()), [1.0] * 3, False, 0.9)
    assert_merged(tmp_path / "out", expected)


def test_linear_is_the_normalised_weighted_average_of_the_listed_models(family, tmp_path, monkeypatch):
    base, tasks, (b, t) = family
    weights = {"task0": 1.0, "task1": 2.0, "task2": 0.5}
    config = {"merge_method": "linear", "parameters": {"weight": 1.0},  # no base_model: the first model is the origin
              "models": [{"model": str(tasks["task0"])},
                         {"model": str(tasks["task1"]), "parameters": {"weight": 2.0}},
                         {"model": str(tasks["task2"]), "parameters": {"weight": 0.5}}]}
    assert run_config(tmp_path, monkeypatch, config) == 0
    total = sum(weights.values())
    # the first model's config and non-merged tensors are the origin's, as mergekit takes the first model's
    assert_merged(tmp_path / "out", {k: sum(w * t[n][k] for n, w in weights.items()) / total
                                     for k in merged_keys(b, t) if k in t["task0"]})


def test_linear_with_the_base_listed_counts_its_weight(family, tmp_path, monkeypatch):
    base, tasks, (b, t) = family
    config = {"merge_method": "linear", "base_model": "base",  # relative to the current directory, as in mergekit
              "models": [{"model": "base", "parameters": {"weight": 2.0}},
                         {"model": str(tasks["task1"]), "parameters": {"weight": 1.0}}]}
    (tmp_path / "base").symlink_to(base)
    assert run_config(tmp_path, monkeypatch, config) == 0
    assert_merged(tmp_path / "out", {k: (2.0 * b[k] + t["task1"][k]) / 3.0 for k in merged_keys(b, {"task1": t["task1"]})})


@pytest.mark.parametrize("change, message", [
    ({"merge_method": "dare_ties"}, "merge_method 'dare_ties' would not give mergekit's result"),
    ({"merge_method": "ties", "parameters": {"weight": 0.5, "rescale": True}}, "ties with `rescale: true`"),
    ({"merge_method": "slerp"}, "merge_method 'slerp' is not one rankmerge reproduces"),
    ({"parameters": {"weight": 0.5, "gamma": 0.1}}, "task_arithmetic has no `gamma`"),
    ({"base_model": None}, "task_arithmetic needs `base_model`"),
    ({"parameters": {"weight": [0.1, 0.5]}}, "parameter 'weight' is [0.1, 0.5]"),
    ({"parameters": {}}, "has no `weight`"),
    ({"tokenizer_source": "union"}, "tokenizer_source 'union' is not supported"),
    ({"slices": []}, "field 'slices' is not supported"),
    ({"dtype": "int8"}, "dtype 'int8' is not supported"),
    ({"merge_method": "linear", "base_model": None, "parameters": {"weight": 0.9, "normalize": False}}, "weights summing to 1.8"),
    ({"merge_method": "linear"}, "`base_model` is not among them"),
])
def test_unsupported_configs_are_one_line_errors(family, tmp_path, monkeypatch, capsys, change, message):
    base, tasks, _ = family
    config = {"merge_method": "task_arithmetic", "base_model": str(base), "parameters": {"weight": 0.5},
              "models": [{"model": str(tasks["task0"])}, {"model": str(tasks["task1"])}], **change}
    code = run_config(tmp_path, monkeypatch, {k: v for k, v in config.items() if v is not None})
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: mergekit config: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_a_mergekit_config_needs_out(family, tmp_path, monkeypatch, capsys):
    base, tasks, _ = family
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.yml").write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": str(tasks["task0"])}]}))
    assert main(["merge", "m.yml"]) == 2 and "add --out DIR" in capsys.readouterr().err
    assert main(["run", "m.yml"]) == 2 and "rankmerge merge m.yml --out DIR" in capsys.readouterr().err


def test_per_task_lambda_in_rankmerges_own_spec(family, tmp_path, capsys):
    base, tasks, (b, t) = family
    lambdas = {"task0": 0.3, "task1": 0.5, "task2": -0.1}
    spec = {"base": str(base), "models": {n: str(p) for n, p in tasks.items()}, "method": "task_arithmetic",
            "params": {"lambda": lambdas}, "output": str(tmp_path / "out")}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    assert main(["merge", str(tmp_path / "job.yaml")]) == 0
    assert_merged(tmp_path / "out", {k: b[k] + sum(w * (t[n][k] - b[k]) for n, w in lambdas.items()) for k in merged_keys(b, t)})
    capsys.readouterr()
    args = merge_args(base, tasks, "task_arithmetic", tmp_path / "bad", "--set", "lambda={task0: 0.3, task9: 1}")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "missing ['task1', 'task2'], unknown ['task9']" in err and err.count("\n") == 1
    assert main(merge_args(base, tasks, "task_arithmetic", tmp_path / "bad", "--set", "lambda={task0: 30}")) == 2
    assert "the value for task 'task0' is 30.0: it must be in [-10, 10]" in capsys.readouterr().err


def test_a_missing_model_is_named_as_the_config_wrote_it(family, tmp_path, monkeypatch, capsys):
    base, tasks, _ = family
    config = {"merge_method": "task_arithmetic", "base_model": str(base), "parameters": {"weight": 0.5},
              "models": [{"model": "./gone/cars"}]}
    assert run_config(tmp_path, monkeypatch, config) == 2
    err = capsys.readouterr().err
    assert "models.cars: path" in err and "check `./gone/cars` in the mergekit config mergekit.yml (relative to the current directory)" in err


def test_a_ties_config_dry_runs(family, tmp_path, monkeypatch, capsys):
    base, tasks, _ = family
    monkeypatch.chdir(tmp_path)
    config = {"merge_method": "ties", "base_model": str(base), "parameters": {"weight": 0.5, "density": 0.4},
              "models": [{"model": str(p)} for p in tasks.values()]}
    (tmp_path / "mergekit.yml").write_text(yaml.safe_dump(config))
    assert main(["merge", "mergekit.yml", "--out", "out", "--dry-run"]) == 0
    assert "method: ties_mergekit" in capsys.readouterr().out and not (tmp_path / "out").exists()
