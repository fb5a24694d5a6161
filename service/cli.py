"""`rankmerge` command line. User mistakes print one line (`error: problem — fix`) and exit 2."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml

from workers.errors import MergeInputError

EXIT_USER_ERROR = 2


def _key_value(text: str, flag: str) -> tuple[str, str]:
    if "=" not in text:
        raise MergeInputError(f"{flag} {text!r} is not KEY=VALUE", f"write it as {flag} name=value")
    key, value = text.split("=", 1)
    if not key:
        raise MergeInputError(f"{flag} {text!r} has an empty name", f"write it as {flag} name=value")
    return key, value


def job_data_from_args(args: argparse.Namespace) -> tuple[dict[str, Any], Path]:
    """Build the job dict from a YAML file and/or flags; flags win over the file."""
    from service.spec import load_job_file

    if args.job:
        data, root = load_job_file(args.job), Path(args.job).resolve().parent
    else:
        data, root = {}, Path.cwd()
        missing = [f for f, v in (("--base", args.base), ("--model", args.model), ("--method", args.method), ("--out", args.out)) if not v]
        if missing:
            raise MergeInputError(f"missing {', '.join(missing)}", "give a job.yaml or all of --base, --model, --method, --out")
    if args.base:
        data["base"] = args.base
    if args.model:
        models: dict[str, str] = {}
        for item in args.model:
            name, path = _key_value(item, "--model")
            if name in models:
                raise MergeInputError(f"duplicate task name {name!r}", "give every --model a unique NAME")
            models[name] = path
        data["models"] = models
    if args.method:
        data["method"] = args.method
    if args.out:
        data["output"] = args.out
    params = dict(data.get("params") or {})
    for item in args.set or []:
        key, value = _key_value(item, "--set")
        params[key] = yaml.safe_load(value)
    data["params"] = params
    for flag in ("overwrite", "allow_pickle"):
        if getattr(args, flag):
            data[flag] = True
    if args.out_dtype:
        data["out_dtype"] = args.out_dtype
    if args.max_shard_size:
        data["max_shard_size"] = args.max_shard_size
    return data, root


def cmd_merge(args: argparse.Namespace) -> int:
    from service.merge_job import run_merge_job, summarize_report
    from service.spec import job_from_dict

    data, root = job_data_from_args(args)
    job = job_from_dict(data, root)
    result = run_merge_job(job, dry_run=args.dry_run)
    if isinstance(result, str):
        print(result)
    else:
        print(summarize_report(result))
        print(f"output: {job.output} (report: {job.output / 'merge_report.json'})")
    return 0


def format_accuracy(table: dict) -> str:
    columns = list(next(iter(table.values())))
    lines = [f"{'task':<16}" + "".join(f"{c:>12}" for c in columns)]
    lines += [f"{task:<16}" + "".join(f"{100 * row[c]:>11.1f}%" for c in columns) for task, row in table.items()]
    return "\n".join(lines)


def cmd_run(args: argparse.Namespace) -> int:
    from service.merge_job import run_merge_job, summarize_report
    from service.spec import job_from_dict, load_job_file
    from service.tta_job import run_adaptive_job

    data = load_job_file(args.job)
    if args.overwrite:
        data["overwrite"] = True
    job = job_from_dict(data, Path(args.job).resolve().parent)
    if not job.adaptive and args.executor == "ray":
        from service.merge_job import run_merge_job_on_ray

        print(summarize_report(run_merge_job_on_ray(job, args.address)))
        return 0
    if not job.adaptive:
        print(summarize_report(run_merge_job(job)))
        return 0
    report = run_adaptive_job(job, resume=args.resume, executor=args.executor, address=args.address)
    history = report["history"]
    if history:
        print(f"{job.method}: {len(history)} steps this run, loss {history[0]['loss']:.4f} -> {history[-1]['loss']:.4f}")
    if report.get("accuracy"):
        print(format_accuracy(report["accuracy"]))
    print(f"output: {job.output} (report: {job.output / 'merge_report.json'}; checkpoints: {job.resolved_job_dir})")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from service.spec import job_from_dict, load_job_file
    from service.tta_job import evaluate_output

    root = Path(args.job).resolve().parent
    job = job_from_dict(load_job_file(args.job), root)
    data: dict[str, Path] = dict(job.tta.data) if job.tta else {}
    for item in args.data or []:
        name, path = _key_value(item, "--data")
        data[name] = Path(path).resolve()
    table = evaluate_output(job, data, max_length=job.tta.max_length if job.tta else 128)
    if not table:
        raise MergeInputError("none of the evaluation data has labels", "add a labels tensor (or label fields) to the data")
    print(format_accuracy(table))
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from service.spec import MergeJob
    from workers.methods.registry import method_class
    from workers.tta.params import ADAPTIVE_METHODS

    if args.method in ADAPTIVE_METHODS:
        schema = ADAPTIVE_METHODS[args.method].model_json_schema(by_alias=True)
    elif args.method:
        schema = method_class(args.method).Params.model_json_schema(by_alias=True)
    else:
        schema = MergeJob.model_json_schema()
    print(json.dumps(schema, indent=2))
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from workers.methods.registry import METHODS

    for name, cls in METHODS.items():
        params = ", ".join(f"{f.alias or n}={f.default}" for n, f in cls.Params.model_fields.items())
        print(f"{name:<16} {cls.summary}\n{'':<16} defaults: {params or '-'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from service.demo import run_demo

    print(run_demo(Path(args.workdir), steps=args.steps, executor=args.executor))
    return 0


def _bench_suite(args: argparse.Namespace):
    from service.bench.layout import open_suite

    return open_suite(args.suite, Path(args.root) if args.root else None, args.seed)


def cmd_bench_build(args: argparse.Namespace) -> int:
    suite = _bench_suite(args)
    print(f"suite {args.suite}: {suite.root} (tasks: {', '.join(suite.task_dirs)})")
    return 0


def cmd_bench_run(args: argparse.Namespace) -> int:
    from service.bench.grid import select_methods, tta_settings
    from service.bench.layout import results_dir
    from service.bench.runner import run_methods

    logging.getLogger("service.bench").setLevel(logging.INFO)  # one line per finished method
    methods = select_methods([m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None, args.suite)
    suite = _bench_suite(args)
    results = results_dir(suite.root, Path(args.out) if args.out else None)
    records = run_methods(args.suite, suite, results, methods, tta_settings(args.suite, args.steps), args.seed, args.threads)
    total = sum(r["wall_seconds"] for r in records)
    print(f"{len(records)} methods in {total:.1f} s; records in {results} (next: rankmerge bench report {args.suite})")
    return 0


def cmd_bench_report(args: argparse.Namespace) -> int:
    from service.bench.layout import results_dir
    from service.bench.report import write_report

    suite = _bench_suite(args)
    written = write_report(args.suite, suite, results_dir(suite.root, Path(args.out) if args.out else None))
    print((written["markdown"]).read_text())
    print(f"tables: {written['markdown']}, {written['json']}; plots: {', '.join(p.name for p in written['plots']) or 'none'}")
    return 0


# ---- the merge-job service on Ray Jobs (submit, status, logs, list, cancel, resume, supervise) ----------------------
def _progress_line(record) -> str:
    attempt = record.current
    where = f"attempt {len(record.attempts)} ({attempt.submission_id})" if attempt else "no attempt"
    step = "" if record.last_checkpoint is None else f", checkpoint step {record.last_checkpoint}" + (f"/{record.steps}" if record.steps else "")
    return f"{record.job_id}: {record.status}, {where}{step}"


def _print_progress(record) -> None:
    print(_progress_line(record), flush=True)


def _follow_or_watch(args: argparse.Namespace, record) -> int:
    """Shared by submit and resume: return at once, follow one attempt (--wait), or supervise (--watch)."""
    from service.job_service import follow
    from service.supervise import supervise

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
    return 1


def cmd_submit(args: argparse.Namespace) -> int:
    from service.job_service import submit_job

    if not args.address:
        raise MergeInputError("no Ray dashboard address", "pass --address http://HEAD:8265 or set RAY_API_SERVER_ADDRESS")
    return _follow_or_watch(args, submit_job(args.job, args.address))


def cmd_resume(args: argparse.Namespace) -> int:
    from service.job_index import find_job
    from service.job_service import resume_job

    return _follow_or_watch(args, resume_job(find_job(args.job_ref), args.address))


def cmd_supervise(args: argparse.Namespace) -> int:
    from service.job_index import find_job

    args.watch = True
    return _follow_or_watch(args, find_job(args.job_ref))


def cmd_status(args: argparse.Namespace) -> int:
    from service.job_index import find_job
    from service.job_service import refresh
    from service.jobs_client import HeadUnreachable

    record = find_job(args.job_ref)
    try:
        record = refresh(record, args.address)
    except HeadUnreachable as exc:  # the registry still knows the job: show what it recorded
        print(f"warning: {exc}; showing the recorded state (pass --address of a new head to `rankmerge resume`)", file=sys.stderr)
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
    from service.job_index import find_job
    from service.job_service import attempt_logs

    print(attempt_logs(find_job(args.job_ref), args.attempt, args.address), end="")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from service.job_index import indexed_jobs
    from service.job_service import refresh
    from service.jobs_client import HeadUnreachable

    for record in indexed_jobs():
        try:
            record = refresh(record)
        except HeadUnreachable:
            pass  # the recorded status stands
        print(f"{record.job_id:<32} {record.status:<10} {len(record.attempts)} attempt(s)  {record.job_dir}")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from service.job_index import find_job
    from service.job_service import cancel_job

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
                             ("cancel", cmd_cancel, "stop a job's running attempt; no watcher resubmits it")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("job_ref", metavar="JOB", help="job id (`rankmerge list`) or job directory")
        cmd.add_argument("--address", help=address_help)
        cmd.set_defaults(func=func)
        if name == "status":
            cmd.add_argument("--json", action="store_true", help="print the whole job record")
        if name == "logs":
            cmd.add_argument("--attempt", help="attempt number (1, 2, ...) or submission id; default the latest")
    listing = sub.add_parser("list", help="jobs in the index ($RANKMERGE_JOBS, default ~/.rankmerge/jobs)")
    listing.set_defaults(func=cmd_list)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rankmerge", description="Merge fine-tuned checkpoints of one base model.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    merge = sub.add_parser("merge", help="run a static merge in-process")
    merge.add_argument("job", nargs="?", help="job spec YAML (flags below override it)")
    merge.add_argument("--base", help="pretrained HF directory")
    merge.add_argument("--model", action="append", metavar="NAME=PATH", help="fine-tuned HF directory (repeat)")
    merge.add_argument("--method", help="merge method (see `rankmerge methods`)")
    merge.add_argument("--set", action="append", metavar="KEY=VALUE", help="method parameter, e.g. lambda=0.3 (repeat)")
    merge.add_argument("--out", help="output directory")
    merge.add_argument("--out-dtype", choices=["float32", "float16", "bfloat16"])
    merge.add_argument("--max-shard-size", help="largest output shard, e.g. 2GB")
    merge.add_argument("--dry-run", action="store_true", help="print the plan and predicted memory; write nothing")
    merge.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    merge.add_argument("--allow-pickle", action="store_true", help="allow .bin/.pt pickle checkpoints (weights_only load)")
    merge.set_defaults(func=cmd_merge)

    run = sub.add_parser("run", help="run a job spec in-process: static, or adaptive (AdaRank/AdaMerging) with checkpoints")
    run.add_argument("job", help="job spec YAML")
    run.add_argument("--resume", action="store_true", help="continue from the job's last intact checkpoint")
    run.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    run.add_argument("--executor", choices=["local", "ray"], default="local",
                     help="local: in this process; ray: shards and workers as Ray actors (spec `resources:` block)")
    run.add_argument("--address", help="Ray cluster address for --executor ray (default: start an embedded local Ray)")
    run.set_defaults(func=cmd_run)

    evaluate = sub.add_parser("eval", help="per-task accuracy of a job's output next to the pretrained and individual models")
    evaluate.add_argument("job", help="the job spec whose output to evaluate")
    evaluate.add_argument("--data", action="append", metavar="NAME=PATH", help="labelled data per task (default: the spec's tta.data)")
    evaluate.set_defaults(func=cmd_eval)

    schema = sub.add_parser("schema", help="print the JSON schema of a job spec, or of one method's parameters")
    schema.add_argument("--method")
    schema.set_defaults(func=cmd_schema)

    methods = sub.add_parser("methods", help="list merge methods and their default parameters")
    methods.set_defaults(func=cmd_methods)

    demo = sub.add_parser("demo", help="build the smoke vision suite, run TA and AdaRank (local Ray), print per-task accuracy")
    demo.add_argument("--workdir", default=".demo")
    demo.add_argument("--steps", type=int, default=100, help="AdaRank adaptation steps")
    demo.add_argument("--executor", choices=["local", "ray"], default="ray")
    demo.set_defaults(func=cmd_demo)
    bench = sub.add_parser("bench", help="benchmark every method on a real-data suite: build it, run it, report tables and plots")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    for name, func, text in (("build", cmd_bench_build, "build (or reuse) a suite"),
                             ("run", cmd_bench_run, "run methods on the suite's test split (static ones chosen on val)"),
                             ("report", cmd_bench_report, "write results/table.md, table.json and PNG plots")):
        cmd = bench_sub.add_parser(name, help=text)
        cmd.add_argument("suite", help="suite name (see service.suites.SUITES), e.g. digits-smoke, digits")
        cmd.add_argument("--root", help="suite folder (default: $RANKMERGE_CACHE/suites/SUITE or ~/.cache/rankmerge/suites/SUITE)")
        cmd.add_argument("--seed", type=int, default=0, help="the suite's build seed (also seeds the held-out split)")
        if name != "build":
            cmd.add_argument("--out", help="results folder (default: SUITE_ROOT/results)")
        if name == "run":
            cmd.add_argument("--methods", help="comma-separated subset, e.g. task_arithmetic,adarank_cart (default: all)")
            cmd.add_argument("--steps", type=int, help="adaptation steps (default: the suite's setting)")
            cmd.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
        cmd.set_defaults(func=func)
    add_job_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except MergeInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted: nothing was published", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
