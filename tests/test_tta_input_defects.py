"""Bad inputs and faults of adaptive jobs: TTA data, output/data/job_dir overlaps, resuming on replaced model files,
SIGTERM. Each user mistake gets one line `error: problem — fix`, exit 2, and nothing is written or lost."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import make_adaptive_spec
from rankmerge.service.cli import main
from test_bad_input import _rewrite, assert_user_error


@pytest.fixture
def spec(families, tmp_path):
    """An adaptive spec over private copies of a tiny ViT family (a test may replace their files)."""
    data = make_adaptive_spec(families, tmp_path)
    for role, path in [("base", data["base"]), *data["models"].items()]:
        shutil.copytree(path, tmp_path / role)
    data["base"] = str(tmp_path / "base")
    data["models"] = {name: str(tmp_path / name) for name in data["models"]}
    return data


def run_job(capsys, tmp_path, spec, *flags):
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    capsys.readouterr()
    code = main(["run", str(tmp_path / "job.yaml"), *flags])
    return code, capsys.readouterr().err.strip()


def assert_nothing_started(tmp_path):
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.job" / "checkpoints").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def _edit_data(spec, task, edit):
    path = spec["tta"]["data"][task]
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)
    return path


def test_nan_pixels_in_tta_data(spec, tmp_path, capsys):
    _edit_data(spec, "task1", lambda t: t["pixel_values"][5, 0, 2, 2].fill_(float("nan")))
    code, err = run_job(capsys, tmp_path, spec)
    assert_user_error(code, err, "'task1'", "task1.safetensors", "'pixel_values'", "NaN/Inf")
    assert_nothing_started(tmp_path)


def test_zero_byte_data_file(spec, tmp_path, capsys):
    open(spec["tta"]["data"]["task0"], "wb").close()
    code, err = run_job(capsys, tmp_path, spec)
    assert_user_error(code, err, "'task0'", "task0.safetensors", "empty (0 bytes)")
    assert_nothing_started(tmp_path)


def test_data_file_without_rows(spec, tmp_path, capsys):
    _edit_data(spec, "task2", lambda t: t.update({"pixel_values": t["pixel_values"][:0], "labels": t["labels"][:0]}))
    code, err = run_job(capsys, tmp_path, spec)
    assert_user_error(code, err, "'task2'", "has no examples")
    assert "disagree" not in err
    assert_nothing_started(tmp_path)


def test_output_holding_the_tta_data_is_not_replaced(spec, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    moved = shutil.move(spec["tta"]["data"]["task0"], out / "task0.safetensors")
    spec["tta"]["data"]["task0"] = str(moved)
    code, err = run_job(capsys, tmp_path, spec, "--overwrite")
    assert_user_error(code, err, "overlaps the data of task 'task0'")
    assert [p.name for p in out.iterdir()] == ["task0.safetensors"]


@pytest.mark.parametrize("where,phrase", [("out", "overlaps the output"), ("out/state", "overlaps the output"),
                                          ("task1/state", "overlaps the model 'task1'"), ("base", "overlaps the base")])
def test_job_dir_inside_the_output_or_an_input(spec, tmp_path, capsys, where, phrase):
    spec["job_dir"] = str(tmp_path / where)
    code, err = run_job(capsys, tmp_path, spec, "--overwrite")
    assert_user_error(code, err, "job_dir", phrase)
    assert not (tmp_path / where / "checkpoints").exists() and not (tmp_path / "out").exists()


def test_resume_after_the_model_files_were_replaced(spec, tmp_path, capsys):
    spec["overwrite"] = True
    assert run_job(capsys, tmp_path, spec)[0] == 0
    assert run_job(capsys, tmp_path, spec, "--resume")[0] == 0  # same files: resumes
    published = (tmp_path / "out" / "model.safetensors").read_bytes()
    key = "vit.encoder.layer.1.output.dense.weight"
    _rewrite(tmp_path / "task1", lambda s: s[key].add_(0.01))  # same path, same size and header, other weights
    code, err = run_job(capsys, tmp_path, spec, "--resume")
    assert_user_error(code, err, "files changed since the checkpoints", "without --resume")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == published


def test_sigterm_is_handled_like_ctrl_c(spec, tmp_path):
    spec["tta"].update(steps=100000, checkpoint_every=100000)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    child = subprocess.Popen([sys.executable, "-m", "rankmerge", "run", str(tmp_path / "job.yaml")], stderr=subprocess.PIPE,
                             text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    first = tmp_path / "out.job" / "checkpoints" / "step_00000000"
    deadline = time.monotonic() + 120
    while not first.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert first.exists(), child.communicate()[1] if child.poll() is not None else "no step-0 checkpoint"
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 143, err
    assert err.strip().splitlines()[-1] == "terminated: nothing was published" and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    leftovers = [p for p in [*tmp_path.iterdir(), *first.parent.iterdir()] if ".tmp-" in p.name]
    assert not leftovers


def test_missing_data_file_is_one_line(spec, tmp_path, capsys):
    spec["tta"]["data"]["task0"] = str(tmp_path / "nowhere.safetensors")
    code, err = run_job(capsys, tmp_path, spec)
    assert_user_error(code, err, "tta.data.task0", "nowhere.safetensors does not exist")
    assert_nothing_started(tmp_path)


def test_labels_outside_the_heads_classes(spec, tmp_path, capsys):
    classes = len(yaml.safe_load(open(os.path.join(spec["models"]["task1"], "config.json")))["id2label"])
    _edit_data(spec, "task1", lambda t: t["labels"].__setitem__(0, classes))
    code, err = run_job(capsys, tmp_path, spec)
    assert_user_error(code, err, "'task1'", f"{classes} classes", "labels")
    assert_nothing_started(tmp_path)


def test_fewer_rows_than_the_batch(spec, tmp_path, capsys):
    spec["tta"]["batch_size"] = 30  # the data has 24 rows per task
    code, err = run_job(capsys, tmp_path, spec)
    assert_user_error(code, err, "24 rows", "batch_size 30", "lower tta.batch_size")
    assert_nothing_started(tmp_path)


def test_images_of_another_size_are_adapted_with_a_warning(spec, tmp_path, capsys, caplog):
    for task in spec["tta"]["data"]:
        _edit_data(spec, task, lambda t: t.__setitem__("pixel_values", torch.nn.functional.pad(t["pixel_values"], (0, 4, 0, 4))))
    spec["tta"]["steps"] = 1
    code, _ = run_job(capsys, tmp_path, spec)
    assert code == 0
    assert any("interpolated position embeddings" in r.getMessage() for r in caplog.records)


def test_image_folder_without_an_image_processor_names_the_cause(spec, tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(8):
        Image.new("L", (8, 8), color=i * 20).save(folder / f"{i}.png")
    (tmp_path / "base" / "preprocessor_config.json").unlink(missing_ok=True)
    spec["tta"]["data"]["task0"] = str(folder)
    code, err = run_job(capsys, tmp_path, spec)
    assert_user_error(code, err, "'task0'", "image folder", "no image processor", "save the base model's image processor")
    assert "re-export" not in err
