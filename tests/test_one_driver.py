"""One driver per job and job state that cannot be silently wrong: the driver lease between real processes (a second
driver refused at once, a dead one's lease taken over, a stalled one fenced off), checksummed checkpoint metadata,
pruning after a fall-back, a full disk, a tampered spec copy, a copied record, and `status` without a head."""

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from rankmerge.cluster.checkpoints import load_latest_checkpoint, save_checkpoint
from rankmerge.cluster.lease import DRIVER_LEASE, Holder, LeaseHeld, LeaseLost, current_holder, driver_lease
from conftest import make_adaptive_spec
from rankmerge.service.cli import main
from rankmerge.service.registry import Attempt, claim_job_dir, save_record
from rankmerge.service.spec import job_from_dict, load_job_file
from rankmerge.workers.errors import MergeInputError

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


def one_line_error(code, err, *phrases):
    lines = [line for line in err.strip().splitlines() if line.startswith("error: ")]
    assert code == 2 and len(lines) == 1 and "—" in lines[0], err
    assert "Traceback" not in err, err
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]


def child(code: str, *args: str) -> subprocess.Popen:
    """A real Python process running `code` (it prints `held` once it holds what it was told to take)."""
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    assert proc.stdout.readline().strip() == "held", proc.stderr.read()
    return proc


HOLD = """
import sys, torch
from pathlib import Path
from rankmerge.cluster.lease import Lease
from rankmerge.cluster.checkpoints import save_checkpoint
from rankmerge.workers.errors import MergeInputError
lease = Lease(Path(sys.argv[1]) / "driver.lease", "driver", ttl=float(sys.argv[2])).acquire()
print("held", flush=True)
sys.stdin.readline()  # go: try to commit a checkpoint with this lease
try:
    save_checkpoint(Path(sys.argv[1]), 7, {"x": torch.zeros(2)}, {"spec_hash": "s"}, lease=lease)
    print("committed", flush=True)
except MergeInputError as exc:
    print(type(exc).__name__, exc, flush=True)
"""


# ---- the lease between real processes ------------------------------------------------------------------------------
def test_a_live_holder_is_named_and_a_dead_one_is_replaced_at_once(tmp_path):
    holder = child(HOLD, str(tmp_path), "30")
    started = time.perf_counter()
    with pytest.raises(LeaseHeld, match=rf"held by another driver: pid {holder.pid} on {socket.gethostname()} since "):
        driver_lease(tmp_path).acquire()
    assert time.perf_counter() - started < 1
    holder.kill()
    holder.wait()
    with driver_lease(tmp_path) as lease:  # a dead process on this host: no need to wait for the TTL
        assert current_holder(tmp_path / DRIVER_LEASE).token == lease.token
    assert not (tmp_path / DRIVER_LEASE).exists()


def test_a_lease_from_another_host_expires_with_its_heartbeat(tmp_path):
    other = Holder("t0", "elsewhere", 1, None, time.time() - 100, time.time() - 1, 30.0)
    (tmp_path / DRIVER_LEASE).write_text(other.dump())
    with pytest.raises(LeaseHeld, match="pid 1 on elsewhere since .* — wait for it to end"):
        driver_lease(tmp_path).acquire()
    other.heartbeat = time.time() - 31
    (tmp_path / DRIVER_LEASE).write_text(other.dump())
    with driver_lease(tmp_path) as lease:
        assert current_holder(tmp_path / DRIVER_LEASE).token == lease.token


def test_a_stalled_driver_whose_lease_was_taken_over_never_commits(tmp_path):
    stalled = child(HOLD, str(tmp_path), "1")
    os.kill(stalled.pid, signal.SIGSTOP)  # a driver frozen past its TTL (GC pause, swapped out, partitioned)
    try:
        time.sleep(1.3)
        lease = driver_lease(tmp_path).acquire()
    finally:
        os.kill(stalled.pid, signal.SIGCONT)
    out, _ = stalled.communicate("go\n", timeout=60)
    assert out.startswith("LeaseLost") and "lost its lease" in out, out
    assert not (tmp_path / "checkpoints" / "step_00000007").exists()
    save_checkpoint(tmp_path, 7, {"x": torch.ones(2)}, {"spec_hash": "s"}, lease=lease)  # the new holder commits
    lease.release()
    with pytest.raises(LeaseLost):
        lease.check()


