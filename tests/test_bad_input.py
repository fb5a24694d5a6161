"""Every user mistake: exit code 2, one line naming the problem and the fix, nothing written or lost."""

import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from rankmerge.service.cli import main


@pytest.fixture
def family(families, tmp_path):
    """A private copy of a tiny ViT family that a test may damage."""
    base, tasks = families("vit")
    shutil.copytree(base, tmp_path / "base")
    for name, path in tasks.items():
        shutil.copytree(path, tmp_path / name)
    return tmp_path / "base", {name: tmp_path / name for name in tasks}


def run_cli(capsys, base, tasks, out, method="task_arithmetic", extra=()):
    args = ["merge", "--base", str(base), "--method", method, "--out", str(out)]
    for name, path in tasks.items():
        args += ["--model", f"{name}={path}"]
    capsys.readouterr()  # only this command's output
    code = main(args + list(extra))
    err = capsys.readouterr().err.strip()
    return code, err


def assert_user_error(code, err, *phrases):
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "—" in lines[0], "the message must name a fix"
    for phrase in phrases:
        assert phrase in lines[0], lines[0]


def assert_nothing_written(out):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_missing_path(family, tmp_path, capsys):
    base, tasks = family
    tasks["task1"] = tmp_path / "nope"
    code, err = run_cli(capsys, base, tasks, tmp_path / "out")
    assert_user_error(code, err, "does not exist", "nope")
    assert_nothing_written(tmp_path / "out")


def test_not_a_model_directory(family, tmp_path, capsys):
    base, tasks = family
    (tmp_path / "empty").mkdir()
    tasks["task0"] = tmp_path / "empty"
    code, err = run_cli(capsys, base, tasks, tmp_path / "out")
    assert_user_error(code, err, "not a model directory")
    (tmp_path / "file.txt").write_text("x")
    code, err = run_cli(capsys, tmp_path / "file.txt", tasks, tmp_path / "out")
    assert_user_error(code, err, "not a model directory")
    assert_nothing_written(tmp_path / "out")


def test_truncated_safetensors(family, tmp_path, capsys):
    base, tasks = family
    weights = tasks["task2"] / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    code, err = run_cli(capsys, base, tasks, tmp_path / "out")
    assert_user_error(code, err, "truncated", "task2")
    assert_nothing_written(tmp_path / "out")


def test_corrupt_safetensors_header(family, tmp_path, capsys):
    base, tasks = family
    weights = tasks["task0"] / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:20] = b"not json at!"
    weights.write_bytes(bytes(data))
    code, err = run_cli(capsys, base, tasks, tmp_path / "out")
    assert_user_error(code, err, "corrupt safetensors")
    assert_nothing_written(tmp_path / "out")


def _rewrite(path, edit):
    state = load_file(str(path / "model.safetensors"))
    edit(state)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})


def test_keys_differ(family, tmp_path, capsys):
    base, tasks = family
    _rewrite(tasks["task1"], lambda s: s.pop("vit.encoder.layer.1.output.dense.weight"))
    code, err = run_cli(capsys, base, tasks, tmp_path / "out")
    assert_user_error(code, err, "keys differ", "encoder.layer.1.output.dense.weight", "task1")
    assert_nothing_written(tmp_path / "out")


def test_shapes_differ(family, tmp_path, capsys):
    base, tasks = family
    _rewrite(tasks["task0"], lambda s: s.update({"vit.encoder.layer.0.intermediate.dense.weight": torch.zeros(40, 32)}))
    code, err = run_cli(capsys, base, tasks, tmp_path / "out")
    assert_user_error(code, err, "shape mismatch", "intermediate.dense.weight")
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_in_task_vector(family, tmp_path, capsys, bad):
    base, tasks = family

    def poison(state):
        state["vit.encoder.layer.1.attention.attention.query.weight"][3, 3] = bad

    _rewrite(tasks["task2"], poison)
    code, err = run_cli(capsys, base, tasks, tmp_path / "out")
    assert_user_error(code, err, "NaN/Inf", "task2", "query.weight")
    assert_nothing_written(tmp_path / "out")


def test_unknown_method(family, tmp_path, capsys):
    base, tasks = family
    code, err = run_cli(capsys, base, tasks, tmp_path / "out", method="frankenmerge")
    assert_user_error(code, err, "unknown method", "ties")
    assert_nothing_written(tmp_path / "out")


def test_unknown_parameter(family, tmp_path, capsys):
    base, tasks = family
    code, err = run_cli(capsys, base, tasks, tmp_path / "out", method="ties", extra=["--set", "density=0.2"])
    assert_user_error(code, err, "unknown parameter 'density'", "lambda")
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("method,setting,name", [("dare", "p=1.0", "'p'"), ("ties", "k=0", "'k'"), ("cart", "rho=1.5", "'rho'"), ("ties", "merge=max", "'merge'")])
def test_parameter_out_of_range(family, tmp_path, capsys, method, setting, name):
    base, tasks = family
    code, err = run_cli(capsys, base, tasks, tmp_path / "out", method=method, extra=["--set", setting])
    assert_user_error(code, err, name)
    assert_nothing_written(tmp_path / "out")


