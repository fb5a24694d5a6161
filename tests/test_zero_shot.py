"""Zero-shot heads for bare CLIP image encoders: the head equals the CLIP formula; static merges, AdaRank, AdaMerging,
`rankmerge eval` and the task-model loader run through it; a resume reuses the job's cached heads."""

import json

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer, CLIPVisionModel
from transformers.convert_slow_tokenizer import bytes_to_unicode

from rankmerge.service.cli import main
from rankmerge.service.tiny_models import TINY, perturb_
from rankmerge.workers.zero_shot import ZeroShot

from conftest import run_local_and_ray

CLASSES = ["cat", "dog", "car"]


def tiny_tokenizer(folder):
    """A real CLIP BPE tokenizer over single bytes (no merges): every prompt tokenises, no hub needed."""
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


@pytest.fixture(scope="module")
def clip_family(tmp_path_factory):
    """A tiny pretrained CLIPModel (with tokenizer and image processor) and three bare CLIPVisionModel fine-tunes."""
    root = tmp_path_factory.mktemp("clip")
    tokenizer = tiny_tokenizer(root / "vocab")
    vision = TINY["clip_vision"]().to_dict()
    text = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 48,
            "vocab_size": len(tokenizer), "max_position_embeddings": 77, "projection_dim": 16,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.eos_token_id}
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    base = root / "clip"
    clip.save_pretrained(base)
    tokenizer.save_pretrained(base)
    CLIPImageProcessor(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8}).save_pretrained(base)
    tasks = {}
    for t in range(3):
        encoder = CLIPVisionModel(clip.config.vision_config)
        encoder.load_state_dict(clip.vision_model.state_dict())
        perturb_(encoder, seed=t + 1, scale=0.05)
        tasks[f"task{t}"] = root / f"task{t}"
        encoder.save_pretrained(tasks[f"task{t}"])
    return base, tasks


def reference_logits(clip_dir, encoder_dir, pixels, templates):
    """The formula, straight from transformers' CLIPModel: the fine-tuned vision tower in the pretrained CLIP, per class
    the mean over templates of the normalised text features, normalised; image features normalised; × exp(logit_scale)."""
    clip = CLIPModel.from_pretrained(clip_dir).eval()
    clip.vision_model.load_state_dict(CLIPVisionModel.from_pretrained(encoder_dir).state_dict())
    tokenizer = CLIPTokenizer.from_pretrained(clip_dir)
    with torch.no_grad():
        rows = []
        for name in CLASSES:
            tokens = tokenizer([t.replace("{c}", name) for t in templates], padding=True, return_tensors="pt")
            text = clip.get_text_features(**tokens)
            text = getattr(text, "pooler_output", text)
            text = text / text.norm(dim=-1, keepdim=True)
            rows.append(text.mean(0) / text.mean(0).norm())
        image = clip.get_image_features(pixel_values=pixels)
        image = getattr(image, "pooler_output", image)
        image = image / image.norm(dim=-1, keepdim=True)
        return clip.logit_scale.exp() * image @ torch.stack(rows).t()


