"""Tables (markdown + JSON) and plots from a results folder's method records.

Two tables, rows grouped like the AdaRank paper's Table 1 (reference, data-free, test-time adaptation), columns =
tasks + average: (1) the test split, adaptive methods adapted transductively on its unlabeled inputs; (2) the held-out
protocol, every method scored on the seeded report half, adaptive methods adapted on the other half.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from rankmerge.service.bench.grid import BY_NAME, GROUPS
from rankmerge.service.bench.layout import read_records, write_json
from rankmerge.service.bench.plots import plot_masks, plot_ranks
from rankmerge.service.bench.spectra import intrinsic_ranks
from rankmerge.service.suites import Suite
from rankmerge.workers.errors import MergeInputError

log = logging.getLogger(__name__)

TABLES = {
    "test": "Test split (adaptive methods: transductive, adapted on the unlabeled test inputs)",
    "heldout": "Held-out protocol (adaptive methods adapted on one seeded half of each task's test inputs; "
               "every method scored on the other half)",
}


def _order(records: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Table order: the grid's method order, unknown methods last."""
    known = [records[m] for m in BY_NAME if m in records]
    return known + [r for name, r in records.items() if name not in BY_NAME]


def _setting(record: dict[str, Any], table: str) -> str:
    params = record.get("params") or {}
    text = ", ".join(f"{k}={v}" for k, v in params.items())
    if record["kind"] == "static":
        seeds = f"; mean of seeds {', '.join(record['seed_runs'])}" if record.get("seed_runs") else ""
        return f"{text} (val){seeds}" if text else "-"
    if record["kind"] == "adaptive":
        tta = record["tta"]
        start = record.get("initial")
        step0 = f"; step 0: {100 * start['accuracy'][table]['average']:.1f}" if start else ""
        run = next((p for p in record.get("protocols", {}).values() if p.get("report_on") == table), {})
        published = f"; {run['objective']}, published step {run['published_step']}" if "objective" in run else ""
        return f"{text}; {tta['steps']} steps, lr {tta['lr']:g}, batch {tta['batch_size']}{published}{step0}"
    return "-"


def build_tables(records: dict[str, dict[str, Any]]) -> tuple[list[str], dict[str, list[dict[str, Any]]]]:
    """(tasks, {table: rows}); a row = method, label, group, accuracy per task + average, setting, wall time."""
    ordered = _order(records)
    tasks = [t for t in ordered[0]["accuracy"]["test"] if t != "average"]
    tables = {}
    for table in TABLES:
        tables[table] = [{"method": r["method"], "label": r["label"], "group": r["group"], "kind": r["kind"],
                          "accuracy": r["accuracy"][table], "step0_accuracy": r["initial"]["accuracy"][table] if "initial" in r else None,
                          "setting": _setting(r, table), "params": r.get("params"),
                          "wall_seconds": r["wall_seconds"]} for r in ordered]
    return tasks, tables


def markdown_table(tasks: list[str], rows: list[dict[str, Any]], wall: bool = True) -> str:
    """Accuracy in %, one italic row per group; `wall` adds each method's whole wall time (grid, both protocols)."""
    header = ["method", *tasks, "**avg**", "setting"] + (["wall s"] if wall else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(tasks) + 1) + ["---"] + (["---:"] if wall else [])) + "|"]
    groups = [g for g in GROUPS if any(r["group"] == g for r in rows)] + sorted({r["group"] for r in rows} - set(GROUPS))
    for group in groups:
        lines.append(f"| *{group}* |" + " |" * (len(header) - 1))
        for r in (r for r in rows if r["group"] == group):
            acc = r["accuracy"]
            cells = [r["label"], *(f"{100 * acc[t]:.1f}" for t in tasks), f"**{100 * acc['average']:.1f}**",
                     r["setting"]] + ([f"{r['wall_seconds']:.1f}"] if wall else [])
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _adarank_runs(records: dict[str, dict[str, Any]], results: Path) -> list[tuple[dict[str, Any], Path, dict[str, Any]]]:
    """(record, transductive output folder, its merge report) of every AdaRank record."""
    runs = []
    for record in _order(records):
        if record.get("job_method") == "adarank":
            output = results / record["protocols"]["transductive"]["output"]
            runs.append((record, output, json.loads((output / "merge_report.json").read_text())))
    return runs


def _has_shared_row(report: dict[str, Any], tasks: list[str]) -> bool:
    """Whether some components belong to no single task (learned ranks then have a row past the tasks)."""
    return any(len(ranks) > len(tasks) for ranks in report["learned_ranks"].values())


def write_plots(suite: Suite, records: dict[str, dict[str, Any]], results: Path) -> list[Path]:
    """Mask heatmaps per AdaRank run and one learned-vs-intrinsic rank plot over all of them."""
    runs = _adarank_runs(records, results)
    if not runs:
        log.warning("no AdaRank record in %s: no mask or rank plots", results)
        return []
    tasks = list(suite.task_dirs)
    plots = []
    for record, output, report in runs:
        if not (output / "adaptive" / "owners.safetensors").is_file():  # written before owners were exported
            log.warning("%s has no adaptive/owners.safetensors: no mask plot (re-run the method to get one)", output)
            continue
        plots.append(plot_masks(output / "adaptive", tasks, results / f"masks_{record['method']}.png", record["label"]))
    learned = {record["label"] + (" (task blocks; shared block not shown)" if _has_shared_row(report, tasks) else ""):
               report["learned_ranks"] for record, _, report in runs}
    plots.append(plot_ranks(learned, intrinsic_ranks(suite), tasks, results / "ranks.png"))
    return plots


def write_report(suite_name: str, suite: Suite, results: Path) -> dict[str, Path | list[Path]]:
    """results/table.md, results/table.json and the PNG plots; returns their paths."""
    records = read_records(results)
    if not records:
        raise MergeInputError(f"no method records in {results}", f"run `rankmerge bench run {suite_name}` first")
    tasks, tables = build_tables(records)
    plots = write_plots(suite, records, results)
    sections = [f"# Benchmark: {suite_name}", "",
                "Accuracy (%) per task. Static hyper-parameters were chosen on the val split (setting column); adaptive "
                "methods start from the paper's defaults and report their published step (the final one for the papers' "
                "entropy rows, the label-free guard's best for distill rows). No test label chose anything. "
                "Wall time: the whole method (every grid point; both adaptation protocols).", ""]
    for table, title in TABLES.items():
        sections += [f"## {title}", "", markdown_table(tasks, tables[table], wall=table == "test"), ""]
    sections += [f"![{p.stem}]({p.name})" for p in plots]
    md, js = results / "table.md", results / "table.json"
    md.write_text("\n".join(sections).rstrip() + "\n")
    write_json(js, {"suite": suite_name, "tasks": tasks, "titles": TABLES, "tables": tables, "plots": [p.name for p in plots]})
    return {"markdown": md, "json": js, "plots": plots}
