"""`rankmerge` command line. User mistakes print one line (`error: problem — fix`) and exit 2."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import select
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import yaml

from rankmerge.service.cli_bench import add_bench_commands
from rankmerge.service.cli_jobs import add_job_commands
from rankmerge.service.exit_codes import EXIT_INTERRUPTED, EXIT_READER_GONE, EXIT_TERMINATED, EXIT_USER_ERROR
from rankmerge.workers.errors import MergeInputError


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a scheduler, a job being stopped) taken like Ctrl-C, so every cleanup runs: no temp folder
    or half-written output stays behind."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Raise Terminated on SIGTERM while the command runs (signal handlers belong to the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _key_value(text: str, flag: str) -> tuple[str, str]:
    if "=" not in text:
        raise MergeInputError(f"{flag} {text!r} is not KEY=VALUE", f"write it as {flag} name=value")
    key, value = text.split("=", 1)
    if not key:
        raise MergeInputError(f"{flag} {text!r} has an empty name", f"write it as {flag} name=value")
    return key, value


def _from_cwd(path: str) -> str:
    """Path flags are relative to the current directory, whatever spec file they override (its paths are relative
    to its own folder)."""
    return str(Path(path).absolute())


def _model_from_cwd(text: str, flag: str) -> str:
    """A model flag: a folder relative to the current directory, or an `org/name` id from the local HF cache."""
    from rankmerge.service.model_ids import resolve_model_ref

    return _from_cwd(resolve_model_ref(text, Path.cwd(), flag))


def path_origin(field: str, flags: dict[str, str], spec: str | None) -> str:
    """Where the user wrote the path of spec field `field`: the flag that set it, else the spec file."""
    if field in flags:
        return f"{flags[field]} (relative to the current directory)"
    return f"`{field}` in the job spec {spec} (relative to the spec's folder)"


def job_data_from_args(args: argparse.Namespace) -> tuple[dict[str, Any], Path, dict[str, str]]:
    """Build the job dict from a YAML file and/or flags; flags win over the file. Also returns the path fields set
    by flags (field -> the flag as given), so a bad path's message can say where it came from."""
    from rankmerge.service.spec import load_job_file

    flags: dict[str, str] = {}
    if args.job:
        data, root = load_job_file(args.job), Path(args.job).resolve().parent
        data, root, flags = _from_mergekit(data, root, args)
    else:
        data, root = {}, Path.cwd()
        missing = [f for f, v in (("--base", args.base), ("--model", args.model), ("--method", args.method), ("--out", args.out)) if not v]
        if missing:
            raise MergeInputError(f"missing {', '.join(missing)}", "give a job.yaml or all of --base, --model, --method, --out")
    if args.base:
        data["base"], flags["base"] = _model_from_cwd(args.base, f"--base {args.base}"), f"--base {args.base}"
    if args.model:
        models: dict[str, str] = {}
        for item in args.model:
            name, path = _key_value(item, "--model")
            if name in models:
                raise MergeInputError(f"duplicate task name {name!r}", "give every --model a unique NAME")
            models[name], flags[f"models.{name}"] = _model_from_cwd(path, f"--model {item}"), f"--model {item}"
        data["models"] = models
    if args.method:
        data["method"] = args.method
    if args.out:
        data["output"], flags["output"] = _from_cwd(args.out), f"--out {args.out}"
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
    if args.device:
        data["device"] = args.device
    return data, root, flags


def _from_mergekit(data: dict[str, Any], root: Path, args: argparse.Namespace) -> tuple[dict[str, Any], Path, dict[str, str]]:
    """A mergekit config (`merge_method:`) becomes a job; its paths are relative to the current directory, as in
    mergekit (so a missing one is named like a flag's), and its output comes from --out."""
    from rankmerge.service.mergekit_config import is_mergekit_config, job_data_from_mergekit

    if not is_mergekit_config(data):
        return data, root, {}
    if not args.out:
        raise MergeInputError(f"{args.job} is a mergekit config, which names no output", f"add --out DIR: rankmerge merge {args.job} --out DIR")
    job, written = job_data_from_mergekit(data, Path.cwd())
    return job, Path.cwd(), {field: f"`{ref}` in the mergekit config {args.job}" for field, ref in written.items()}


def _refuse_adaptive(method: Any, spec: str | None) -> None:
    """`merge` runs static merges; an adaptive method needs `run` (test-time data, checkpoints)."""
    from rankmerge.workers.tta.params import ADAPTIVE_METHODS

    if method in ADAPTIVE_METHODS:
        raise MergeInputError(f"method {method!r} adapts at test time and is not a static merge",
                              f"run it with `rankmerge run {spec or 'job.yaml'}` (its spec needs a `tta:` block with data per task)")


def cmd_merge(args: argparse.Namespace) -> int:
    gc.disable()  # importing torch and the rest makes ~1M objects and no garbage: collections meanwhile cost ~0.4 s
    from rankmerge.service.merge_job import run_merge_job, summarize_report
    from rankmerge.service.spec import check_inputs_exist, job_from_dict
    gc.freeze()  # they live as long as the process: later collections, the one at exit too, skip them (~1 s less)
    gc.enable()

    data, root, flags = job_data_from_args(args)
    _refuse_adaptive(data.get("method"), args.job)
    job = job_from_dict(data, root)
    check_inputs_exist(job, lambda field: path_origin(field, flags, args.job))
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


