"""The merge-job service commands on Ray Jobs: submit, status, logs, list, cancel (or stop), resume, supervise."""

from __future__ import annotations

import argparse
import sys

from rankmerge.service.exit_codes import EXIT_JOB_FAILED
from rankmerge.workers.errors import MergeInputError


def _progress_line(record) -> str:
    attempt = record.current
    where = f"attempt {len(record.attempts)} ({attempt.submission_id})" if attempt else "no attempt"
    step = "" if record.last_checkpoint is None else f", checkpoint step {record.last_checkpoint}" + (f"/{record.steps}" if record.steps else "")
    return f"{record.job_id}: {record.status}, {where}{step}"


def _print_progress(record) -> None:
    print(_progress_line(record), flush=True)


def _follow_or_watch(args: argparse.Namespace, record) -> int:
    """Shared by submit and resume: return at once, follow one attempt (--wait), or supervise (--watch)."""
    from rankmerge.service.job_service import follow
    from rankmerge.service.supervise import supervise

    if args.watch:
        record = supervise(record, _print_progress, args.address, args.max_attempts, args.poll)
    elif args.wait:
        record = follow(record, _print_progress, args.poll)
    else:
        print(f"{record.job_id} submitted ({record.current.submission_id}); job directory {record.job_dir}")
        print(f"next: rankmerge status {record.job_id} | rankmerge logs {record.job_id} | rankmerge supervise {record.job_id}")
        return 0
    if record.status == "SUCCEEDED":
        print(f"output: {record.output}")
        return 0
    print(f"{record.job_id} ended {record.status}: {record.current.message if record.current else ''} "
          f"(logs: rankmerge logs {record.job_id})", file=sys.stderr)
    return EXIT_JOB_FAILED


def cmd_submit(args: argparse.Namespace) -> int:
    from rankmerge.service.job_service import submit_job

    if not args.address:
        raise MergeInputError("no Ray dashboard address", "pass --address http://HEAD:8265 or set RAY_API_SERVER_ADDRESS")
    return _follow_or_watch(args, submit_job(args.job, args.address))


def cmd_resume(args: argparse.Namespace) -> int:
    from rankmerge.service.job_index import find_job
    from rankmerge.service.job_service import resume_job

    return _follow_or_watch(args, resume_job(find_job(args.job_ref), args.address))


def cmd_supervise(args: argparse.Namespace) -> int:
    from rankmerge.service.job_index import find_job

    args.watch = True
    return _follow_or_watch(args, find_job(args.job_ref))


def cmd_status(args: argparse.Namespace) -> int:
    from rankmerge.service.job_index import find_job
    from rankmerge.service.job_service import observe_files, refresh
    from rankmerge.service.jobs_client import HeadUnreachable
    from rankmerge.service.registry import update_record

    record = find_job(args.job_ref)
    try:
        record = refresh(record, args.address)
    except HeadUnreachable as exc:  # the registry still knows the job, the job dir its progress: show both
        print(f"warning: {exc}; showing the recorded state (pass --address of a new head to `rankmerge resume`)", file=sys.stderr)
        record = update_record(record.job_dir, observe_files)
    if args.json:
        print(record.model_dump_json(indent=1))
        return 0
    print(_progress_line(record))
    print(f"job directory: {record.job_dir}\nspec: {record.spec_path} (hash {record.spec_hash}); method {record.method}")
    for n, a in enumerate(record.attempts, 1):
        exit_code = "" if a.exit_code is None else f", exit {a.exit_code}"
        print(f"  attempt {n}: {a.submission_id} at {a.address}{' --resume' if a.resume else ''}: {a.status}{exit_code}")
    if record.outputs:
        print("outputs: " + ", ".join(f"{k} {v}" for k, v in record.outputs.items()))
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from rankmerge.service.job_index import find_job
    from rankmerge.service.job_service import attempt_logs

    record = find_job(args.job_ref)
    if args.follow and record.attempts:
        return _follow_logs(record, args.attempt, args.address)
    print(attempt_logs(record, args.attempt, args.address), end="")
    return 0


