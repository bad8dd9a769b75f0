"""``adaptune report DIR``: tables and plots from every ``results.json`` under a directory.

Writes ``report.md`` and ``report.csv`` (mean ± std and n of each task's metrics per schedule;
the paper layout: schedules as rows, tasks as columns, plus an average column of the main
metrics) and, when matplotlib is installed, ``curves.png`` (training loss per schedule, mean over
seeds) and ``bars.png`` (main metric per task with std error bars). Runs that started but have no
complete ``results.json`` are listed as incomplete and never averaged in.

Only seeds are averaged over. Any other command-line override that differs between the runs
(from each run's ``.hydra/overrides.yaml``) splits them: ``schedule.*`` overrides into rows
(``sage [lr=0.0001]``, e.g. an Optuna search's trials), the rest into columns
(``glue/rte [task.train_subset=500]``, the DPS low-resource protocol). Overrides that choose the
schedule, task, name or seed do not split (the labels already say them); the experiment preset
splits rows only where two presets share a schedule and task.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
from collections import defaultdict
from pathlib import Path


def _task_label(res: dict) -> str:
    name = res.get("task_name")
    return f"{res['task']}/{name}" if name else res["task"]


def collect(root: Path) -> tuple[list[dict], list[Path]]:
    """(completed results, run directories that started but did not complete)."""
    done, incomplete = [], []
    run_dirs = {p.parent for p in root.rglob("results.json")}
    run_dirs |= {p.parent.parent for p in root.rglob("checkpoints/last.pt")}
    run_dirs |= {p.parent for p in root.rglob(".hydra") if p.is_dir()}
    for run_dir in sorted(run_dirs):
        path = run_dir / "results.json"
        try:
            res = json.loads(path.read_text()) if path.is_file() else None
        except json.JSONDecodeError:
            res = None
        if res and res.get("status") == "completed":
            res["_dir"] = str(run_dir)
            res["_overrides"] = _read_overrides(run_dir / ".hydra" / "overrides.yaml")
            done.append(res)
        else:
            incomplete.append(run_dir)
    return done, incomplete


def _read_overrides(path: Path) -> dict[str, str]:
    """{key: value} of a run's command-line overrides (Hydra writes them as a YAML list)."""
    if not path.is_file():
        return {}
    from omegaconf import OmegaConf

    out = {}
    for item in OmegaConf.load(path) or []:
        key, sep, value = str(item).partition("=")
        if sep:
            out[key.lstrip("+~")] = value
    return out


# overrides whose effect the row and column labels already show, or that cannot change a result
_NOT_SPLIT = {"seed", "name", "experiment", "schedule", "task", "task.name", "resume"}
_NOT_SPLIT_PREFIXES = ("hydra", "logger", "trainer.progress", "trainer.num_workers")


def label_runs(results: list[dict]) -> None:
    """Set each result's ``_row`` (schedule) and ``_col`` (task) labels, split by the overrides
    that differ between runs (see the module docstring)."""
    keys = {k for res in results for k in res.get("_overrides", {})
            if k not in _NOT_SPLIT and not k.startswith(_NOT_SPLIT_PREFIXES)}
    varying = sorted(k for k in keys
                     if len({res.get("_overrides", {}).get(k) for res in results}) > 1)
    for res in results:
        ov = res.get("_overrides", {})
        row = [f"{k.removeprefix('schedule.')}={ov[k]}" for k in varying
               if k.startswith("schedule.") and k in ov]
        col = [f"{k}={ov[k]}" for k in varying if not k.startswith("schedule.") and k in ov]
        res["_row"] = res["schedule"] + (f" [{', '.join(row)}]" if row else "")
        res["_col"] = _task_label(res) + (f" [{', '.join(col)}]" if col else "")
    # presets that differ in more than schedule and task (two SAGE presets on one task) get rows
    presets: dict = defaultdict(set)
    for res in results:
        presets[(res["_row"], res["_col"])].add(res.get("_overrides", {}).get("experiment"))
    if any(len(found) > 1 for found in presets.values()):
        for res in results:
            experiment = res.get("_overrides", {}).get("experiment")
            if experiment:
                res["_row"] += f" ({experiment})"


def _natural(text: str) -> list:
    """Sort key that orders numbers by value: 'n=500' before 'n=1000'."""
    return [(0, float(part), "") if part[:1].isdigit() else (1, 0.0, part)
            for part in re.findall(r"\d+(?:\.\d+)?(?:e-?\d+)?|\D+", text)]


# metrics that are fractions: shown × 100 (BLEU is already 0-100; losses and perplexities as they are)
_FRACTIONS = ("accuracy", "f1", "matthews", "pearson", "spearman", "top1", "top5")