@pytest.fixture(scope="module")
def long_spec(families, tmp_path_factory):
    root = tmp_path_factory.mktemp("drivers")
    data = make_adaptive_spec(families, root, params={"factorization": "ta", "lambda": 0.3}, steps=150, lr=0.01,
                              checkpoint_every=50)
    path = root / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def cli(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rankmerge", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV, **kwargs)


def test_a_second_driver_is_refused_at_once_while_the_first_publishes(long_spec):
    job_dir = long_spec.parent / "out.job"
    first = cli("run", str(long_spec))
    deadline = time.time() + 120
    while not (job_dir / "checkpoints" / "step_00000000").exists() and time.time() < deadline:
        assert first.poll() is None, first.communicate()
        time.sleep(0.05)
    started = time.perf_counter()
    second = cli("run", str(long_spec), "--resume")
    _, err = second.communicate(timeout=120)
    refused_in = time.perf_counter() - started
    one_line_error(second.returncode, err, "held by another driver", f"pid {first.pid} on {socket.gethostname()} since")
    assert first.poll() is None, "the first driver must still be running when the second is refused"
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert (long_spec.parent / "out" / "merge_report.json").is_file() and not (job_dir / DRIVER_LEASE).exists()
    print(f"second driver refused in {refused_in:.1f} s (process start included)")


# ---- checkpoint metadata is checksummed ----------------------------------------------------------------------------
def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


@pytest.mark.parametrize("damage", ["step", "cursor", "bitflip", "state", "latest"])
def test_a_flip_in_any_checkpoint_file_is_detected(tmp_path, damage):
    meta = {"spec_hash": "s", "cursors": [{"epoch": 50, "position": 3}], "history": [{"loss": 0.5}]}
    for step in (200, 300):
        save_checkpoint(tmp_path, step, {"x": torch.full((4,), float(step))}, meta)
    step_dir = tmp_path / "checkpoints" / "step_00000300"
    if damage == "step":
        _edit(step_dir / "meta.json", '"step": 300', '"step": 200')
    elif damage == "cursor":
        _edit(step_dir / "meta.json", '"epoch": 50', '"epoch": 51')
    elif damage == "bitflip":
        data = bytearray((step_dir / "meta.json").read_bytes())
        data[data.index(b'"loss": 0.5') + 9] ^= 0x01  # 0.5 -> 0.4: still valid JSON
        (step_dir / "meta.json").write_bytes(bytes(data))
    elif damage == "state":
        data = bytearray((step_dir / "state.safetensors").read_bytes())
        data[-1] ^= 0x01
        (step_dir / "state.safetensors").write_bytes(bytes(data))
    else:
        (tmp_path / "checkpoints" / "LATEST").write_text("step_00000100\n")  # only a hint: never trusted
    tensors, loaded = load_latest_checkpoint(tmp_path, "s")
    expected = 300 if damage == "latest" else 200
    assert loaded["step"] == expected and torch.equal(tensors["x"], torch.full((4,), float(expected)))
    assert loaded["cursors"] == meta["cursors"] and loaded["history"] == meta["history"]


def test_pruning_after_a_fall_back_keeps_the_new_checkpoints(tmp_path):
    for step in (300, 400, 500):
        save_checkpoint(tmp_path, step, {"x": torch.zeros(2)}, {"spec_hash": "s"}, keep=3)
        (tmp_path / "checkpoints" / f"step_{step:08d}" / "state.safetensors").write_bytes(b"damaged")
    assert load_latest_checkpoint(tmp_path, "s") is None  # every checkpoint damaged: the run starts over
    for step in (0, 50):
        save_checkpoint(tmp_path, step, {"x": torch.full((2,), float(step))}, {"spec_hash": "s"}, keep=3)
        steps = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
        assert steps[-1] == f"step_{step:08d}" and (tmp_path / "checkpoints" / "LATEST").read_text().strip() == steps[-1]
    assert steps == ["step_00000000", "step_00000050"]
    assert load_latest_checkpoint(tmp_path, "s")[1]["step"] == 50


def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_previous(tmp_path):
    save_checkpoint(tmp_path, 2, {"x": torch.zeros(4)}, {"spec_hash": "s"})
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    previous_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, previous_limit[1]))  # the kernel's EFBIG, as a full disk's ENOSPC
    try:
        with pytest.raises(MergeInputError) as caught:
            save_checkpoint(tmp_path, 4, {"x": torch.zeros(1 << 16)}, {"spec_hash": "s"})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, previous_limit)
        signal.signal(signal.SIGXFSZ, previous_handler)
    message = str(caught.value)
    assert "cannot write checkpoint step 4" in message and "previous checkpoint is intact" in message and "--resume" in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["LATEST", "step_00000002"]
    assert load_latest_checkpoint(tmp_path, "s")[1]["step"] == 2


