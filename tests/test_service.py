"""The merge-job service on Ray Jobs against one real head (dashboard, token auth, non-default ports): submit and
follow to SUCCEEDED, logs, cancel, a SIGKILLed driver finished by `resume` and by the watcher with the same result
as an uninterrupted run — plus the registry, spec and auth rules, which need no head."""

import json
import os
import shlex
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import make_adaptive_spec
from ray_head import kill_driver, start_head, stop_head
from rankmerge.service.cli import main
from rankmerge.service.job_index import find_job
from rankmerge.service.job_service import refresh
from rankmerge.service.jobs_client import JobsClient, dashboard_url, driver_command, find_token
from rankmerge.service.registry import Attempt, claim_job_dir, load_record, save_record, spec_copy_text
from rankmerge.service.supervise import should_resubmit, supervise
from rankmerge.service.spec import job_from_dict, load_job_file
from rankmerge.workers.errors import MergeInputError

STEPS = 40  # fast steps: the driver's start (imports, actors) dominates; enough steps to be killed mid-run
RESOURCES = {"shards": 1, "workers": 1}


@pytest.fixture(scope="module")
def spec(families, tmp_path_factory):
    root = tmp_path_factory.mktemp("service")
    data = make_adaptive_spec(families, root, params={"factorization": "ta", "lambda": 0.3}, steps=STEPS, lr=0.01)
    return root, dict(data, resources=RESOURCES)


def write_spec(spec, name, **changes):
    root, data = spec
    path = root / f"{name}.yaml"
    data = dict(data, output=str(root / name))
    for key, value in changes.items():
        data = {**data, "tta": {**data["tta"], key: value}} if key in data["tta"] else {**data, key: value}
    path.write_text(yaml.safe_dump(data))
    return path


# ---- no head needed ------------------------------------------------------------------------------------------------
def test_job_dir_refuses_a_different_job(spec, tmp_path):
    root, data = spec
    first = job_from_dict(dict(data, output=str(tmp_path / "a"), job_dir=str(tmp_path / "shared.job")), root)
    record, created = claim_job_dir(first, "http://h:8265")
    assert created and (tmp_path / "shared.job" / "spec.yaml").is_file()
    assert claim_job_dir(first, "http://h:8265") == (record, False)  # the same job: its record
    other = job_from_dict(dict(data, output=str(tmp_path / "a"), job_dir=str(tmp_path / "shared.job"),
                               tta={**data["tta"], "lr": 0.02}), root)
    with pytest.raises(MergeInputError, match=f"belongs to job {record.job_id}.*own `job_dir:`"):
        claim_job_dir(other, "http://h:8265")
    moved = job_from_dict(dict(data, output=str(tmp_path / "b"), job_dir=str(tmp_path / "shared.job")), root)
    with pytest.raises(MergeInputError, match="belongs to job"):
        claim_job_dir(moved, "http://h:8265")
    assert load_record(tmp_path / "shared.job").spec_hash == first.spec_hash()


def test_spec_copy_is_the_same_job_wherever_it_runs(spec, tmp_path):
    root, data = spec
    job = job_from_dict(dict(data, output="out"), root)
    (tmp_path / "copy.yaml").write_text(spec_copy_text(job))
    again = job_from_dict(load_job_file(tmp_path / "copy.yaml"), tmp_path)  # another folder: paths are absolute
    assert again.spec_hash() == job.spec_hash() and again.resolved_job_dir == job.resolved_job_dir == root / "out.job"