def steps_summary(history: list[dict[str, Any]], resumed_from: int | None) -> str:
    """Steps this process ran, and where it picked up: a resumed run's history starts at step 1, not at the resume."""
    done = len(history) - (resumed_from or 0)
    where = f" (resumed at step {resumed_from}; {len(history)} in all)" if resumed_from is not None else ""
    return (f"{done} steps this run{where}, loss {history[0]['loss']:.4f} at step 1 -> "
            f"{history[-1]['loss']:.4f} at step {len(history)}")


def cmd_run(args: argparse.Namespace) -> int:
    from rankmerge.service.merge_job import run_merge_job, summarize_report
    from rankmerge.service.spec import check_inputs_exist, job_from_dict, load_job_file
    from rankmerge.service.tta_job import run_adaptive_job

    if args.resume and args.restart:
        raise MergeInputError("--resume and --restart contradict each other",
                              "pass --resume to continue the last run, or --restart to start over")
    from rankmerge.service.mergekit_config import is_mergekit_config

    data = load_job_file(args.job)
    if is_mergekit_config(data):
        raise MergeInputError(f"{args.job} is a mergekit config", f"merge it with `rankmerge merge {args.job} --out DIR`")
    if args.overwrite:
        data["overwrite"] = True
    if args.device:
        data["device"] = args.device
    job = job_from_dict(data, Path(args.job).resolve().parent)
    check_inputs_exist(job, lambda field: path_origin(field, {}, args.job))
    _check_spec_copy(Path(args.job), job)
    if args.dry_run:
        from rankmerge.service.tta_job import dry_run_adaptive_job

        print(dry_run_adaptive_job(job) if job.adaptive else run_merge_job(job, dry_run=True))
        return 0
    if not job.adaptive and args.executor == "ray":
        from rankmerge.service.merge_job import run_merge_job_on_ray

        print(summarize_report(run_merge_job_on_ray(job, args.address)))
        return 0
    if not job.adaptive:
        print(summarize_report(run_merge_job(job)))
        return 0
    report = run_adaptive_job(job, resume=args.resume, executor=args.executor, address=args.address,
                              restart=args.restart, strict=args.strict)
    if report["history"]:
        print(f"{job.method} on {report['device']}: {steps_summary(report['history'], report.get('resumed_from_step'))}")
    if report.get("guard"):
        print(format_guard(report))
    if report.get("accuracy"):
        print(format_accuracy(report["accuracy"]))
    print(f"output: {job.output} (report: {job.output / 'merge_report.json'}; checkpoints: {job.resolved_job_dir})")
    return 0


def _check_spec_copy(spec: Path, job: Any) -> None:
    """A spec run from inside a job directory (its spec copy) must be the job its record names, wherever it points."""
    from rankmerge.service.registry import RECORD, check_against_record

    folder = spec.resolve().parent
    if (folder / RECORD).is_file():
        check_against_record(job, folder)


def format_guard(report: dict) -> str:
    """One line: the label-free guard's agreement at step 0, at the last step, and the step that was published."""
    guard = report["guard"]
    start, last = guard["curve"][0], guard["curve"][-1]
    line = (f"guard (held-out agreement with the task models, no labels): step 0 {start['score']:.4f}, "
            f"step {last['step']} {last['score']:.4f}; published step {report['published_step']}")
    return line + (f"\nwarning: {guard['degraded']}" if guard["degraded"] else "")


def cmd_eval(args: argparse.Namespace) -> int:
    from rankmerge.service.spec import job_from_dict, load_job_file
    from rankmerge.service.model_ids import resolve_model_ref
    from rankmerge.service.tta_job import evaluate_output

    root = Path(args.job).resolve().parent
    job = job_from_dict(load_job_file(args.job), root)
    data: dict[str, Path] = dict(job.tta.data) if job.tta else {}
    for item in args.data or []:
        name, path = _key_value(item, "--data")
        data[name] = Path(resolve_model_ref(path, Path.cwd(), f"--data {name}", "dataset")).resolve()  # or a cached dataset id
    table = evaluate_output(job, data, max_length=job.tta.max_length if job.tta else 128)
    if not table:
        raise MergeInputError("none of the evaluation data has labels", "add a labels tensor (or label fields) to the data")
    print(format_accuracy(table))
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from rankmerge.service.spec import MergeJob
    from rankmerge.workers.methods.registry import method_class
    from rankmerge.workers.tta.params import ADAPTIVE_METHODS

    if args.method in ADAPTIVE_METHODS:
        schema = ADAPTIVE_METHODS[args.method].model_json_schema(by_alias=True)
    elif args.method:
        schema = method_class(args.method).Params.model_json_schema(by_alias=True)
    else:
        schema = MergeJob.model_json_schema()
    print(json.dumps(schema, indent=2))
    return 0


