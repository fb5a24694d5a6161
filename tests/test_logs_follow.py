"""Ray Jobs habits against one real head: `rankmerge logs JOB --follow` streams the driver log until the attempt ends
(exit 0 only when it succeeded), and `rankmerge stop` is `cancel`."""

import time

import pytest

from rankmerge.service.cli import build_parser, main
from rankmerge.service.job_index import find_job
from rankmerge.service.registry import Attempt, claim_job_dir, log_path, save_record
from rankmerge.service.spec import job_from_dict
from test_service import head, job_id_of, spec, write_spec  # noqa: F401 (head and spec are fixtures)


def wait_running(job_id: str, timeout: float = 120) -> None:
    """Until the driver has written its step-0 checkpoint (it runs)."""
    deadline = time.time() + timeout
    while find_job(job_id).last_checkpoint is None and time.time() < deadline:
        main(["status", job_id])
        time.sleep(0.5)


def test_stop_and_follow_are_on_the_parser():
    parser = build_parser()
    assert parser.parse_args(["stop", "j1"]).func is parser.parse_args(["cancel", "j1"]).func
    assert parser.parse_args(["logs", "j1", "-f"]).follow and parser.parse_args(["logs", "j1", "--follow"]).follow


@pytest.mark.parametrize("status, code", [("SUCCEEDED", 0), ("FAILED", 1)])
def test_follow_without_a_head_prints_the_archived_log(spec, tmp_path, capsys, status, code):
    """The head that ran the attempt is gone: the archived log, and the exit status of the recorded end."""
    root, data = spec
    record, _ = claim_job_dir(job_from_dict(dict(data, output=str(tmp_path / "gone")), root), "http://127.0.0.1:1")
    record.attempts = [Attempt(submission_id="raysubmit_y", address="http://127.0.0.1:1", resume=False, submitted_at=0.0,
                               status=status)]
    record.status = status
    save_record(record)
    archived = log_path(record.job_dir, "raysubmit_y")
    archived.parent.mkdir(exist_ok=True)
    archived.write_text("step 1\noutput: somewhere\n")
    assert main(["logs", str(record.job_dir), "--follow"]) == code
    captured = capsys.readouterr()
    assert captured.out == "step 1\noutput: somewhere\n"
    assert (f"ended {status}" in captured.err) == (code == 1)


@pytest.mark.slow
def test_follow_streams_until_the_job_succeeds(head, spec, capsys):
    path = write_spec(spec, "followed")
    assert main(["submit", str(path), "--address", head.dashboard]) == 0
    job_id = job_id_of(path)
    capsys.readouterr()
    assert find_job(job_id).status != "SUCCEEDED"
    assert main(["logs", job_id, "--follow"]) == 0
    streamed = capsys.readouterr().out
    record = find_job(job_id)
    assert record.status == "SUCCEEDED"
    assert f"output: {record.output}" in streamed  # the driver's last line: the stream ran to the end
    assert main(["logs", job_id, "--follow"]) == 0 and capsys.readouterr().out == streamed  # a finished attempt: its log


@pytest.mark.slow
def test_stop_ends_a_followed_job_and_follow_says_how(head, spec, capsys):
    path = write_spec(spec, "stopped", steps=100000, checkpoint_every=50)
    assert main(["submit", str(path), "--address", head.dashboard]) == 0
    job_id = job_id_of(path)
    wait_running(job_id)
    assert main(["stop", job_id]) == 0
    assert main(["logs", job_id, "--follow"]) == 1
    err = capsys.readouterr().err
    assert f"{job_id}: attempt" in err and "ended STOPPED" in err
    record = find_job(job_id)
    assert record.status == "STOPPED" and record.cancel_requested
