"""Task data in every supported form: tensors, JSONL tokenised with the base tokenizer, and image folders."""

import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from transformers import BertTokenizerFast, ViTImageProcessor

from rankmerge.service.cli import main
from rankmerge.workers.errors import MergeInputError
from rankmerge.workers.tta.data import load_task_data

WORDS = ["good", "bad", "great", "awful", "fine", "poor", "movie", "song", "book", "very", "not", "really"]


def _copy_family(families, kind, tmp_path):
    base, tasks = families(kind)
    shutil.copytree(base, tmp_path / "base")
    return tmp_path / "base", tasks


def test_jsonl_is_tokenised_with_the_base_tokenizer(families, tmp_path):
    base, tasks = _copy_family(families, "bert", tmp_path)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(base)
    data = {}
    rng = np.random.default_rng(0)
    for t, name in enumerate(tasks):
        lines = [json.dumps({"text": " ".join(rng.choice(WORDS, 5)), "label": int(rng.integers(0, 3))}) for _ in range(20)]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
        data[name] = str(tmp_path / f"{name}.jsonl")
    loaded = load_task_data(data["task0"], "task0", base, max_length=8)
    assert loaded["input_ids"].shape == (20, 8) and loaded["attention_mask"].shape == (20, 8) and loaded["labels"].shape == (20,)
    assert int(loaded["input_ids"][0, 0]) == 2  # [CLS] from the real tokenizer
    spec = {"base": str(base), "models": {k: str(v) for k, v in tasks.items()}, "method": "adarank", "output": "out",
            "tta": {"data": data, "steps": 2, "batch_size": 4, "max_length": 8}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    assert main(["run", str(tmp_path / "job.yaml")]) == 0
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert set(report["accuracy"]) == {*tasks, "average"}


def test_image_folder_uses_the_base_image_processor(families, tmp_path):
    from sklearn.datasets import load_digits

    base, tasks = _copy_family(families, "vit", tmp_path)
    ViTImageProcessor(size={"height": 8, "width": 8}, image_mean=[0.5], image_std=[0.5]).save_pretrained(base)
    digits = load_digits()
    folder = tmp_path / "images"
    for i in range(30):
        label = int(digits.target[i]) % 3
        (folder / f"class_{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray((digits.images[i] * 16).astype("uint8"), "L").save(folder / f"class_{label}" / f"{i}.png")
    loaded = load_task_data(folder, "digits", base)
    assert loaded["pixel_values"].shape == (30, 1, 8, 8)
    assert sorted(loaded["labels"].unique().tolist()) == [0, 1, 2]
    assert -1.0 <= float(loaded["pixel_values"].min()) and float(loaded["pixel_values"].max()) <= 1.0


@pytest.mark.parametrize("content,phrase", [
    ("not json\n", "not a JSON object"),
    ('{"txt": "x"}\n', "not a JSON object"),
])
def test_bad_jsonl_is_one_line_error(tmp_path, content, phrase):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(MergeInputError, match=phrase):
        load_task_data(path, "t", tmp_path)


def test_npz_without_inputs_and_ragged_rows_are_refused(tmp_path):
    np.savez(tmp_path / "a.npz", labels=np.zeros(3))
    with pytest.raises(MergeInputError, match="no pixel_values or input_ids"):
        load_task_data(tmp_path / "a.npz", "t")
    np.savez(tmp_path / "b.npz", input_ids=np.zeros((3, 2), dtype=np.int64), labels=np.zeros(4, dtype=np.int64))
    with pytest.raises(MergeInputError, match="disagree"):
        load_task_data(tmp_path / "b.npz", "t")
    np.savez(tmp_path / "c.npz", input_ids=np.zeros((3, 2), dtype=np.int64))
    assert load_task_data(tmp_path / "c.npz", "t")["input_ids"].dtype == torch.int64


def test_eval_reports_accuracy_of_a_static_output(families, tmp_path, capsys):
    base, tasks = families("vit")
    data = {}
    for i, name in enumerate(tasks):
        from safetensors.torch import save_file

        g = torch.Generator().manual_seed(i)
        save_file({"pixel_values": torch.randn(20, 1, 8, 8, generator=g), "labels": torch.randint(0, 3, (20,), generator=g)}, tmp_path / f"{name}.safetensors")
        data[name] = tmp_path / f"{name}.safetensors"
    spec = {"base": str(base), "models": {k: str(v) for k, v in tasks.items()}, "method": "ties", "output": "out"}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    assert main(["run", str(tmp_path / "job.yaml")]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "job.yaml"), *[f"--data={k}={v}" for k, v in data.items()]]) == 0
    table = capsys.readouterr().out
    assert "pretrained" in table and "individual" in table and "merged" in table and "average" in table
    assert main(["eval", str(tmp_path / "job.yaml")]) == 2
    assert "no evaluation data" in capsys.readouterr().err