def _method_entry(name: str, summary: str, params: type) -> str:
    defaults = ", ".join(f"{f.alias or n}={f.default}" for n, f in params.model_fields.items())
    return f"{name:<16} {summary}\n{'':<16} defaults: {defaults or '-'}"


def cmd_methods(args: argparse.Namespace) -> int:
    from rankmerge.workers.methods.registry import METHODS
    from rankmerge.workers.tta.params import ADAPTIVE_METHODS

    for name, cls in METHODS.items():
        print(_method_entry(name, cls.summary, cls.Params))
    for name, params in ADAPTIVE_METHODS.items():
        doc = (params.__doc__ or name).strip().splitlines()[0]
        print(_method_entry(name, f"[adaptive: `rankmerge run`, needs a `tta:` block] {doc}", params))
    return 0


def cmd_export_task(args: argparse.Namespace) -> int:
    import torch

    from rankmerge.service.task_model import export_task_model

    dtype = getattr(torch, args.dtype) if args.dtype else None
    out = export_task_model(Path(args.output), args.task, Path(args.out), args.overwrite, dtype)
    print(f"task {args.task}: {out} (load it with AutoModelFor….from_pretrained)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from rankmerge.service.demo import run_demo

    print(run_demo(Path(args.workdir), steps=args.steps, executor=args.executor))
    return 0


VERBOSE_HELP = "log progress details"
DEVICE_FLAG_HELP = "where the tensor math runs: auto (the GPU when one is visible), cpu, cuda or cuda:N (overrides the spec's `device`)"


def _accept_verbose_everywhere(parser: argparse.ArgumentParser) -> None:
    """`-v` after any (sub)command as well as before it; SUPPRESS keeps a subcommand from resetting a leading -v."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
                _accept_verbose_everywhere(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rankmerge", description="Merge fine-tuned checkpoints of one base model.")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", required=True)

    merge = sub.add_parser("merge", help="run a static merge in-process")
    merge.add_argument("job", nargs="?", help="job spec YAML, or a mergekit config (linear, task_arithmetic); flags below override it")
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
    merge.add_argument("--device", help=DEVICE_FLAG_HELP)
    merge.set_defaults(func=cmd_merge)

    run = sub.add_parser("run", help="run a job spec in-process: static, or adaptive (AdaRank/AdaMerging) with checkpoints")
    run.add_argument("job", help="job spec YAML")
    run.add_argument("--resume", action="store_true", help="continue from the job's last intact checkpoint")
    run.add_argument("--strict", action="store_true",
                     help="adaptive jobs: fail (exit 2, nothing published) when the last step is worse than step 0 by the label-free guard")
    run.add_argument("--restart", action="store_true",
                     help="start over: remove the job's checkpoints (with --overwrite, replace a published output too)")
    run.add_argument("--dry-run", action="store_true",
                     help="check everything and predict wall time and peak memory (in-process executor) from a measured sample; write nothing")
    run.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    run.add_argument("--executor", choices=["local", "ray"], default="local",
                     help="local: in this process; ray: shards and workers as Ray actors (spec `resources:` block)")
    run.add_argument("--address", help="Ray cluster address for --executor ray (default: start an embedded local Ray)")
    run.add_argument("--device", help=DEVICE_FLAG_HELP)
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

    export = sub.add_parser("export-task", help="write one task of a merged output as a plain HF folder (its labels, its head)")
    export.add_argument("output", metavar="OUT", help="a merged output folder")
    export.add_argument("task", metavar="TASK", help="task name (as in the merge's models)")
    export.add_argument("--out", required=True, help="folder to write")
    export.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default: the merged weights' dtype")
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    export.set_defaults(func=cmd_export_task)

    demo = sub.add_parser("demo", help="build the smoke vision suite, run TA and AdaRank (local Ray), print per-task accuracy")
    demo.add_argument("--workdir", default=".demo")
    demo.add_argument("--steps", type=int, default=100, help="AdaRank adaptation steps")
    demo.add_argument("--executor", choices=["local", "ray"], default="ray")
    demo.set_defaults(func=cmd_demo)
    add_bench_commands(sub)
    add_job_commands(sub)
    _accept_verbose_everywhere(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("rankmerge.workers.progress").setLevel(logging.INFO)  # periodic progress lines when stderr is not a terminal
    try:
        with sigterm_as_interrupt():
            return args.func(args)
    except MergeInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as exc:
        print(f"{'terminated' if isinstance(exc, Terminated) else 'interrupted'}: nothing was published", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED
    except BrokenPipeError:
        if not _stdout_reader_gone():
            raise  # another pipe or socket broke (e.g. a cluster connection): a real failure
        return _reader_went_away()


def _stdout_reader_gone() -> bool:
    """True when stdout is a pipe whose reading end is closed (poll reports an error on the writing end)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(event & select.POLLERR for _, event in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll on this platform, or stdout is not a file
        return False


def _reader_went_away() -> int:
    """The reader of stdout closed it (`rankmerge schema | head`): nothing is wrong, so no traceback. Point stdout at
    /dev/null so the interpreter's last flush cannot fail again; exit as a process killed by SIGPIPE does."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_READER_GONE


if __name__ == "__main__":
    sys.exit(main())
