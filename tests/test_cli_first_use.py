"""What a first-time user trips over: each defect of the first-use review, through the real CLI on real files."""

import logging
import shutil
import subprocess
import sys

import pytest
import yaml
from huggingface_hub import ModelCard

from rankmerge.service.cli import build_parser, main
from conftest import make_adaptive_spec


def merge_args(base, tasks, method, out, *extra):
    args = ["merge", "--base", str(base), "--method", method, "--out", str(out)]
    for name, path in tasks.items():
        args += ["--model", f"{name}={path}"]
    return args + list(extra)


def assert_user_error(code, err, *phrases):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "—" in lines[0], err
    for phrase in phrases:
        assert phrase in lines[0], lines[0]


@pytest.mark.parametrize("kind", ["vit", "llama"])
def test_ties_dry_run_with_model_scope_forecasts(kind, families, tmp_path, capsys):
    """The forecast samples one tensor: its whole-model trim rank must be the sample's, not the model's."""
    base, tasks = families(kind)
    out = tmp_path / "merged"
    assert main(merge_args(base, tasks, "ties", out, "--dry-run", "--set", "scope=model")) == 0
    text = capsys.readouterr().out
    assert "trim thresholds (1/2)" in text and "predicted wall time" in text
    assert not out.exists()


def write_spec(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def relative_ties_spec(families, tmp_path):
    """specs/ties.yaml whose paths are relative to specs/ (the family copied beside it)."""
    base, tasks = families("vit")
    root = tmp_path / "m"
    shutil.copytree(base, root / "base")
    for name, path in tasks.items():
        shutil.copytree(path, root / name)
    spec = {"base": "../m/base", "models": {name: f"../m/{name}" for name in tasks}, "method": "ties", "output": "out/fromspec"}
    return write_spec(tmp_path / "specs" / "ties.yaml", spec), spec


def test_path_flags_are_relative_to_the_current_directory(families, tmp_path, monkeypatch, capsys):
    spec_file, spec = relative_ties_spec(families, tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["merge", "specs/ties.yaml", "--out", "out/x", "--base", "m/base"]) == 0
    assert (tmp_path / "out" / "x" / "model.safetensors").exists() and not (tmp_path / "specs" / "out").exists()
    capsys.readouterr()
    assert_user_error(main(["merge", "specs/ties.yaml", "--out", "out/y", "--base", "base"]), capsys.readouterr().err,
                      "base: path", "check --base base (relative to the current directory)")
    assert_user_error(main(["merge", "specs/ties.yaml", "--out", "out/y", "--model", "task0=task0"]), capsys.readouterr().err,
                      "models.task0: path", "check --model task0=task0 (relative to the current directory)")
    write_spec(spec_file, dict(spec, models={**spec["models"], "task1": "../m/gone"}))
    assert_user_error(main(["merge", "specs/ties.yaml", "--out", "out/y"]), capsys.readouterr().err,
                      "models.task1: path", "`models.task1` in the job spec specs/ties.yaml (relative to the spec's folder)")
    assert not (tmp_path / "out" / "y").exists()


def test_merge_of_an_adaptive_spec_points_to_run_and_methods_lists_it(families, tmp_path, capsys):
    spec = write_spec(tmp_path / "adarank.yaml", make_adaptive_spec(families, tmp_path))
    assert_user_error(main(["merge", str(spec)]), capsys.readouterr().err, "'adarank' adapts at test time", f"rankmerge run {spec}")
    assert not (tmp_path / "out").exists()
    assert main(["methods"]) == 0
    listed = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line and not line[0].isspace()}
    for name in ("adarank", "adamerging"):
        assert "adaptive" in listed[name] and "rankmerge run" in listed[name]
    assert "ties" in listed and "adaptive" not in listed["ties"]


