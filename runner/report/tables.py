"""``report.md``, ``report.csv`` and ``report.json`` from the task tables."""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

from .collect import Run, natural, schedule_key
from .named_sets import markdown_section as named_sets_section
from .named_sets import report_json as named_sets_json
from .selection import SELECTION_RULE, Point, TaskTable, mean_std, reported_block
from .stats import AVERAGE_CI_METHOD, CI_METHOD, average_interval
from .units import scale

# metrics that are fractions: shown × 100 (BLEU is already 0-100; losses and perplexities as they are)


def _counts(point: Point) -> str:
    extra = [
        f"{len(point.degenerate)} degenerate" if point.degenerate else "",
        f"{len(point.failed)} failed" if point.failed else "",
        f"{len(point.missing)} missing" if point.missing else "",
    ]
    return "".join(f", {e}" for e in extra if e)


def cell(point: Point | None, metric: str, which: str = "reported") -> str:
    if point is None:
        return "—"
    stats = point.stats(which)
    if stats is None:
        return f"— (n=0{_counts(point)})"
    mean, std, n = stats
    k = scale(metric)
    return f"{k * mean:.2f} ± {k * std:.2f} (n={n}{_counts(point)})"


def unselected(group) -> str:
    """A schedule without any result on a task: how many of its runs failed or never ran."""
    if group is None:
        return "—"
    failed = sum(len(p.failed) for p in group.points)
    missing = sum(len(p.missing) for p in group.points)
    return "— (n=0" + (f", {failed} failed" if failed else "") + (f", {missing} missing" if missing else "") + ")"


