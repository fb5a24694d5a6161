"""`rankmerge bench`: a real suite built into a tmp dir, a reduced method list run through the CLI, then the report.

Checks the benchmark's honesty rules on real outputs: the static λ is chosen on the val split (and recorded with every
candidate's val score), adaptation reads data files without labels, and the held-out halves are disjoint.
"""

import json

import pytest
import torch
import yaml
from matplotlib.image import imread
from safetensors import safe_open

from rankmerge.service.bench.grid import BY_NAME, LAMBDAS, METHODS, select_methods
from rankmerge.service.bench.layout import default_suite_root
from rankmerge.service.bench.spectra import energy_rank
from rankmerge.service.cli import main
from rankmerge.workers.methods.registry import parse_params, spectral_methods
from rankmerge.workers.tta.params import ADAPTIVE_METHODS

TASKS = ["digits", "parity_rot90", "high_inverted", "mod3_flipped"]
METHOD_LIST = "pretrained,individual,task_arithmetic,dare,adarank_ta"


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """digits-smoke built and benchmarked (5 methods, 8 adaptation steps) and reported, once for the module."""
    root, out = tmp_path_factory.mktemp("suite"), tmp_path_factory.mktemp("results")
    assert main(["bench", "build", "digits-smoke", "--root", str(root)]) == 0
    assert main(["bench", "run", "digits-smoke", "--root", str(root), "--out", str(out), "--methods", METHOD_LIST, "--steps", "8"]) == 0
    assert main(["bench", "report", "digits-smoke", "--root", str(root), "--out", str(out)]) == 0
    records = {m: json.loads((out / f"{m}.json").read_text()) for m in METHOD_LIST.split(",")}
    return root, out, records


def test_every_record_has_sane_accuracies_and_wall_time(bench):
    _, _, records = bench
    for name, record in records.items():
        assert record["wall_seconds"] >= 0
        for split in ("test", "heldout"):
            scores = record["accuracy"][split]
            assert set(scores) == {*TASKS, "average"}, name
            assert all(0.0 <= v <= 1.0 for v in scores.values()), (name, scores)
    test = {name: r["accuracy"]["test"]["average"] for name, r in records.items()}
    assert test["individual"] > test["pretrained"] and test["individual"] > test["task_arithmetic"]


def test_static_hyper_parameter_is_chosen_on_val(bench):
    _, out, records = bench
    record = records["task_arithmetic"]
    selection = record["selection"]
    assert selection["split"] == "val"
    candidates = selection["candidates"]
    assert [c["params"]["lambda"] for c in candidates] == list(LAMBDAS)
    assert all(set(c["val"]) == {*TASKS, "average"} and "test" not in c for c in candidates)
    scores = [c["score"] for c in candidates]
    assert selection["chosen"] == scores.index(max(scores))
    assert record["params"] == candidates[selection["chosen"]]["params"]
    chosen = out / record["output"]  # a real published output, its spec beside it; the other candidates are gone
    assert (chosen / "merge_report.json").is_file() and (out / record["job"]).is_file()
    assert sorted(p.name for p in chosen.parent.iterdir()) == sorted([chosen.name, f"{chosen.name}.yaml"])


def test_random_method_reports_the_mean_over_seeds_of_the_val_choice(bench):
    _, _, records = bench
    record = records["dare"]
    assert record["selection"]["split"] == "val" and record["params"]["seed"] == 0
    runs = record["seed_runs"]
    assert sorted(runs) == ["0", "1", "2"]
    for split in ("test", "heldout"):
        mean = sum(r[split]["average"] for r in runs.values()) / 3
        assert record["accuracy"][split]["average"] == pytest.approx(mean, abs=1e-5)


def test_adaptive_record_starts_from_its_static_equivalent(bench):
    _, out, records = bench
    start = records["adarank_ta"]["initial"]
    # AdaRank-TA at step 0 ≡ TA-SVD with every component on (ρ = 1) at λ0, i.e. task arithmetic
    assert start["method"] == "ta_svd" and start["params"]["rho"] == 1.0 and start["params"]["lambda"] == 0.3
    assert (out / start["output"] / "merge_report.json").is_file()
    assert all(0.0 <= v <= 1.0 for split in ("test", "heldout") for v in start["accuracy"][split].values())