def _follow_logs(record, which: str | None, address: str | None) -> int:
    """Stream an attempt's driver log until it ends, as `ray job logs --follow` does; exit 0 only if it succeeded."""
    from rankmerge.service.job_service import pick_attempt, refresh
    from rankmerge.service.jobs_client import HeadUnreachable

    attempt = pick_attempt(record, which)
    _stream_or_archive(record, attempt, which, address)
    try:
        record = refresh(record, address)  # records the end and archives the log
    except HeadUnreachable:
        pass  # the head is gone: the recorded status stands
    ended = next(a for a in record.attempts if a.submission_id == attempt.submission_id)
    if ended.status == "SUCCEEDED":
        return 0
    print(f"{record.job_id}: attempt {ended.submission_id} ended {ended.status}"
          f"{f': {ended.message}' if ended.message else ''}", file=sys.stderr)
    return 1


def _stream_or_archive(record, attempt, which: str | None, address: str | None) -> None:
    """The live stream while the head knows the attempt; else (head gone or restarted) its archived log."""
    from rankmerge.service.job_service import attempt_logs
    from rankmerge.service.jobs_client import HeadUnreachable, JobsClient, UnknownSubmission

    streamed = False
    try:
        for chunk in JobsClient(address or attempt.address).tail(attempt.submission_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()
            streamed = True
        return
    except UnknownSubmission:
        pass
    except HeadUnreachable:
        if streamed:
            raise  # the stream broke mid-way: the archive would repeat what was shown
    print(attempt_logs(record, which, address), end="")


def cmd_list(args: argparse.Namespace) -> int:
    from rankmerge.service.job_index import indexed_jobs
    from rankmerge.service.job_service import refresh
    from rankmerge.service.jobs_client import HeadUnreachable

    for record in indexed_jobs():
        try:
            record = refresh(record)
        except HeadUnreachable:
            pass  # the recorded status stands
        print(f"{record.job_id:<32} {record.status:<10} {len(record.attempts)} attempt(s)  {record.job_dir}")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from rankmerge.service.job_index import find_job
    from rankmerge.service.job_service import cancel_job

    record = cancel_job(find_job(args.job_ref), args.address)
    print(_progress_line(record))
    return 0


def add_job_commands(sub: argparse._SubParsersAction) -> None:
    import os

    default_address = os.environ.get("RAY_API_SERVER_ADDRESS")
    address_help = "the Ray head's dashboard, e.g. http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS; for a job: where it last ran)"
    submit = sub.add_parser("submit", help="submit a job spec to a Ray cluster through the Ray Jobs API")
    submit.add_argument("job", help="job spec YAML; its paths must be on storage the cluster sees")
    resume = sub.add_parser("resume", help="a new attempt of a failed, stopped or lost job, from its last checkpoint")
    supervise = sub.add_parser("supervise", help="follow a job and resubmit it (with --resume) whenever its driver dies")
    for cmd in (submit, resume, supervise):
        if cmd is not submit:
            cmd.add_argument("job_ref", metavar="JOB", help="job id (`rankmerge list`) or job directory")
        cmd.add_argument("--address", default=default_address if cmd is submit else None, help=address_help)
        if cmd is not supervise:
            cmd.add_argument("--wait", action="store_true", help="follow the attempt to its end, printing progress")
            cmd.add_argument("--watch", action="store_true", help="follow the job and resubmit it when its driver dies")
        cmd.add_argument("--max-attempts", type=int, default=3, help="attempts in all before a watcher gives up (default 3)")
        cmd.add_argument("--poll", type=float, default=2.0, help="seconds between status polls (default 2)")
    submit.set_defaults(func=cmd_submit)
    resume.set_defaults(func=cmd_resume)
    supervise.set_defaults(func=cmd_supervise)
    for name, func, text in (("status", cmd_status, "a job's status, attempts, last checkpoint and outputs"),
                             ("logs", cmd_logs, "the driver log of a job's latest (or a chosen) attempt"),
                             ("cancel", cmd_cancel, "stop a job's running attempt; no watcher resubmits it"),
                             ("stop", cmd_cancel, "the same as `cancel` (Ray Jobs' name for it)")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("job_ref", metavar="JOB", help="job id (`rankmerge list`) or job directory")
        cmd.add_argument("--address", help=address_help)
        cmd.set_defaults(func=func)
        if name == "status":
            cmd.add_argument("--json", action="store_true", help="print the whole job record")
        if name == "logs":
            cmd.add_argument("--attempt", help="attempt number (1, 2, ...) or submission id; default the latest")
            cmd.add_argument("-f", "--follow", action="store_true", help="stream the log until the attempt ends (exit 0 only if it succeeded)")
    listing = sub.add_parser("list", help="jobs in the index ($RANKMERGE_JOBS, default ~/.rankmerge/jobs)")
    listing.set_defaults(func=cmd_list)
