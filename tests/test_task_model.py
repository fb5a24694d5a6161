"""Loading one task's model from a merged output: the task's class, head and labels on the merged backbone, in memory
(`load_task_model`) and as a plain HF folder (`rankmerge export-task`) that from_pretrained loads with no key warnings."""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification, BertForSequenceClassification

from rankmerge.service import load_task_model
from rankmerge.service.cli import main
from rankmerge.service.task_model import export_task_model
from test_merge_cli import merge_args

LABELS = {0: "ant", 1: "bee", 2: "cow", 3: "dog", 4: "elk"}


def labelled_task(task_dir, out_dir, cls):
    """The task model re-saved with named labels (what a real fine-tune carries), so id2label can be checked."""
    model = cls.from_pretrained(task_dir)
    n = model.config.num_labels
    model.config.id2label = {i: LABELS[i] for i in range(n)}
    model.config.label2id = {v: k for k, v in model.config.id2label.items()}
    model.save_pretrained(out_dir)
    return model.eval()


def identity_merge(tmp_path, base, name, task_dir):
    """One model, task arithmetic with lambda 1: the merged backbone is the task's own (up to float rounding)."""
    out = tmp_path / "merged"
    assert main(merge_args(base, {name: task_dir}, "task_arithmetic", out, "--set", "lambda=1.0")) == 0
    return out


def assert_loads_cleanly(auto_cls, folder):
    model, info = auto_cls.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def test_vit_task_model_equals_the_fine_tuned_model(families, tmp_path, capsys):
    base, tasks = families("vit")
    task = labelled_task(tasks["task2"], tmp_path / "cars", AutoModelForImageClassification)  # 5 labels
    out = identity_merge(tmp_path, base, "cars", tmp_path / "cars")
    assert json.loads((out / "config.json").read_text()).get("id2label") != task.config.id2label  # the base's config
    pixels = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = task(pixel_values=pixels).logits
        loaded = load_task_model(out, "cars")
        torch.testing.assert_close(loaded(pixel_values=pixels).logits, expected, atol=1e-5, rtol=1e-5)
        assert type(loaded).__name__ == "ViTForImageClassification" and loaded.config.id2label == LABELS
        assert main(["export-task", str(out), "cars", "--out", str(tmp_path / "export")]) == 0
        assert str(tmp_path / "export") in capsys.readouterr().out
        exported = assert_loads_cleanly(AutoModelForImageClassification, tmp_path / "export")
        assert exported.config.id2label == LABELS and exported.config.num_labels == 5
        torch.testing.assert_close(exported(pixel_values=pixels).logits, expected, atol=1e-5, rtol=1e-5)
    head = load_file(str(out / "heads" / "cars.safetensors"))
    assert torch.equal(exported.classifier.weight, head["classifier.weight"])


def test_bert_base_with_its_own_head_gives_the_tasks_head(families, tmp_path):
    """A base that is itself a 2-label classifier: the merged config and classifier are the base's, the task's are
    in heads/ — the task model must get the task's 5-label head and labels, never the base's."""
    base_backbone, tasks = families("bert")
    base = BertForSequenceClassification.from_pretrained(base_backbone, num_labels=2)  # its classifier: fresh init
    base.save_pretrained(tmp_path / "base")
    task = labelled_task(tasks["task2"], tmp_path / "sst", AutoModelForSequenceClassification)
    out = identity_merge(tmp_path, tmp_path / "base", "sst", tmp_path / "sst")
    assert load_file(str(out / "model.safetensors"))["classifier.weight"].shape[0] == 2
    ids = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    export_task_model(out, "sst", tmp_path / "export")
    exported = assert_loads_cleanly(AutoModelForSequenceClassification, tmp_path / "export")
    with torch.no_grad():
        expected = task(input_ids=ids, attention_mask=mask).logits
        assert expected.shape == (3, 5)
        torch.testing.assert_close(exported(input_ids=ids, attention_mask=mask).logits, expected, atol=1e-5, rtol=1e-5)
    assert exported.config.id2label == LABELS