@pytest.mark.parametrize("text,match", [
    ("base: !!python/object/apply:os.system ['true']\n", "not valid YAML"),
    ("runtime_env: {pip: [evil]}\n", "runtime_env"),
    ("entrypoint: rm -rf /\n", "entrypoint"),
    ("params: {class: os.system}\n", "unknown parameter 'class'"),
])
def test_no_spec_field_runs_code(spec, tmp_path, capsys, text, match):
    root, data = spec
    base = {k: v for k, v in data.items() if k != text.split(":")[0]}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(base) + text)
    assert main(["submit", str(tmp_path / "job.yaml"), "--address", "http://127.0.0.1:1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and match in err and len(err.splitlines()) == 1
    assert not (root / "out.job").exists()


def test_driver_command_quotes_paths():
    path = Path("/jobs/a b;rm -rf ~/x.job/spec.yaml")
    words = shlex.split(driver_command(path, resume=True))
    assert words == ["rankmerge", "run", str(path), "--executor", "ray", "--address", "auto", "--resume"]


def test_bad_paths_and_addresses_are_one_line_errors(spec, tmp_path, capsys):
    root, data = spec
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(dict(data, tta={**data["tta"], "data": {**data["tta"]["data"], "task0": "nowhere.safetensors"}})))
    assert main(["submit", str(tmp_path / "job.yaml"), "--address", "http://127.0.0.1:1"]) == 2
    assert "nowhere.safetensors does not exist" in capsys.readouterr().err
    inside = write_spec(spec, "inside", job_dir=data["base"] + "/state")
    assert main(["submit", str(inside), "--address", "http://127.0.0.1:1"]) == 2
    assert "overlaps the base" in capsys.readouterr().err
    assert main(["submit", str(write_spec(spec, "noanswer")), "--address", "http://127.0.0.1:1"]) == 2
    assert "no Ray dashboard answers at http://127.0.0.1:1" in capsys.readouterr().err
    assert dashboard_url("10.0.0.5") == "http://10.0.0.5:8265"
    with pytest.raises(MergeInputError, match="http"):
        dashboard_url("ftp://10.0.0.5:8265")


def test_token_follows_rays_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    assert find_token() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-file\n")
    assert find_token() == "from-file"
    (tmp_path / "t").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "t"))
    assert find_token() == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert find_token() == "from-env"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert find_token() is None
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(MergeInputError, match="RAY_AUTH_TOKEN_PATH"):
        find_token()


# ---- one real head ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def head(tmp_path_factory):
    ray_head = start_head(num_cpus=4, extra_env={"HF_HUB_OFFLINE": "1"})
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RANKMERGE_JOBS")}
    os.environ.pop("RAY_AUTH_TOKEN", None)
    os.environ.update(ray_head.env(), RANKMERGE_JOBS=str(tmp_path_factory.mktemp("index")))
    yield ray_head
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    stop_head(ray_head)
    assert not ray_head.processes(), "the head's processes must be gone"


def results(out: Path):
    masks = load_file(str(out / "adaptive" / "masks.safetensors"))
    lam = load_file(str(out / "adaptive" / "lambda.safetensors"))["lambda"]
    return masks, lam, json.loads((out / "merge_report.json").read_text())


def assert_same_result(out: Path, reference) -> dict:
    masks, lam, report = results(out)
    ref_masks, ref_lam, ref_report = reference
    assert masks.keys() == ref_masks.keys() and masks
    assert all(torch.equal(masks[k], ref_masks[k]) for k in masks)
    assert torch.equal(lam, ref_lam)
    assert report["history"] == ref_report["history"]
    return report


def job_id_of(spec_path: Path) -> str:
    return load_record(Path(str(spec_path).removesuffix(".yaml") + ".job")).job_id


@pytest.fixture(scope="module")
def reference(head, spec):
    """Submit, follow to SUCCEEDED: the uninterrupted run every interrupted one must reproduce."""
    path = write_spec(spec, "reference")
    start = time.perf_counter()
    assert main(["submit", str(path), "--address", head.dashboard, "--wait", "--poll", "0.5"]) == 0
    record = find_job(job_id_of(path))
    assert record.status == "SUCCEEDED" and len(record.attempts) == 1 and record.attempts[0].exit_code == 0
    assert [e.status for e in record.history][-1] == "SUCCEEDED" and "RUNNING" in [e.status for e in record.history]
    assert record.last_checkpoint == STEPS and record.outputs["output"] == str(spec[0] / "reference")
    print(f"submit --wait to SUCCEEDED: {time.perf_counter() - start:.1f} s")
    return record, results(spec[0] / "reference")


@pytest.mark.slow
def test_submit_follows_to_succeeded_and_keeps_logs(head, reference, capsys):
    record, (masks, _, report) = reference
    assert report["steps"] == STEPS and report["executor"] == "ray" and masks
    assert main(["logs", record.job_id]) == 0
    assert f"output: {record.output}" in capsys.readouterr().out
    assert (record.job_dir / "logs" / f"{record.attempts[0].submission_id}.log").is_file()  # survives the head
    assert main(["status", record.job_id]) == 0 and "SUCCEEDED" in capsys.readouterr().out
    assert main(["list"]) == 0 and record.job_id in capsys.readouterr().out
    assert main(["resume", record.job_id]) == 2 and "already succeeded" in capsys.readouterr().err