def _scale(metric: str) -> float:
    return 100.0 if metric.split("_")[0] in _FRACTIONS else 1.0


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def summarise(results: list[dict], which: str = "final") -> dict:
    """{(row, column): {metric: [values]}} plus each column's main metric."""
    label_runs(results)
    cells: dict = defaultdict(lambda: defaultdict(list))
    main: dict[str, str] = {}
    for res in results:
        task = res["_col"]
        main[task] = res["main_metric"]
        for metric, value in (res.get(which) or {}).items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                cells[(res["_row"], task)][metric].append(float(value))
    return {"cells": cells, "main": main}


def _schedule_order(cells: dict) -> list[str]:
    """Schedules of ``cells`` in the papers' order (baseline first), others after, by name."""
    known = ("baseline", "sage", "dps", "dps_mix")

    def key(label: str):
        name = label.split(" [")[0]
        return (known.index(name) if name in known else 9, name, _natural(label))
    return sorted({s for s, _ in cells}, key=key)


def tables(summary: dict) -> tuple[str, list[list[str]]]:
    cells, main = summary["cells"], summary["main"]
    schedules = _schedule_order(cells)
    tasks = sorted(main, key=_natural)
    header = ["schedule", *[f"{t} ({main[t]})" for t in tasks], "average"]
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows = [["schedule", "task", "metric", "mean", "std", "n"]]
    for sched in schedules:
        line = [sched]
        means = []
        for task in tasks:
            values = cells.get((sched, task), {}).get(main[task])
            if not values:
                line.append("—")
                continue
            mean, std = _mean_std(values)
            scale = _scale(main[task])
            means.append(scale * mean)
            line.append(f"{scale * mean:.2f} ± {scale * std:.2f} (n={len(values)})")
        line.append(f"{statistics.fmean(means):.2f}" if len(means) == len(tasks) and means else "—")
        md.append("| " + " | ".join(line) + " |")
        for task in tasks:
            for metric, values in sorted(cells.get((sched, task), {}).items()):
                mean, std = _mean_std(values)
                rows.append([sched, task, metric, f"{mean:.6f}", f"{std:.6f}", str(len(values))])
    return "\n".join(md), rows


def _save(plt, fig, ax, path: Path, written: list[Path]) -> None:
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)


def plots(results: list[dict], summary: dict, out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    curves: dict = defaultdict(lambda: defaultdict(list))
    for res in results:
        for step, loss in res.get("train_loss", []):
            curves[(res["_col"], res["_row"])][step].append(loss)
    if curves:
        fig, ax = plt.subplots(figsize=(7, 4))
        for (task, sched), points in sorted(curves.items()):
            steps = sorted(points)
            ax.plot(steps, [statistics.fmean(points[s]) for s in steps], label=f"{sched} ({task})")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss (mean over seeds)")
        _save(plt, fig, ax, out / "curves.png", written)
    cells, main = summary["cells"], summary["main"]
    if cells:
        tasks = sorted(main, key=_natural)
        schedules = _schedule_order(cells)
        fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(tasks) * len(schedules) / 2), 4))
        width = 0.8 / max(1, len(schedules))
        for k, sched in enumerate(schedules):
            stats = [tuple(_scale(main[t]) * x for x in _mean_std(cells[(sched, t)][main[t]]))
                     if cells.get((sched, t), {}).get(main[t]) else (0, 0) for t in tasks]
            xs = [i + k * width for i in range(len(tasks))]
            ax.bar(xs, [m for m, _ in stats], width, yerr=[s for _, s in stats], capsize=3, label=sched)
        ax.set_xticks([i + width * (len(schedules) - 1) / 2 for i in range(len(tasks))])
        ax.set_xticklabels([f"{t}\n{main[t]}" for t in tasks], fontsize=8)
        ax.set_ylabel("dev score (fractions × 100; mean ± std)")
        _save(plt, fig, ax, out / "bars.png", written)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adaptune report", description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path, help="a sweep or outputs directory")
    parser.add_argument("--which", choices=("final", "best"), default="final",
                        help="final dev metrics (default) or the best evaluation's")
    args = parser.parse_args(argv)
    root = args.directory
    if not root.is_dir():
        print(f"adaptune report: error: {root} is not a directory")
        return 2
    results, incomplete = collect(root)
    if not results:
        print(f"adaptune report: error: no completed results.json under {root}")
        return 2
    summary = summarise(results, args.which)
    md, rows = tables(summary)
    text = [f"# adaptune report: {root}", "",
            f"Dev metrics ({args.which}), mean ± std over seeds; fractions (accuracy, F1, "
            "correlations, top-k) × 100, BLEU (0-100) and losses as they are.", "", md]
    if incomplete:
        text += ["", "Incomplete runs (not averaged in):", *[f"- {p}" for p in incomplete]]
    (root / "report.md").write_text("\n".join(text) + "\n")
    with open(root / "report.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    written = plots(results, summary, root)
    print("\n".join(text))
    print(f"\nwrote {root / 'report.md'}, {root / 'report.csv'}" + "".join(f", {p}" for p in written))
    return 0