def test_adaptation_reads_no_labels_and_held_out_halves_are_disjoint(bench):
    root, out, records = bench
    record = records["adarank_ta"]
    assert record["selection"]["split"] is None and record["tta"]["steps"] == 8
    for protocol, split in (("transductive", "test"), ("heldout", "heldout")):
        run = record["protocols"][protocol]
        assert run["report_on"] == split
        spec = yaml.safe_load((out / run["job"]).read_text())
        for task, path in spec["tta"]["data"].items():
            with safe_open(path, "pt") as f:
                assert "labels" not in f.keys() and "pixel_values" in f.keys(), (protocol, task)
        assert (out / run["output"] / "adaptive" / "masks.safetensors").is_file()
    for task in TASKS:
        folder = out / "data" / task
        with safe_open(str(folder / "heldout-adapt.safetensors"), "pt") as a, safe_open(str(folder / "heldout-report.safetensors"), "pt") as r:
            adapt, report = a.get_tensor("pixel_values"), r.get_tensor("pixel_values")
            assert "labels" in r.keys()
        with safe_open(str(root / "data" / task / "test.safetensors"), "pt") as f:
            test = f.get_tensor("pixel_values")
        assert adapt.shape[0] + report.shape[0] == test.shape[0] and abs(adapt.shape[0] - report.shape[0]) <= 1
        rows = {tuple(x.flatten().tolist()) for x in test}
        assert all(tuple(x.flatten().tolist()) in rows for x in torch.cat([adapt, report]))
        # the two halves partition the test rows: no test image is both adapted on and reported on
        assert len({tuple(x.flatten().tolist()) for x in torch.cat([adapt, report])}) == len(rows)


def test_report_tables_and_plots(bench):
    _, out, _ = bench
    table = json.loads((out / "table.json").read_text())
    assert table["tasks"] == TASKS
    for name in ("test", "heldout"):
        rows = table["tables"][name]
        assert [r["method"] for r in rows] == METHOD_LIST.split(",")
        assert [r["group"] for r in rows] == ["Reference", "Reference", "Data-free", "Data-free", "Test-time adaptation"]
    md = (out / "table.md").read_text()
    assert "| *Reference* |" in md and "TA+AdaRank" in md and "lambda=" in md and "(val)" in md
    assert set(table["plots"]) == {"masks_adarank_ta.png", "ranks.png"}
    for name in table["plots"]:
        image = imread(out / name)
        assert image.shape[0] > 200 and image.shape[1] > 400 and image.std() > 0.05, name  # a real picture, not blank


def test_grid_candidates_are_valid_method_parameters():
    for method in METHODS:
        if method.kind == "static":
            for params in method.candidates():
                parse_params(method.method, params, num_tasks=4)
        elif method.kind == "adaptive":
            ADAPTIVE_METHODS[method.method].model_validate(method.fixed)
    assert len(select_methods(None)) == len(METHODS)


def test_unknown_method_is_a_user_error(tmp_path):
    assert main(["bench", "run", "digits-smoke", "--root", str(tmp_path), "--methods", "task_arithmetic,nope"]) == 2
    assert not any(tmp_path.iterdir()), "nothing is built for a bad method list"


def test_default_root_is_a_cache_outside_the_checkout(monkeypatch, tmp_path):
    monkeypatch.setenv("RANKMERGE_CACHE", str(tmp_path))
    assert default_suite_root("digits") == tmp_path / "suites" / "digits"
    monkeypatch.delenv("RANKMERGE_CACHE")
    assert default_suite_root("digits").parts[-4:] == (".cache", "rankmerge", "suites", "digits")


def test_energy_rank():
    assert energy_rank(torch.tensor([3.0, 1.0, 0.1])) == 2  # 9/10.01 < 0.95 <= 10/10.01
    assert energy_rank(torch.tensor([1.0, 0.0])) == 1 and energy_rank(torch.zeros(3)) == 0


def test_every_spectral_method_gets_an_adarank_row_starting_at_itself():
    """The rows come from the registry: a new spectral method needs no edit here or in workers/tta/."""
    rows = {m.fixed["base"]: m for m in METHODS if m.method == "adarank" and not m.tta}
    assert set(rows) == set(spectral_methods())
    assert {"adarank_ta", "adarank_cart", "adarank_tsv_m", "adarank_iso_cts"} <= set(BY_NAME)
    for base, row in rows.items():
        static, params = row.initial
        assert static == base and parse_params(static, params)
    assert BY_NAME["adarank_ta"].initial[1]["rho"] == 1.0 and BY_NAME["adarank_cart"].initial[1]["lambda"] == 2.3
    assert BY_NAME["adamerging"].initial == ("task_arithmetic", {"lambda": 0.3})
