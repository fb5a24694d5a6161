"""Bad inputs and faults of a static merge that once crashed with a traceback or went ahead silently: each now gets one
line `error: problem — fix`, exit 2, and leaves nothing behind (no output, no temp folder, no lost data)."""

import json
import os
import re
import resource
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from rankmerge.service.cli import main
from test_bad_input import _rewrite, assert_nothing_written, assert_user_error, family, run_cli  # noqa: F401 (fixture)

LOG_LINE = re.compile(r"^(WARNING|INFO) |^\[[^]]*\] \[(WARNING|INFO)\]")  # log lines, not the error


def cli_in_child(args, file_size_limit):
    """The real CLI in a child process under `ulimit -f` (RLIMIT_FSIZE applies to a whole process)."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, resource.RLIM_INFINITY))

    done = subprocess.run([sys.executable, "-m", "rankmerge", *args], preexec_fn=limit, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, timeout=300)
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, "\n".join(line for line in done.stderr.splitlines() if not LOG_LINE.match(line))


def merge_args(base, tasks, out, *extra):
    args = ["merge", "--base", str(base), "--method", "task_arithmetic", "--out", str(out)]
    for name, path in tasks.items():
        args += ["--model", f"{name}={path}"]
    return args + list(extra)


def test_integer_task_tensor_where_the_base_is_float(family, tmp_path, capsys):
    base, tasks = family
    key = "vit.encoder.layer.0.intermediate.dense.weight"
    _rewrite(tasks["task1"], lambda s: s.update({key: (s[key] * 100).to(torch.int64)}))
    code, err = run_cli(capsys, base, tasks, tmp_path / "out")
    assert_user_error(code, err, "dtype mismatch", "intermediate.dense.weight", "int64", "task1", "float32")
    assert_nothing_written(tmp_path / "out")


def test_symlink_loop_as_a_path(family, tmp_path, capsys):
    base, tasks = family
    os.symlink(tmp_path / "loop_a", tmp_path / "loop_b")
    os.symlink(tmp_path / "loop_b", tmp_path / "loop_a")
    code, err = run_cli(capsys, base, {**tasks, "task0": tmp_path / "loop_a"}, tmp_path / "out")
    assert_user_error(code, err, "cannot be resolved", "loop_a", "symlink loop")
    code, err = run_cli(capsys, base, tasks, tmp_path / "loop_a" / "out")
    assert_user_error(code, err, "cannot be resolved")
    assert_nothing_written(tmp_path / "out")


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder nobody may create files in (as root, permission bits do not stop writes: make it immutable too)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    immutable = os.geteuid() == 0 and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    try:
        (folder / "probe").mkdir()
    except OSError:
        yield folder
    else:
        pytest.skip("cannot make a read-only folder here")
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)


def test_read_only_output_parent(family, read_only_dir, capsys):
    base, tasks = family
    code, err = run_cli(capsys, base, tasks, read_only_dir / "out")
    assert_user_error(code, err, str(read_only_dir), "is not writable")  # found before any work, even as root
    assert list(read_only_dir.iterdir()) == []


def test_file_size_limit_hit_while_laying_out_the_shards(family, tmp_path):
    """`ulimit -f` below the shard size: the writer fails inside __enter__ and must still remove its temp folder."""
    base, tasks = family
    code, err = cli_in_child(merge_args(base, tasks, tmp_path / "out"), file_size_limit=16 * 1024)
    assert_user_error(code, err, "cannot write the output", "File too large", "ulimit -f")
    assert_nothing_written(tmp_path / "out")


def test_disk_full_while_copying_side_files(family, tmp_path):
    """A side file (here a 2 MB tokenizer.json) larger than the space left: the copy fails after every tensor is written."""
    base, tasks = family
    (base / "tokenizer.json").write_text(json.dumps({"vocab": ["x" * 64] * 32 * 1024}))
    code, err = cli_in_child(merge_args(base, tasks, tmp_path / "out"), file_size_limit=1024 * 1024)
    assert_user_error(code, err, "cannot write the output", "File too large (tokenizer.json)", "free some space")
    assert_nothing_written(tmp_path / "out")


def test_overlong_task_name_is_refused_up_front(family, tmp_path, capsys):
    base, tasks = family
    code, err = run_cli(capsys, base, {"t" * 300: tasks["task0"]}, tmp_path / "out")
    assert_user_error(code, err, "300 characters", "at most 100")
    assert_nothing_written(tmp_path / "out")


def test_task_names_are_ascii_only(family, tmp_path, capsys):
    base, tasks = family
    code, err = run_cli(capsys, base, {"café": tasks["task0"]}, tmp_path / "out")
    assert_user_error(code, err, "'café'", "ASCII letters")
    assert_nothing_written(tmp_path / "out")


def test_index_weight_map_with_a_non_string_value(family, tmp_path, capsys):
    base, tasks = family
    keys = load_file(str(tasks["task2"] / "model.safetensors"))
    weight_map = {k: "model.safetensors" for k in keys} | {next(iter(keys)): 3}
    (tasks["task2"] / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    code, err = run_cli(capsys, base, tasks, tmp_path / "out")
    assert_user_error(code, err, "task2", "model.safetensors.index.json", "to 3")
    assert_nothing_written(tmp_path / "out")


def test_model_equal_to_the_base(family, tmp_path, capsys):
    base, tasks = family
    code, err = run_cli(capsys, base, {**tasks, "task1": base}, tmp_path / "out")
    assert_user_error(code, err, "'task1' is the base itself")
    assert_nothing_written(tmp_path / "out")


def test_base_without_config_json(family, tmp_path, capsys):
    base, tasks = family
    (base / "config.json").unlink()
    code, err = run_cli(capsys, base, tasks, tmp_path / "out")
    assert_user_error(code, err, "no config.json", "would not load")
    assert_nothing_written(tmp_path / "out")


def test_overwrite_onto_a_file_leaves_nothing_aside(family, tmp_path, capsys):
    base, tasks = family
    out = tmp_path / "out"
    out.write_text("an old file")
    code, _ = run_cli(capsys, base, tasks, out, extra=["--overwrite"])
    assert code == 0 and (out / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_temp_folder_of_a_killed_writer_is_removed_on_the_next_run(family, tmp_path, capsys):
    base, tasks = family
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    stale = tmp_path / f".out.tmp-{host}-{dead.pid}-0badc0de"
    live = tmp_path / f".out.tmp-{host}-{os.getppid()}-0000c0de"  # a writer that still runs: left alone
    for folder in (stale, live):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half written")
    code, _ = run_cli(capsys, base, tasks, tmp_path / "out")
    assert code == 0 and not stale.exists() and live.exists()


def test_nan_parameter_is_not_a_finite_number(family, tmp_path, capsys):
    base, tasks = family
    code, err = run_cli(capsys, base, tasks, tmp_path / "out", extra=["--set", "lambda=.nan"])
    assert_user_error(code, err, "'lambda'", "must be a finite number")
    assert "10" not in err
    assert_nothing_written(tmp_path / "out")


def test_duplicate_yaml_key_is_named(family, tmp_path, capsys):
    base, tasks = family
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"base": str(base), "models": {"a": str(tasks["task0"])}, "output": "out"})
                   + "method: ties\nmethod: task_arithmetic\n")
    assert main(["merge", str(job)]) == 2
    assert_user_error(2, capsys.readouterr().err.strip(), "duplicate key 'method'", "give 'method' once")
    assert_nothing_written(tmp_path / "out")