def test_several_tasks_each_get_their_own_head(families, tmp_path):
    base, tasks = families("vit")
    out = tmp_path / "merged"
    assert main(merge_args(base, tasks, "ties", out)) == 0
    for name, path in tasks.items():
        model = load_task_model(out, name, dtype=torch.bfloat16)
        own = load_file(str(path / "model.safetensors"))
        assert model.dtype == torch.bfloat16
        assert torch.equal(model.classifier.weight, own["classifier.weight"].to(torch.bfloat16))
        assert model.config.num_labels == own["classifier.weight"].shape[0]


def test_user_mistakes_are_one_line_errors(families, tmp_path, capsys):
    base, tasks = families("vit")
    out = tmp_path / "merged"
    assert main(merge_args(base, {"cars": tasks["task0"]}, "task_arithmetic", out)) == 0
    capsys.readouterr()
    cases = [
        (["export-task", str(out), "dtd", "--out", str(tmp_path / "x")], "has no task 'dtd' — use one of: cars"),
        (["export-task", str(base.parent), "cars", "--out", str(tmp_path / "x")], "is not a merged output"),
        (["export-task", str(out), "cars", "--out", str(out / "inside")], "overlaps the merged output"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "f").write_text("x")
    assert main(["export-task", str(out), "cars", "--out", str(tmp_path / "taken")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export-task", str(out), "cars", "--out", str(tmp_path / "taken"), "--overwrite"]) == 0
    assert (tmp_path / "taken" / "config.json").is_file() and not (tmp_path / "taken" / "f").exists()


def test_output_without_task_configs_in_heads_uses_the_task_model_while_it_exists(families, tmp_path, capsys):
    """Outputs merged before head files carried the task's config: read it from the task model the report names."""
    from safetensors.torch import save_file

    base, tasks = families("vit")
    task = labelled_task(tasks["task1"], tmp_path / "dtd", AutoModelForImageClassification)
    out = identity_merge(tmp_path, base, "dtd", tmp_path / "dtd")
    head_file = out / "heads" / "dtd.safetensors"
    save_file(load_file(str(head_file)), str(head_file), metadata={"task": "dtd"})
    assert load_task_model(out, "dtd").config.id2label == task.config.id2label
    (tmp_path / "dtd" / "config.json").unlink()
    capsys.readouterr()
    assert main(["export-task", str(out), "dtd", "--out", str(tmp_path / "export")]) == 2
    assert "does not record the task model's config" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["clip_vision", "roberta", "gpt2", "llama"])
def test_identity_merge_gives_the_task_models_logits_for_every_family(kind, families, tmp_path):
    """Other wrapper prefixes (vision_model., roberta., transformer.), a `score` head, and a causal LM with no separate
    head (the merged model is the task model), in memory and exported."""
    base, tasks = families(kind)
    out = identity_merge(tmp_path, base, "t", tasks["task1"])
    cls = getattr(transformers, json.loads((tasks["task1"] / "config.json").read_text())["architectures"][0])
    own = cls.from_pretrained(tasks["task1"]).eval()
    gen = torch.Generator().manual_seed(2)
    inputs = ({"pixel_values": torch.randn(2, 3, 8, 8, generator=gen)} if kind == "clip_vision"
              else {"input_ids": torch.randint(1, 64, (2, 7), generator=gen)})
    loaded = load_task_model(out, "t")
    export_task_model(out, "t", tmp_path / "export")
    exported = assert_loads_cleanly(cls, tmp_path / "export")
    assert type(loaded) is cls
    with torch.no_grad():
        expected = own(**inputs).logits
        torch.testing.assert_close(loaded(**inputs).logits, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(exported(**inputs).logits, expected, atol=1e-5, rtol=1e-5)


def test_an_adaptive_output_loads_per_task_too(families, tmp_path):
    """AdaRank/AdaMerging publish their heads the same way: each task's model has its own head and labels."""
    import yaml

    from conftest import make_adaptive_spec

    spec = make_adaptive_spec(families, tmp_path, method="adamerging", params={}, steps=2)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    assert main(["run", str(tmp_path / "job.yaml")]) == 0
    for name, path in spec["models"].items():
        model = load_task_model(spec["output"], name)
        own = load_file(f"{path}/model.safetensors")
        assert torch.equal(model.classifier.weight, own["classifier.weight"].to(model.dtype))
        assert model.config.num_labels == own["classifier.weight"].shape[0]
