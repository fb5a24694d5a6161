"""`rankmerge bench build|run|report SUITE`: the real-data benchmark commands (see service/bench/)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path


def _bench_suite(args: argparse.Namespace):
    from rankmerge.service.bench.layout import open_suite

    return open_suite(args.suite, Path(args.root) if args.root else None, args.seed)


def cmd_bench_build(args: argparse.Namespace) -> int:
    suite = _bench_suite(args)
    print(f"suite {args.suite}: {suite.root} (tasks: {', '.join(suite.task_dirs)})")
    return 0


def cmd_bench_run(args: argparse.Namespace) -> int:
    from rankmerge.service.bench.grid import select_methods, tta_settings
    from rankmerge.service.bench.layout import results_dir
    from rankmerge.service.bench.runner import run_methods

    logging.getLogger("rankmerge.service.bench").setLevel(logging.INFO)  # one line per finished method
    methods = select_methods([m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None, args.suite)
    suite = _bench_suite(args)
    results = results_dir(suite.root, Path(args.out) if args.out else None)
    records = run_methods(args.suite, suite, results, methods, tta_settings(args.suite, args.steps), args.seed, args.threads)
    total = sum(r["wall_seconds"] for r in records)
    print(f"{len(records)} methods in {total:.1f} s; records in {results} (next: rankmerge bench report {args.suite})")
    return 0


def cmd_bench_report(args: argparse.Namespace) -> int:
    from rankmerge.service.bench.layout import results_dir
    from rankmerge.service.bench.report import write_report

    suite = _bench_suite(args)
    written = write_report(args.suite, suite, results_dir(suite.root, Path(args.out) if args.out else None))
    print((written["markdown"]).read_text())
    print(f"tables: {written['markdown']}, {written['json']}; plots: {', '.join(p.name for p in written['plots']) or 'none'}")
    return 0


def add_bench_commands(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmark every method on a real-data suite: build it, run it, report tables and plots")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    for name, func, text in (("build", cmd_bench_build, "build (or reuse) a suite"),
                             ("run", cmd_bench_run, "run methods on the suite's test split (static ones chosen on val)"),
                             ("report", cmd_bench_report, "write results/table.md, table.json and PNG plots")):
        cmd = bench_sub.add_parser(name, help=text)
        cmd.add_argument("suite", help="suite name (see rankmerge.service.suites.SUITES), e.g. digits-smoke, digits")
        cmd.add_argument("--root", help="suite folder (default: $RANKMERGE_CACHE/suites/SUITE or ~/.cache/rankmerge/suites/SUITE)")
        cmd.add_argument("--seed", type=int, default=0, help="the suite's build seed (also seeds the held-out split)")
        if name != "build":
            cmd.add_argument("--out", help="results folder (default: SUITE_ROOT/results)")
        if name == "run":
            cmd.add_argument("--methods", help="comma-separated subset, e.g. task_arithmetic,adarank_cart (default: all)")
            cmd.add_argument("--steps", type=int, help="adaptation steps (default: the suite's setting)")
            cmd.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
        cmd.set_defaults(func=func)
