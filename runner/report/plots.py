"""``curves.png`` (training loss), ``bars.png`` (main metric) and ``dev_curves.png`` (the main dev
metric over evaluation steps, min–max band over seeds), each schedule at its selected setting."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path

from .collect import natural, schedule_key
from .selection import TaskTable
from .units import scale


def _save(plt, fig, axes, path: Path, written: list[Path]) -> None:
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)


def _selected(tables: list[TaskTable]):
    """(table, schedule, setting label, counted runs) of every selected point."""
    for t in tables:
        for sched, g in t.groups.items():
            if g.selected is not None:
                yield t, sched, g.selected.label, [r for r in g.selected.runs if r.counts]


def _legend(sched: str, label: str) -> str:
    return sched if label in ("", "—") else f"{sched} ({label})"


def _train_loss(plt, tables, out, written) -> None:
    curves = []
    for t, sched, label, runs in _selected(tables):
        points = defaultdict(list)
        for run in runs:
            for step, loss in run.res.get("train_loss") or []:
                if isinstance(loss, (int, float)) and math.isfinite(loss):
                    points[step].append(loss)
        if points:
            curves.append((f"{_legend(sched, label)} [{t.col}]", points))
    if not curves:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, points in curves:
        steps = sorted(points)
        ax.plot(steps, [statistics.fmean(points[s]) for s in steps], label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (mean over seeds)")
    _save(plt, fig, [ax], out / "curves.png", written)


def _bars(plt, tables, out, written) -> None:
    schedules = sorted({s for t in tables for s in t.groups}, key=schedule_key)
    if not tables or not schedules:
        return
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(tables) * len(schedules) / 2), 4))
    width = 0.8 / max(1, len(schedules))
    for k, sched in enumerate(schedules):
        stats = []
        for t in tables:
            g = t.groups.get(sched)
            s = g.selected.stats("reported") if g and g.selected else None
            stats.append((scale(t.main) * s[0], scale(t.main) * s[1]) if s else (0, 0))
        xs = [i + k * width for i in range(len(tables))]
        ax.bar(xs, [m for m, _ in stats], width, yerr=[s for _, s in stats], capsize=3, label=sched)
    ax.set_xticks([i + width * (len(schedules) - 1) / 2 for i in range(len(tables))])
    ax.set_xticklabels([f"{t.col}\n{t.main}" for t in tables], fontsize=8)
    ax.set_ylabel("score (fractions × 100; mean ± std)")
    _save(plt, fig, [ax], out / "bars.png", written)


def _dev_curves(plt, tables, out, written) -> None:
    by_task = defaultdict(list)
    for t, sched, label, runs in _selected(tables):
        points = defaultdict(list)
        for run in runs:
            for ev in run.res.get("evals") or []:
                value = ev.get(t.main)
                if isinstance(value, (int, float)) and math.isfinite(value) and "step" in ev:
                    points[ev["step"]].append(scale(t.main) * value)
        if points:
            by_task[t.col].append((_legend(sched, label), points, t))
    if not by_task:
        return
    cols = min(3, len(by_task))
    rows = math.ceil(len(by_task) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax, (col, curves) in zip(flat, sorted(by_task.items(), key=lambda kv: natural(kv[0]))):
        for name, points, t in curves:
            steps = sorted(points)
            (line,) = ax.plot(
                steps, [statistics.fmean(points[s]) for s in steps], label=name, marker="o" if len(steps) < 3 else None
            )
            ax.fill_between(
                steps,
                [min(points[s]) for s in steps],
                [max(points[s]) for s in steps],
                color=line.get_color(),
                alpha=0.2,
                linewidth=0,
            )
        where = "selection slice" if t.protocol == "selection_split" else "dev"
        ax.set_title(col, fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(f"{t.main} on {where} (mean, min–max)", fontsize=8)
    for ax in flat[len(by_task) :]:
        ax.set_visible(False)
    _save(plt, fig, flat[: len(by_task)], out / "dev_curves.png", written)


def plots(tables: list[TaskTable], out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written: list[Path] = []
    _train_loss(plt, tables, out, written)
    _bars(plt, tables, out, written)
    _dev_curves(plt, tables, out, written)
    return written