# ---- the record and the spec copy ----------------------------------------------------------------------------------
@pytest.fixture
def submitted(families, tmp_path):
    """A job as `submit` leaves it in its job dir (record + resolved spec copy), without a head."""
    data = make_adaptive_spec(families, tmp_path, params={"factorization": "ta", "lambda": 0.3})
    job = job_from_dict(data, tmp_path)
    record, _ = claim_job_dir(job, "http://127.0.0.1:1")
    return record


def test_a_tampered_spec_copy_is_refused(submitted, tmp_path, capsys):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    copy = load_job_file(submitted.spec_path)
    submitted.spec_path.write_text(yaml.safe_dump(dict(copy, output=str(victim), overwrite=True)))
    assert main(["run", str(submitted.spec_path), "--resume"]) == 2
    one_line_error(2, capsys.readouterr().err, f"does not match the record of job {submitted.job_id}", "output", str(victim))
    assert (victim / "precious.txt").read_text() == "keep me" and not (submitted.job_dir / DRIVER_LEASE).exists()
    submitted.spec_path.write_text(yaml.safe_dump(dict(copy, job_dir=str(tmp_path / "elsewhere.job"))))
    assert main(["run", str(submitted.spec_path), "--resume"]) == 2
    assert "job_dir" in capsys.readouterr().err and not (tmp_path / "elsewhere.job").exists()


def test_a_record_copied_from_another_job_is_refused(submitted, tmp_path, capsys):
    other = tmp_path / "other.job"
    other.mkdir()
    (other / "rankmerge-job.json").write_text((submitted.job_dir / "rankmerge-job.json").read_text())
    for command in (["status", str(other)], ["resume", str(other)]):
        assert main(command) == 2
        one_line_error(2, capsys.readouterr().err, f"belongs to job {submitted.job_id} in {submitted.job_dir}", str(other))


def test_status_without_a_head_reads_the_progress_from_the_job_dir(submitted, capsys):
    submitted.attempts = [Attempt(submission_id="raysubmit_y", address="http://127.0.0.1:1", resume=False,
                                  submitted_at=0.0, status="PENDING")]
    submitted.status = "PENDING"
    save_record(submitted)
    save_checkpoint(submitted.job_dir, 2, {"x": torch.zeros(1)}, {"spec_hash": "s"})
    assert main(["status", str(submitted.job_dir)]) == 0
    out = capsys.readouterr().out
    assert "checkpoint step 2/4" in out, out
    assert json.loads((submitted.job_dir / "rankmerge-job.json").read_text())["last_checkpoint"] == 2