def test_zero_shot_head_equals_the_clip_formula(clip_family, tmp_path):
    """One template: exactly CLIPModel's own logits_per_image; several: the normalise-mean-normalise order."""
    from rankmerge.workers.checkpoint_reader import ModelCheckpoint
    from rankmerge.workers.tta.sources import Sources, open_tasks
    from rankmerge.workers.zero_shot import TaskHead, prepare_heads
    from rankmerge.workers.zero_shot_model import CLIPZeroShotClassifier
    from contextlib import ExitStack

    base, tasks = clip_family
    pixels = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    clip = CLIPModel.from_pretrained(base).eval()
    clip.vision_model.load_state_dict(CLIPVisionModel.from_pretrained(tasks["task0"]).state_dict())
    tokens = CLIPTokenizer.from_pretrained(base)([f"a photo of a {c}." for c in CLASSES], padding=True, return_tensors="pt")
    with torch.no_grad():
        own = clip(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels).logits_per_image
    for templates, expected in ((["a photo of a {c}."], own),
                                (["a photo of a {c}.", "a blurry {c}", "itap of the {c}!"], None)):
        expected = reference_logits(base, tasks["task0"], pixels, templates) if expected is None else expected
        heads = {"task0": TaskHead(zero_shot=ZeroShot(classnames=CLASSES, templates=templates))}
        files = prepare_heads(heads, {"task0": tasks["task0"]}, base, tmp_path / f"job{len(templates)}")
        with ExitStack() as stack:
            base_ck = stack.enter_context(ModelCheckpoint(base, "base"))
            (task,) = open_tasks(Sources(base, {"task0": tasks["task0"]}, heads=files), base_ck, stack)
            assert task.config["id2label"] == {"0": "cat", "1": "dog", "2": "car"}
            model = CLIPZeroShotClassifier(CLIPVisionModel.config_class(**task.config))
            with ModelCheckpoint(tasks["task0"], "task0") as encoder:
                state = {k.removeprefix("vision_model."): encoder.read(k) for k in encoder.keys()}
            state.update({k: task.read(k) for k in task.head})
            model.load_state_dict(state, strict=False)
            got = model.eval()(pixel_values=pixels).logits
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_builtin_datasets_name_their_classes_and_templates():
    assert ZeroShot(dataset="eurosat").resolved_classnames()[0] == "annual crop land"
    assert len(ZeroShot(dataset="sun397").resolved_classnames()) == 397
    assert len(ZeroShot(dataset="stanford_cars").resolved_classnames()) == 196
    assert all("{c}" in t for t in ZeroShot(dataset="gtsrb").resolved_templates())
    assert ZeroShot(classnames=["a", "b"]).resolved_templates() == ["a photo of a {c}."]
    with pytest.raises(ValueError, match="unknown dataset"):
        ZeroShot(dataset="imagenet-x")
    with pytest.raises(ValueError, match=r"\{c\}"):
        ZeroShot(classnames=["a"], templates=["no slot"])


def image_dataset(rows: int, seed: int):
    """A real `datasets.Dataset` of random RGB images with a ClassLabel column."""
    import datasets
    from PIL import Image

    datasets.disable_progress_bars()
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (rows, 8, 8, 3), generator=gen, dtype=torch.uint8).numpy()
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    return datasets.Dataset.from_dict({"image": [Image.fromarray(p) for p in pixels],
                                       "label": torch.randint(0, 3, (rows,), generator=gen).tolist()}, features=features)


def zero_shot_spec(clip_family, tmp_path, method, **tta):
    """task1's data is a Hugging Face dataset saved to disk; the others are tensors."""
    base, tasks = clip_family
    data = {}
    for i, name in enumerate(tasks):
        gen = torch.Generator().manual_seed(10 + i)
        path = tmp_path / f"{name}.safetensors"
        save_file({"pixel_values": torch.randn(24, 3, 8, 8, generator=gen), "labels": torch.randint(0, 3, (24,), generator=gen)}, path)
        data[name] = str(path)
    image_dataset(24, seed=1).save_to_disk(tmp_path / "task1_hf")
    data["task1"] = str(tmp_path / "task1_hf")
    (tmp_path / "names.txt").write_text("\n".join(CLASSES) + "\n")
    heads = {"task0": {"zero_shot": {"classnames": CLASSES}}, "task1": {"zero_shot": {"classnames": "names.txt"}},
             "task2": {"zero_shot": {"classnames": CLASSES, "templates": ["a photo of a {c}.", "a {c}"]}}}
    return {"base": str(base), "models": {k: str(v) for k, v in tasks.items()}, "heads": heads, "method": method,
            "params": {}, "output": str(tmp_path / "out"),
            "tta": {"data": data, "steps": 4, "batch_size": 6, "checkpoint_every": 2, "lr": 0.05, **tta}}