@pytest.mark.slow
def test_wrong_or_missing_token_is_refused(head, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    monkeypatch.delenv("RAY_AUTH_MODE")
    with pytest.raises(MergeInputError, match="requires an auth token — set RAY_AUTH_MODE=token"):
        JobsClient(head.dashboard)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    with pytest.raises(MergeInputError, match="rejected the auth token"):
        JobsClient(head.dashboard)


@pytest.mark.slow
def test_cancel_stops_a_running_job_and_no_watcher_resubmits_it(head, spec, capsys):
    path = write_spec(spec, "cancelled", steps=100000, checkpoint_every=50)
    assert main(["submit", str(path), "--address", head.dashboard]) == 0
    job_id = job_id_of(path)
    deadline = time.time() + 120
    while find_job(job_id).last_checkpoint is None and time.time() < deadline:  # running: step 0 checkpoint written
        main(["status", job_id])
        time.sleep(0.5)
    assert main(["cancel", job_id]) == 0
    deadline = time.time() + 60
    while (record := find_job(job_id)).current.active and time.time() < deadline:
        main(["status", job_id])
        time.sleep(0.5)
    assert record.status == "STOPPED" and record.cancel_requested and record.current.status == "STOPPED"
    assert main(["supervise", job_id, "--poll", "0.2"]) == 1 and len(find_job(job_id).attempts) == 1
    assert not (spec[0] / "cancelled").exists()
    capsys.readouterr()


def kill_after_checkpoint(path: Path, step: int = 4) -> None:
    """SIGKILL the driver of the job started from `path` once its checkpoint `step` exists, before it publishes."""
    job_dir = Path(str(path).removesuffix(".yaml") + ".job")
    deadline = time.time() + 150
    while not (job_dir / "checkpoints" / f"step_{step:08d}").exists() and time.time() < deadline:
        time.sleep(0.01)
    assert kill_driver(job_dir / "spec.yaml", deadline) >= 1
    assert not Path(str(path).removesuffix(".yaml")).exists(), "the job ended before it could be killed"


@pytest.mark.slow
def test_killed_driver_is_finished_by_resume_with_the_same_result(head, spec, reference):
    path = write_spec(spec, "resumed")
    assert main(["submit", str(path), "--address", head.dashboard]) == 0
    kill_after_checkpoint(path)
    job_id = job_id_of(path)
    assert main(["status", job_id]) == 0
    deadline = time.time() + 60
    while find_job(job_id).current.active and time.time() < deadline:
        main(["status", job_id])
        time.sleep(0.3)
    died = find_job(job_id)
    assert died.status == "FAILED" and died.current.exit_code != 2
    assert main(["resume", job_id, "--wait", "--poll", "0.5"]) == 0
    record = find_job(job_id)
    assert [a.resume for a in record.attempts] == [False, True] and record.status == "SUCCEEDED"
    report = assert_same_result(spec[0] / "resumed", reference[1])
    assert report["resumed_from_step"] >= 4


@pytest.mark.slow
def test_watcher_resubmits_a_killed_driver_with_the_same_result(head, spec, reference):
    path = write_spec(spec, "watched")
    codes = []
    watcher = threading.Thread(target=lambda: codes.append(
        main(["submit", str(path), "--address", head.dashboard, "--watch", "--poll", "0.3"])))
    watcher.start()
    kill_after_checkpoint(path)
    watcher.join(timeout=240)
    assert codes == [0]
    record = find_job(job_id_of(path))
    assert len(record.attempts) == 2 and record.attempts[0].status == "FAILED" and record.attempts[1].resume
    assert assert_same_result(spec[0] / "watched", reference[1])["resumed_from_step"] >= 4


def test_watcher_policy_and_an_unreachable_head(spec, tmp_path):
    root, data = spec
    record, _ = claim_job_dir(job_from_dict(dict(data, output=str(tmp_path / "w")), root), "http://127.0.0.1:1")

    def ended(status, code):
        return Attempt(submission_id="s", address="http://127.0.0.1:1", resume=False, submitted_at=0.0, status=status, exit_code=code)

    record.attempts, record.status = [ended("FAILED", -9)], "FAILED"
    assert should_resubmit(record, max_attempts=3)  # a killed driver
    record.attempts = [ended("FAILED", 2)]
    assert not should_resubmit(record, 3)  # a user error fails the same way again
    record.attempts, record.status = [ended("LOST", None)], "LOST"
    assert should_resubmit(record, 3) and not should_resubmit(record.model_copy(update={"cancel_requested": True}), 3)
    assert not should_resubmit(record.model_copy(update={"attempts": [ended("FAILED", 1)] * 3}), 3)
    record.attempts, record.status = [ended("RUNNING", None)], "RUNNING"
    save_record(record)
    with pytest.raises(MergeInputError, match="no Ray dashboard answers"):
        supervise(record, lambda r: None, poll=0.01, unreachable_timeout=0.05)


@pytest.mark.slow
def test_an_attempt_the_head_forgot_is_lost_and_resubmittable(head, spec, tmp_path):
    """What a replaced head looks like from the registry: it does not know the attempt; the job is not lost."""
    root, data = spec
    record, _ = claim_job_dir(job_from_dict(dict(data, output=str(tmp_path / "orphan")), root), head.dashboard)
    record.attempts = [Attempt(submission_id="raysubmit_fromtheoldhead", address="http://127.0.0.1:1", resume=False,
                               submitted_at=time.time(), status="RUNNING")]
    save_record(record)
    record = refresh(record, head.dashboard)
    assert record.status == "LOST" and record.current.status == "LOST" and should_resubmit(record, 3)


def test_status_without_a_head_shows_the_recorded_state(spec, tmp_path, capsys):
    root, data = spec
    record, _ = claim_job_dir(job_from_dict(dict(data, output=str(tmp_path / "headless")), root), "http://127.0.0.1:1")
    record.attempts = [Attempt(submission_id="raysubmit_x", address="http://127.0.0.1:1", resume=False, submitted_at=0.0, status="RUNNING")]
    record.status = "RUNNING"
    save_record(record)
    assert main(["status", str(record.job_dir)]) == 0
    captured = capsys.readouterr()
    assert "no Ray dashboard answers" in captured.err and "RUNNING, attempt 1 (raysubmit_x)" in captured.out


@pytest.mark.slow
def test_two_watchers_and_a_killed_driver_end_succeeded_with_truthful_attempts(head, spec, reference):
    """The second watcher is refused at once; the first resubmits once; a stale view can neither start another
    attempt nor write an old attempt's outcome onto the new one."""
    import subprocess
    import sys

    from rankmerge.service.job_service import AttemptStarted, start_attempt

    path = write_spec(spec, "two_watchers")
    assert main(["submit", str(path), "--address", head.dashboard]) == 0
    job_id = job_id_of(path)
    stale = find_job(job_id)  # attempt 1, running: what a slow watcher still believes later
    codes = []
    first = threading.Thread(target=lambda: codes.append(main(["supervise", job_id, "--poll", "0.3"])))
    first.start()
    deadline = time.time() + 30
    while not (stale.job_dir / "watcher.lease").exists() and time.time() < deadline:
        time.sleep(0.05)
    started = time.perf_counter()
    second = subprocess.run([sys.executable, "-m", "rankmerge", "supervise", job_id], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, timeout=120)
    refused_in = time.perf_counter() - started
    errors = [line for line in second.stderr.splitlines() if line.startswith("error: ")]
    assert second.returncode == 2 and len(errors) == 1 and "held by another watcher" in errors[0], second.stderr
    kill_after_checkpoint(path)
    first.join(timeout=240)
    assert codes == [0]
    record = find_job(job_id)
    assert record.status == "SUCCEEDED" and [a.status for a in record.attempts] == ["FAILED", "SUCCEEDED"]
    assert record.attempts[1].exit_code == 0 and record.attempts[1].resume and record.attempts[0].exit_code != 0
    assert all((record.job_dir / "logs" / f"{a.submission_id}.log").is_file() for a in record.attempts)
    client = JobsClient(head.dashboard)
    ended = stale.model_copy(deep=True)
    ended.attempts[0].status = "FAILED"
    with pytest.raises(AttemptStarted):
        start_attempt(ended, client, resume=True)  # a racing watcher: at most one resubmission
    again = refresh(stale, head.dashboard)  # Ray's answer about attempt 1 lands on attempt 1 only
    assert again.status == "SUCCEEDED" and [a.status for a in again.attempts] == ["FAILED", "SUCCEEDED"]
    assert again.attempts[1].message == record.attempts[1].message and len(again.attempts) == 2
    assert_same_result(spec[0] / "two_watchers", reference[1])
    print(f"second watcher refused in {refused_in:.1f} s")