def test_output_exists_and_is_not_empty(family, tmp_path, capsys):
    base, tasks = family
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, err = run_cli(capsys, base, tasks, out)
    assert_user_error(code, err, "already exists", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    code, _ = run_cli(capsys, base, tasks, out, extra=["--overwrite"])
    assert code == 0 and not (out / "keep.txt").exists()


def test_output_inside_an_input_is_refused(family, tmp_path, capsys):
    base, tasks = family
    code, err = run_cli(capsys, base, tasks, base, extra=["--overwrite"])
    assert_user_error(code, err, "overlaps the input")
    assert (base / "model.safetensors").exists()


def test_duplicate_task_names_on_command_line(family, tmp_path, capsys):
    base, tasks = family
    args = ["merge", "--base", str(base), "--method", "ties", "--out", str(tmp_path / "out"),
            "--model", f"a={tasks['task0']}", "--model", f"a={tasks['task1']}"]
    code = main(args)
    assert_user_error(code, capsys.readouterr().err.strip(), "duplicate task name 'a'")
    assert_nothing_written(tmp_path / "out")


def test_duplicate_task_names_in_yaml(family, tmp_path, capsys):
    base, tasks = family
    job = tmp_path / "job.yaml"
    job.write_text(f"base: {base}\nmethod: ties\noutput: out\nmodels:\n  a: {tasks['task0']}\n  a: {tasks['task1']}\n")
    code = main(["merge", str(job)])
    assert_user_error(code, capsys.readouterr().err.strip(), "duplicate key 'a'", "line 6")
    assert_nothing_written(tmp_path / "out")


def test_pickle_checkpoint_needs_allow_flag(family, tmp_path, capsys):
    base, tasks = family
    state = load_file(str(tasks["task0"] / "model.safetensors"))
    (tasks["task0"] / "model.safetensors").unlink()
    torch.save(state, tasks["task0"] / "pytorch_model.bin")
    code, err = run_cli(capsys, base, tasks, tmp_path / "out")
    assert_user_error(code, err, "pickle", "--allow-pickle")
    assert_nothing_written(tmp_path / "out")
    code, _ = run_cli(capsys, base, tasks, tmp_path / "out", extra=["--allow-pickle"])
    assert code == 0 and (tmp_path / "out" / "model.safetensors").exists()


def test_vocabulary_mismatch_has_a_hint(families, tmp_path, capsys):
    base, tasks = families("llama")
    bigger = tmp_path / "bigger"
    shutil.copytree(tasks["task1"], bigger)
    _rewrite(bigger, lambda s: s.update({"model.embed_tokens.weight": torch.zeros(66, 32)}))
    code, err = run_cli(capsys, base, {"task0": tasks["task0"], "task1": bigger}, tmp_path / "out")
    assert_user_error(code, err, "vocabulary mismatch", "66 rows", "resize_token_embeddings")
    assert_nothing_written(tmp_path / "out")


def test_architecture_mismatch(families, tmp_path, capsys):
    base, _ = families("vit")
    _, gpt_tasks = families("gpt2")
    code, err = run_cli(capsys, base, {"g": gpt_tasks["task0"]}, tmp_path / "out")
    assert_user_error(code, err, "architecture mismatch", "'vit'", "'gpt2'")


def test_bad_yaml_spec(tmp_path, capsys):
    job = tmp_path / "job.yaml"
    job.write_text("base: [unclosed\n")
    assert main(["merge", str(job)]) == 2
    assert_user_error(2, capsys.readouterr().err.strip(), "not valid YAML")
    job.write_text(yaml.safe_dump({"base": "b", "models": {"a": "x"}, "method": "ties", "output": "o", "colour": "red"}))
    assert main(["merge", str(job)]) == 2
    assert_user_error(2, capsys.readouterr().err.strip(), "colour")


def test_not_enough_disk_space(family, tmp_path, capsys, monkeypatch):
    import shutil as shutil_module
    from collections import namedtuple

    base, tasks = family
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    code, err = run_cli(capsys, base, tasks, tmp_path / "out")
    assert_user_error(code, err, "not enough disk space", "1.00 KB free")  # a sensible unit, never "0.00 GB"
    assert_nothing_written(tmp_path / "out")


def test_batch_not_divisible_by_workers(families, tmp_path, capsys):
    from conftest import make_adaptive_spec

    spec = make_adaptive_spec(families, tmp_path, batch_size=6)
    spec["resources"] = {"workers": 4}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    assert main(["run", str(tmp_path / "job.yaml"), "--executor", "ray"]) == 2
    assert_user_error(2, capsys.readouterr().err.strip(), "batch_size 6", "resources.workers 4")
    assert_nothing_written(tmp_path / "out")


def test_unreachable_ray_address(families, tmp_path, capsys):
    import socket

    from conftest import make_adaptive_spec

    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(make_adaptive_spec(families, tmp_path)))
    assert main(["run", str(tmp_path / "job.yaml"), "--executor", "ray", "--address", f"127.0.0.1:{port}"]) == 2
    assert_user_error(2, capsys.readouterr().err.strip(), "no Ray head answers", "ray start --head")
    assert_nothing_written(tmp_path / "out")
    assert not (tmp_path / "out.job" / "checkpoints").exists()
