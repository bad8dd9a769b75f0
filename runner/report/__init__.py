"""``adaptune report DIR``: tables and plots from every ``results.json`` under a directory.

Writes ``report.md`` (with its plots embedded), ``report.csv``, ``runs.csv`` (one tidy row per run) and
``report.json`` and, when matplotlib is installed,
``curves.png`` (training loss), ``bars.png`` (main metric per task, std error bars) and
``dev_curves.png`` (main dev metric over evaluation steps, mean and min–max band over seeds).

Rows are schedules, columns tasks (the paper layout, plus an average column of the main metrics).
Only seeds are averaged over. Overrides that differ between runs (from each run's
``.hydra/overrides.yaml``) split them: ``schedule.*`` keys (and any key an ``adaptune compare``
plan grids over) are *settings* of a schedule, the rest split task columns
(``glue/rte [task.train_subset=500]``, the DPS low-resource protocol); overrides that choose the
schedule, task, name or seed do not split, and the experiment preset splits rows only where two
presets share a schedule and task.

Where a schedule has several settings (a grid, an Optuna search's trials), the report selects one
per task (``selection.SELECTION_RULE``: best mean over seeds among the settings with every seed,
ties to the lower std then the smaller lr), shows mean ± std at it in the main table and the whole
grid below. Two protocols, told apart by each run's ``config.task.selection_split``:

- dev: selected and reported on the dev metrics (``--which final|best``), the papers' protocol
  (the selected number is optimistically biased);
- selection split: selected on ``final``/``best``, which are then metrics on a slice carved from
  the training set, and reported on ``test`` (the official dev set), which selection never reads.

Each schedule is then compared with the baseline seed by seed (paired differences, t interval,
paired t-test, Wilcoxon for n >= 6, wins/losses/ties). Runs with a ``degenerate`` reason are
averaged in and counted in their cells; failed runs (no usable result) and missing seeds are
counted, listed and never averaged in.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

from .collect import Run, collect, label_runs, load_plan
from .plots import plots
from .selection import TaskTable, build, select
from .stats import paired, paired_to_baseline
from .tables import csv_rows, markdown, report_json

__all__ = [
    "Run",
    "TaskTable",
    "build",
    "collect",
    "label_runs",
    "load_plan",
    "main",
    "paired",
    "paired_to_baseline",
    "plots",
    "report",
    "select",
]


def _clean(obj):
    """JSON without NaN / inf (as null)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def report(root: Path, which: str = "final") -> tuple[str, list[Path]] | None:
    """Write the report files into ``root``; (report.md text, files written), or None when
    ``root`` holds no result at all."""
    runs, unplaced = collect(root)
    if not any(r.counts and r.res.get("main_metric") for r in runs):
        return None
    plan = load_plan(root)
    label_runs(runs, plan)
    tables = build(runs, which, plan)
    paired_stats = {t.col: paired_to_baseline(t) for t in tables}
    failed = [r for r in runs if not (r.counts and r.metric(which, r.res.get("main_metric", "")) is not None)]
    incomplete = [f"{r.dir} ({r.status}{'; ' + r.degenerate if r.degenerate else ''})" for r in failed]
    incomplete += [str(p) for p in unplaced]
    degenerate = [r for r in runs if r.degenerate]
    images = plots(tables, root)
    text = markdown(root, tables, paired_stats, which, incomplete, degenerate)
    if images:  # embedded, so report.md reads as a page with its figures
        text += "\n## Plots\n\n" + "".join(f"![{p.stem}]({p.name})\n\n" for p in images)
    (root / "report.md").write_text(text)
    with open(root / "report.csv", "w", newline="") as f:
        csv.writer(f).writerows(csv_rows(tables, paired_stats, which))
    with open(root / "runs.csv", "w", newline="") as f:
        csv.writer(f).writerows(run_rows(root, runs))
    data = report_json(root, tables, paired_stats, which, incomplete, degenerate)
    (root / "report.json").write_text(json.dumps(_clean(data), indent=1) + "\n")
    written = [root / "report.md", root / "report.csv", root / "runs.csv", root / "report.json"]
    return text, written + images


def run_rows(root: Path, runs: list[Run]) -> list[list]:
    """``runs.csv``: one tidy row per run (its directory, task column, schedule, seed, every grid
    key, the main metric's final and best values, status, degeneracy), pandas-ready."""
    keys = sorted({k for r in runs for k, _ in r.setting})
    rows = [["directory", "task", "schedule", "seed", *keys, "main_metric", "final", "best", "best_step", "status", "degenerate"]]
    for r in sorted(runs, key=lambda r: str(r.dir)):
        setting, metric = dict(r.setting), r.res.get("main_metric", "")
        rows.append(
            [
                str(r.dir.relative_to(root)) if r.dir.is_relative_to(root) else str(r.dir),
                r.col,
                r.sched,
                r.seed,
                *[setting.get(k, "") for k in keys],
                metric,
                (r.res.get("final") or {}).get(metric, ""),
                (r.res.get("best") or {}).get(metric, ""),
                r.res.get("best_step", ""),
                r.status,
                r.degenerate or "",
            ]
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adaptune report", description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path, help="a sweep or outputs directory")
    parser.add_argument(
        "--which",
        choices=("final", "best"),
        default="final",
        help="select (and, without task.selection_split, report) on the final dev metrics (default) or the best evaluation's",
    )
    args = parser.parse_args(argv)
    root = args.directory
    if not root.is_dir():
        print(f"adaptune report: error: {root} is not a directory")
        return 2
    done = report(root, args.which)
    if done is None:
        print(f"adaptune report: error: no completed results.json under {root}")
        return 2
    text, written = done
    print(text, end="")
    print("\nwrote " + ", ".join(str(p) for p in written))
    return 0