def _num(x, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _p(x) -> str:
    return "—" if x is None else (f"{x:.3f}" if x >= 0.001 else f"{x:.1e}")


def has_grid(tables: list[TaskTable]) -> bool:
    return any(len(g.points) > 1 for t in tables for g in t.groups.values())


def protocol_text(table: TaskTable, which: str) -> str:
    if table.protocol == "selection_split":
        return f"selection split ({which} on task.selection_split={table.split}; reported: test = official dev)"
    if table.protocol == "mixed":
        return "mixed (runs with and without task.selection_split)"
    return f"dev ({which}: selected and reported on dev)"


def floor_of(table: TaskTable) -> float | None:
    """The trivial predictor's dev score on the task's main metric (majority class; the mean for
    regression), from its runs' ``task_summary.floor``; None where the task records none."""
    base = table.main.split("_")[0]
    for group in table.groups.values():
        for point in group.points:
            for run in point.runs:
                floor = (run.res.get("task_summary") or {}).get("floor") or {}
                if base in floor:
                    return float(floor[base])
    return None


def at_floor(point: Point | None, table: TaskTable, floor: float | None) -> bool:
    """Whether the cell's mean ± std reaches the trivial predictor's score."""
    stats = point.stats("reported") if point else None
    if stats is None or floor is None:
        return False
    mean, std, _ = stats
    return mean - std <= floor if table.greater else mean + std >= floor


def main_table(tables: list[TaskTable]) -> list[str]:
    schedules = sorted({s for t in tables for s in t.groups}, key=schedule_key)
    header = ["schedule", *[f"{t.col} ({t.main})" + (" †" if t.protocol != "dev" else "") for t in tables], "average"]
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    floors = [floor_of(t) for t in tables]
    for sched in schedules:
        line, means, samples = [sched], [], []
        for t, floor in zip(tables, floors):
            group = t.groups.get(sched)
            point = group.selected if group else None
            line.append((cell(point, t.main) if point else unselected(group)) + (" ‡" if at_floor(point, t, floor) else ""))
            stats = point.stats("reported") if point else None
            if stats:
                means.append(scale(t.main) * stats[0])
                samples.append([scale(t.main) * v for _, v in point.reported])
        average = "—"
        if len(means) == len(tables) and means:
            average = f"{statistics.fmean(means):.2f}"
            interval = average_interval(samples) if len(tables) > 1 else None
            if interval:
                average += f" [{interval[0]:.2f}, {interval[1]:.2f}]"
        line.append(average)
        md.append("| " + " | ".join(line) + " |")
    if any(f is not None for f in floors):
        md.append(
            "| trivial predictor (floor) | "
            + " | ".join("—" if f is None else f"{scale(t.main) * f:.2f}" for t, f in zip(tables, floors))
            + " | — |"
        )
    return md


FLOOR_NOTE = (
    "‡ mean ± std reaches the trivial predictor's score (the floor row: the majority class for "
    "every example; the mean for regression): not shown to beat a constant prediction."
)


def markdown(root: Path, tables: list[TaskTable], paired: dict, which: str, incomplete: list[str], degenerate: list[Run]) -> str:
    grid = has_grid(tables)
    text = [
        f"# adaptune report: {root}",
        "",
        (
            f"Dev metrics ({which})"
            if any(t.protocol != "selection_split" for t in tables)
            else f"Official dev metrics (test; settings selected on the selection slice's {which})"
        )
        + ", mean ± std over seeds; fractions (accuracy, F1, correlations, "
        "top-k) × 100, BLEU (0-100) and losses as they are. Each cell: the schedule at its "
        "selected setting; n seeds averaged (degenerate runs are averaged in and counted; failed "
        "and missing runs are not).",
        "",
        *main_table(tables),
    ]
    if any(at_floor(g.selected, t, floor_of(t)) for t in tables for g in t.groups.values()):
        text += ["", FLOOR_NOTE]
    if len(tables) > 1:
        text += ["", AVERAGE_CI_METHOD + "."]
    if any(t.protocol != "dev" for t in tables):
        text += [
            "",
            "† Selection-split protocol: each setting selected on the "
            f"`{which}` metric of a slice carved from the training set (task.selection_split); "
            "the numbers are the official dev set (results.json `test`), untouched by selection.",
        ]
    text += named_sets_section(tables)
    if grid:
        bias = (
            " Where a setting is selected and reported on the same dev set (protocol dev, the "
            "papers' practice) its number is the best of the grid, so optimistically biased; "
            "task.selection_split selects on a slice of the training set instead."
            if any(t.protocol == "dev" for t in tables)
            else ""
        )
        text += [
            "",
            "## Selected settings",
            "",
            SELECTION_RULE + bias,
            "",
            "| task | schedule | selected | protocol | selected on | reported | note |",
            "|---|---|---|---|---|---|---|",
        ]
        for t in tables:
            for sched, g in t.groups.items():
                p = g.selected
                text.append(
                    f"| {t.col} | {sched} | {p.label if p else '—'} | {protocol_text(t, which)} | "
                    f"{cell(p, t.main, 'selection')} | {cell(p, t.main)} | {g.note} |"
                )
    rows = [(t, r) for t in tables for r in paired.get(t.col, [])]
    if rows:
        text += [
            "",
            "## Paired differences to the baseline",
            "",
            "Per seed, schedule − baseline, each at its selected setting (same seeds: same data "
            f"order and initial head); units as in the table. {CI_METHOD}. p: paired t-test "
            "(scipy.stats.ttest_rel); Wilcoxon signed-rank where n ≥ 6. W/L/T: seeds on which "
            "the schedule is better / worse / equal.",
            "",
            "| task | comparison | n | mean diff | 95% CI (t) | p (paired t) | p (Wilcoxon) | W/L/T | per seed |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for t, r in rows:
            k = scale(t.main)
            ci = f"[{k * r['ci95'][0]:.2f}, {k * r['ci95'][1]:.2f}]" if r["ci95"] else "—"
            seeds = ", ".join(f"{s}: {k * d:+.2f}" for s, d in zip(r["seeds"], r["differences"]))
            text.append(
                f"| {t.col} | {r['schedule']} − {r['baseline']} | {r['n']} | {k * r['mean']:+.2f} | "
                f"{ci} | {'— (both arms degenerate)' if r.get('both_degenerate') else _p(r['p_ttest_rel'])} | "
                f"{_p(r['p_wilcoxon'])} | "
                f"{r['wins']}/{r['losses']}/{r['ties']} | {seeds} |"
            )
    if grid:
        text += [
            "",
            "## Grid",
            "",
            "Every setting run, mean ± std over seeds; ✓ marks the selected one.",
            "",
            "| task | schedule | setting | selected on | reported | |",
            "|---|---|---|---|---|---|",
        ]
        for t in tables:
            for sched, g in t.groups.items():
                for p in g.points:
                    mark = "✓" if p is g.selected else ("not eligible" if set(t.expected) - p.seeds else "")
                    text.append(
                        f"| {t.col} | {sched} | {p.label} | {cell(p, t.main, 'selection')} | {cell(p, t.main)} | {mark} |"
                    )
    if incomplete:
        text += ["", "Incomplete runs (not averaged in):", *[f"- {p}" for p in incomplete]]
    text += degenerate_note(degenerate)
    return "\n".join(text) + "\n"


_ADVICE = (
    (
        ("nan", "inf", "diverg"),
        "diverged: lower the learning rate (the grid's next value down) or lengthen the warmup (schedule.warmup_ratio).",
    ),
    (
        ("one class", "constant", "single class", "majority"),
        "constant predictions: the model never "
        "left one answer; train longer (trainer.epochs or trainer.max_steps) or move the learning rate "
        "(too low never leaves the majority class, too high collapses to it).",
    ),
)


def degenerate_note(runs: list[Run]) -> list[str]:
    if not runs:
        return []
    lines = [
        "",
        "## Degenerate runs",
        "",
        f"{len(runs)} run(s) ended degenerate; completed ones are averaged in (a real outcome of "
        "that setting) and counted in their cells:",
    ]
    for run in sorted(runs, key=lambda r: (natural(r.col), schedule_key(r.sched), natural(r.setting_label))):
        setting = f" [{run.setting_label}]" if run.setting_label else ""
        lines.append(f"- {run.col}, {run.sched}{setting}, seed {run.seed}: {run.degenerate} ({run.status}; {run.dir})")
    reasons = " ".join(r.degenerate.lower() for r in runs)
    advice = [text for words, text in _ADVICE if any(w in reasons for w in words)]
    advice = advice or ["check the run's app.log; a different learning rate or more steps usually helps."]
    lines += ["", "What to change:", *[f"- {a}" for a in advice]]
    return lines


CSV_HEADER = [
    "schedule",
    "task",
    "metric",
    "mean",
    "std",
    "n",
    "setting",
    "block",
    "selected",
    "protocol",
    "degenerate",
    "failed",
    "missing",
    "diff_mean",
    "diff_ci95_low",
    "diff_ci95_high",
    "p_ttest_rel",
    "p_wilcoxon",
    "wins",
    "losses",
    "ties",
]


def csv_rows(tables: list[TaskTable], paired: dict, which: str) -> list[list]:
    """One row per schedule, task, setting, results block and metric (unscaled); the selected
    setting's main-metric row of the reported block also carries the paired statistics."""
    rows = [CSV_HEADER]
    for t in tables:
        stats = {r["schedule"]: r for r in paired.get(t.col, [])}
        for sched, g in t.groups.items():
            for p in g.points:
                counted = [r for r in p.runs if r.counts]
                blocks = sorted(
                    {which} | {reported_block(r, which) for r in counted} | {"test" for r in counted if r.res.get("test")}
                )
                for block in blocks:
                    values = defaultdict(list)
                    for run in counted:
                        for metric in run.res.get(block) or {}:
                            value = run.metric(block, metric)
                            if value is not None:
                                values[metric].append(value)
                    for metric in sorted(values):
                        mean, std = mean_std(values[metric])
                        row = [
                            sched,
                            t.col,
                            metric,
                            f"{mean:.6f}",
                            f"{std:.6f}",
                            len(values[metric]),
                            p.label if p.setting else "",
                            block,
                            int(p is g.selected),
                            t.protocol,
                            len(p.degenerate),
                            len(p.failed),
                            len(p.missing),
                        ]
                        r = (
                            stats.get(sched)
                            if p is g.selected and metric == t.main and block == reported_block(counted[0], which)
                            else None
                        )
                        if r:
                            ci = r["ci95"] or [None, None]
                            row += [
                                _num(r["mean"], 6),
                                _num(ci[0], 6),
                                _num(ci[1], 6),
                                _num(r["p_ttest_rel"], 6),
                                _num(r["p_wilcoxon"], 6),
                                r["wins"],
                                r["losses"],
                                r["ties"],
                            ]
                        rows.append(row + [""] * (len(CSV_HEADER) - len(row)))
    return rows


def _point_json(p: Point, g) -> dict:
    def summary(which):
        s = p.stats(which)
        return {"mean": s[0], "std": s[1], "n": s[2]} if s else None

    return {
        "setting": {k: v for k, v in p.setting},
        "label": p.label,
        "selected": p is g.selected,
        "selection": summary("selection"),
        "reported": summary("reported"),
        "per_seed": [
            {
                "seed": r.seed,
                "status": r.status,
                "dir": str(r.dir),
                "degenerate": r.degenerate,
                "selection": dict(p.selection).get(r.seed) if r.counts else None,
                "reported": dict(p.reported).get(r.seed) if r.counts else None,
            }
            for r in p.runs
        ],
        "degenerate": len(p.degenerate),
        "failed": len(p.failed),
        "missing_seeds": p.missing,
        "in_plan": p.in_plan,
    }


def report_json(
    root: Path, tables: list[TaskTable], paired: dict, which: str, incomplete: list[str], degenerate: list[Run]
) -> dict:
    return {
        "root": str(root),
        "which": which,
        "selection_rule": SELECTION_RULE,
        "ci_method": CI_METHOD,
        "tasks": [
            {
                "task": t.col,
                "main_metric": t.main,
                "greater_is_better": t.greater,
                "scale": scale(t.main),
                "protocol": t.protocol,
                "protocol_text": protocol_text(t, which),
                "selection_split": t.split,
                "selection_block": which,
                "expected_seeds": t.expected,
                "schedules": [
                    {
                        "schedule": s,
                        "selected": g.selected.label if g.selected else None,
                        "selected_setting": dict(g.selected.setting) if g.selected else None,
                        "note": g.note,
                        "grid": [_point_json(p, g) for p in g.points],
                    }
                    for s, g in t.groups.items()
                ],
                "paired": paired.get(t.col, []),
            }
            for t in tables
        ],
        "degenerate": [
            {
                "dir": str(r.dir),
                "task": r.col,
                "schedule": r.sched,
                "setting": r.setting_label,
                "seed": r.seed,
                "status": r.status,
                "reason": r.degenerate,
            }
            for r in degenerate
        ],
        "incomplete": incomplete,
        "named_test_sets": named_sets_json(tables),
    }