def test_restart_and_resume_summary_of_an_adaptive_run(families, tmp_path, capsys):
    spec = write_spec(tmp_path / "adarank.yaml", make_adaptive_spec(families, tmp_path, steps=4))
    checkpoints, out = tmp_path / "out.job" / "checkpoints", tmp_path / "out"
    assert main(["run", str(spec)]) == 0
    assert "4 steps this run, loss" in capsys.readouterr().out
    assert_user_error(main(["run", str(spec)]), capsys.readouterr().err, "already holds checkpoints", "--resume", "--restart")
    assert_user_error(main(["run", str(spec), "--restart", "--resume"]), capsys.readouterr().err, "--resume and --restart")
    assert_user_error(main(["run", str(spec), "--restart"]), capsys.readouterr().err, "already exists", "--overwrite")
    assert sorted(p.name for p in checkpoints.iterdir())[-1] == "step_00000004"  # a refused restart removes nothing

    shutil.rmtree(checkpoints / "step_00000004")  # as if the run had stopped after step 2
    assert main(["run", str(spec), "--resume", "--overwrite"]) == 0
    assert "2 steps this run (resumed at step 2; 4 in all)" in capsys.readouterr().out

    stale = checkpoints / "step_00000099"
    stale.mkdir()
    assert main(["run", str(spec), "--restart", "--overwrite"]) == 0
    assert "4 steps this run, loss" in capsys.readouterr().out
    assert not stale.exists() and (checkpoints / "step_00000004").is_dir()


def cli(*args, **kwargs):
    """The real `rankmerge` entry point in a fresh process (logging and stdout as a user's shell sees them)."""
    return subprocess.Popen([sys.executable, "-m", "rankmerge", *args], stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.mark.parametrize("argv", [["-v", "methods"], ["methods", "-v"], ["bench", "report", "digits", "-v"]])
def test_verbose_is_accepted_before_and_after_the_subcommand(argv):
    assert build_parser().parse_args(argv).verbose is True
    assert build_parser().parse_args([a for a in argv if a != "-v"]).verbose is False


def test_verbose_after_merge_logs_progress(families, tmp_path):
    base, tasks = families("vit")
    proc = cli(*merge_args(base, tasks, "task_arithmetic", tmp_path / "out", "-v"), stdout=subprocess.DEVNULL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "INFO rankmerge.service.merge_job: merging 3 models" in err, err


def test_closed_stdout_exits_quietly():
    """`rankmerge schema | head`: the reader is gone before the output is written."""
    proc = cli("schema", "--method", "adarank", stdout=subprocess.PIPE)
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141 and "Traceback" not in err and "BrokenPipeError" not in err, err


def test_one_model_ties_warns(families, tmp_path, caplog):
    base, tasks = families("vit")
    one = dict(list(tasks.items())[:1])
    with caplog.at_level(logging.WARNING):
        assert main(merge_args(base, one, "ties", tmp_path / "out")) == 0
    assert any("ties with one model: sign election is a no-op" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert main(merge_args(base, tasks, "ties", tmp_path / "out2")) == 0
    assert not any("sign election" in r.getMessage() for r in caplog.records)


def test_output_has_a_model_card_not_the_bases(families, tmp_path):
    base, tasks = families("vit")
    own_base = tmp_path / "base"
    shutil.copytree(base, own_base)
    (own_base / "README.md").write_text("---\nlicense: mit\n---\n# Base card of another model\n")
    out = tmp_path / "merged"
    assert main(merge_args(own_base, tasks, "ties", out, "--set", "k=0.3")) == 0
    card = ModelCard.load(out / "README.md")
    meta = card.data.to_dict()
    assert meta["base_model"] == str(own_base) and meta["library_name"] == "rankmerge" and meta["base_model_relation"] == "merge"
    assert meta["models"] == {name: str(path) for name, path in tasks.items()}
    assert meta["method"] == "ties" and meta["parameters"] == {"k": 0.3, "lambda": 0.3, "merge": "sum", "scope": "model"}
    assert "Base card" not in card.text and "`heads/task0.safetensors`" in card.text