@pytest.mark.parametrize("method,objective", [("adarank", "entropy"), ("adamerging", "distill")])
def test_adaptive_merge_and_eval_run_through_zero_shot_heads(clip_family, tmp_path, capsys, method, objective):
    from rankmerge.service.task_model import load_task_model

    spec = zero_shot_spec(clip_family, tmp_path, method, objective=objective)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    assert main(["run", str(tmp_path / "job.yaml")]) == 0
    out = tmp_path / "out"
    report = json.loads((out / "merge_report.json").read_text())
    assert set(report["accuracy"]) == {"task0", "task1", "task2", "average"}
    assert sorted(report["heads"]["task0"]) == ["classifier.visual_projection.weight", "classifier.weight"]
    with safe_open(str(out / "heads" / "task2.safetensors"), "pt") as f:
        config = json.loads(f.metadata()["config"])
    assert config["architectures"] == ["CLIPZeroShotClassifier"] and config["id2label"]["2"] == "car"
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "job.yaml")]) == 0
    table = capsys.readouterr().out
    assert "task1" in table and "merged" in table
    # the loader gives a ready model whose logits are the formula on the merged encoder
    model = load_task_model(out, "task2")
    assert model.config.id2label[1] == "dog"
    merged_encoder = tmp_path / "merged_encoder"
    CLIPVisionModel.from_pretrained(out).save_pretrained(merged_encoder)
    pixels = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = model(pixel_values=pixels).logits
    expected = reference_logits(clip_family[0], merged_encoder, pixels, ["a photo of a {c}.", "a {c}"])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    # exported as a plain folder, the task model reloads through its own class with the same logits
    from rankmerge.service.task_model import export_task_model
    from rankmerge.workers.zero_shot_model import CLIPZeroShotClassifier

    exported = CLIPZeroShotClassifier.from_pretrained(export_task_model(out, "task2", tmp_path / "task2_model")).eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(pixel_values=pixels).logits, got)


def test_static_merge_publishes_zero_shot_heads(clip_family, tmp_path, monkeypatch, capsys):
    """A static merge writes every zero-shot head; `rankmerge eval --data` takes a dataset id from the Hub cache."""
    from huggingface_hub import constants

    spec = zero_shot_spec(clip_family, tmp_path, "task_arithmetic")
    data = spec.pop("tta")["data"]
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    assert main(["run", str(tmp_path / "job.yaml")]) == 0
    assert sorted(p.name for p in (tmp_path / "out" / "heads").iterdir()) == [f"task{i}.safetensors" for i in range(3)]
    snapshot = tmp_path / "hub" / "datasets--org--pets" / "snapshots" / ("0" * 40)
    (snapshot / "data").mkdir(parents=True)
    image_dataset(9, seed=7).to_parquet(str(snapshot / "data" / "test-00000-of-00001.parquet"))
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "job.yaml"), "--data", f"task0={data['task0']}", "--data", "task1=org/pets",
                 "--data", f"task2={data['task2']}"]) == 0
    assert "task1" in capsys.readouterr().out


def test_resume_reuses_the_cached_heads(clip_family, tmp_path, caplog):
    from rankmerge.workers.zero_shot import TaskHead, prepare_heads

    spec = zero_shot_spec(clip_family, tmp_path, "adarank", objective="entropy")
    spec["overwrite"] = True
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    assert main(["run", str(tmp_path / "job.yaml")]) == 0
    cache = tmp_path / "out.job" / "zero_shot" / "task0.safetensors"
    before = cache.stat()
    caplog.set_level("INFO", logger="rankmerge.workers.zero_shot")
    assert main(["run", str(tmp_path / "job.yaml"), "--resume"]) == 0
    after = cache.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert "reusing" in caplog.text
    # other templates are another head: recomputed, not the cached one
    base, tasks = clip_family
    other = {"task0": TaskHead(zero_shot=ZeroShot(classnames=CLASSES, templates=["a {c}"]))}
    prepare_heads(other, {"task0": tasks["task0"]}, base, tmp_path / "out.job")
    assert cache.stat().st_mtime_ns != before.st_mtime_ns


def test_zero_shot_heads_need_the_full_clip_model(clip_family, tmp_path, capsys):
    spec = zero_shot_spec(clip_family, tmp_path, "task_arithmetic")
    spec.pop("tta")
    spec["zero_shot_model"] = spec["models"]["task0"]  # a bare encoder: no text tower
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    assert main(["run", str(tmp_path / "job.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "full pretrained CLIP model" in err[0] and not (tmp_path / "out").exists()


def test_hugging_face_datasets_saved_to_disk_and_in_the_hub_cache(clip_family, tmp_path, monkeypatch):
    """save_to_disk (a dict of splits: `test` is used) and the Hub's parquet layout read the same rows; labels come from
    the ClassLabel column; pixels are the base's image processor on the images."""
    import datasets
    from huggingface_hub import constants

    from rankmerge.service.model_ids import resolve_spec_models
    from rankmerge.workers.tta.data import load_task_data

    base, _ = clip_family
    test, train = image_dataset(10, seed=2), image_dataset(4, seed=3)
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(tmp_path / "saved")
    snapshot = tmp_path / "hub" / "datasets--org--shapes" / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    (snapshot / "digits").mkdir(parents=True)  # one configuration's folder, shards named <split>-NNNNN-of-NNNNN
    train.to_parquet(str(snapshot / "digits" / "train-00000-of-00001.parquet"))
    test.to_parquet(str(snapshot / "digits" / "test-00000-of-00001.parquet"))
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(snapshot.name)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    spec = resolve_spec_models({"tta": {"data": {"shapes": "org/shapes"}}}, tmp_path)
    assert spec["tta"]["data"]["shapes"] == str(snapshot)

    expected = CLIPImageProcessor.from_pretrained(base)(images=[r["image"] for r in test], return_tensors="pt")["pixel_values"]
    for path in (tmp_path / "saved", snapshot):
        got = load_task_data(path, "shapes", base)
        assert torch.equal(got["labels"], torch.tensor(test["label"]))
        torch.testing.assert_close(got["pixel_values"], expected)
    (snapshot / "full").mkdir()
    test.to_parquet(str(snapshot / "full" / "test-00000-of-00001.parquet"))
    with pytest.raises(Exception, match="several configurations .digits, full."):
        load_task_data(snapshot, "shapes", base)
    assert torch.equal(load_task_data(snapshot / "full", "shapes", base)["labels"], torch.tensor(test["label"]))
    with pytest.raises(Exception, match="org/other.*hf download org/other --repo-type dataset"):
        resolve_spec_models({"tta": {"data": {"x": "org/other"}}}, tmp_path)


def fake_hub_cache(cache, clip_dir, encoder_dir, tasks, backbone, rows=12):
    """A Hugging Face cache holding what benchmarks/paper_table1.py reads, with tiny stand-ins under the real ids."""
    import shutil

    def snapshot(kind, repo):
        folder = cache / f"{kind}s--{repo.replace('/', '--')}"
        (folder / "refs").mkdir(parents=True)
        (folder / "refs" / "main").write_text("0" * 40)
        return folder / "snapshots" / ("0" * 40)

    shutil.copytree(clip_dir, snapshot("model", f"openai/clip-{backbone}"))
    for i, (task, (name, dataset, sub)) in enumerate(tasks.items()):
        shutil.copytree(encoder_dir, snapshot("model", f"tanganke/clip-{backbone}_{name}"))
        folder = snapshot("dataset", dataset) / (sub or "data")
        folder.mkdir(parents=True)
        image_dataset(rows, seed=20 + i).to_parquet(str(folder / "test-00000-of-00001.parquet"))


def test_paper_table1_names_what_the_cache_lacks_in_one_line(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path), "PY": sys.executable}
    done = subprocess.run(["bash", str(root / "benchmarks" / "paper_table1.sh")], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert "lacks 17 of the 17 inputs" in line and "model openai/clip-vit-base-patch32" in line and "dataset tanganke/dtd" in line


def test_paper_table1_runs_its_rows_from_the_cache(clip_family, tmp_path, monkeypatch, capsys):
    """The benchmark end to end on tiny stand-ins: zero-shot heads from the built-in class names, data from parquet."""
    import importlib.util
    from pathlib import Path

    from huggingface_hub import constants

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "paper_table1.py"
    spec = importlib.util.spec_from_file_location("paper_table1", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    base, tasks = clip_family
    fake_hub_cache(tmp_path / "hub", base, tasks["task0"], bench.TASKS, "vit-base-patch32")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    rows = "Task Arithmetic,TA + AdaRank (ours: distill)"
    assert bench.main(["--work", str(tmp_path / "work"), "--steps", "2", "--batch-size", "4", "--device", "cpu", "--rows", rows]) == 0
    out = capsys.readouterr().out
    for label in ("Pretrained (zero-shot)", "Individual", "Task Arithmetic", "TA + AdaRank (ours: distill)"):
        assert f"| {label} |" in out
    results = json.loads((tmp_path / "work" / "results.json").read_text())
    assert set(results["Task Arithmetic"]) == {*bench.TASKS, "average"}


def test_zero_shot_heads_fit_clip_encoders_only(clip_family, families, tmp_path, capsys):
    """A classifier-carrying CLIP task gets its own head replaced; a ViT task is refused in one line."""
    from rankmerge.service.task_model import load_task_model

    for kind, code in (("clip_vision", 0), ("vit", 2)):
        base, tasks = families(kind)
        spec = {"base": str(base), "models": {k: str(v) for k, v in tasks.items()}, "method": "task_arithmetic",
                "zero_shot_model": str(clip_family[0]), "heads": {"task0": {"zero_shot": {"classnames": CLASSES}}},
                "output": str(tmp_path / kind)}
        (tmp_path / f"{kind}.yaml").write_text(yaml.safe_dump(spec))
        assert main(["run", str(tmp_path / f"{kind}.yaml")]) == code
    model = load_task_model(tmp_path / "clip_vision", "task0")
    assert type(model).__name__ == "CLIPZeroShotClassifier" and model.config.num_labels == 3
    assert type(load_task_model(tmp_path / "clip_vision", "task1")).__name__ == "CLIPForImageClassification"
    err = capsys.readouterr().err.strip().splitlines()
    assert "a zero-shot head scores a CLIP image encoder, but 'task0' is 'vit'" in err[-1] and not (tmp_path / "vit").exists()


def test_a_missing_datasets_package_is_one_line_with_the_install_command(tmp_path, monkeypatch):
    import sys

    from rankmerge.workers.errors import MergeInputError
    from rankmerge.workers.tta.data import load_task_data

    image_dataset(4, seed=5).save_to_disk(tmp_path / "saved")
    monkeypatch.setitem(sys.modules, "datasets", None)  # what `import datasets` meets where it is not installed
    with pytest.raises(MergeInputError, match=r"needs the `datasets` package — pip install 'rankmerge\[hf\]'"):
        load_task_data(tmp_path / "saved", "shapes", None)


@pytest.mark.slow
def test_zero_shot_heads_on_the_ray_executor_match_local(clip_family, tmp_path, monkeypatch):
    """Shards and workers open the job's cached heads themselves: a real local Ray run learns what the local one does."""
    spec = zero_shot_spec(clip_family, tmp_path, "adarank", objective="entropy", select="final")
    spec["resources"] = {"shards": 2, "workers": 1}
    reports = run_local_and_ray(spec, tmp_path, monkeypatch)
    assert reports["ray"]["accuracy"] == reports["local"]["accuracy"]


@pytest.mark.parametrize("content, message", [(b"\n\n", "is empty"), (b"\xff\xfe\x00cat", "cannot be read")])
def test_a_bad_class_name_file_is_one_line_and_nothing_is_written(clip_family, tmp_path, capsys, content, message):
    spec = zero_shot_spec(clip_family, tmp_path, "task_arithmetic")
    spec.pop("tta")
    (tmp_path / "names.txt").write_bytes(content)  # task1's class names
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    assert main(["run", str(tmp_path / "job.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "names.txt" in err[-1] and not (tmp_path / "out").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA GPU")
def test_zero_shot_heads_computed_on_cuda_match_the_cpu(clip_family, tmp_path):
    """Every class × template prompt goes through the text tower on the job's device; the head is the CPU's."""
    from safetensors.torch import load_file

    from rankmerge.workers.zero_shot import TaskHead, prepare_heads

    base, tasks = clip_family
    heads = {"task0": TaskHead(zero_shot=ZeroShot(classnames=CLASSES, templates=["a photo of a {c}.", "a blurry {c}"]))}
    files = {device: prepare_heads(heads, {"task0": tasks["task0"]}, base, tmp_path / device, torch.device(device))["task0"]
             for device in ("cpu", "cuda")}
    cpu, cuda = load_file(str(files["cpu"])), load_file(str(files["cuda"]))
    assert cpu.keys() == cuda.keys() and all(v.device.type == "cpu" for v in cuda.values())
    for key in cpu:
        torch.testing.assert_close(cuda[key], cpu[key], atol=1e-4, rtol=1e-4)
