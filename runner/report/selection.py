"""Grid points and the choice of each schedule's setting per task (see ``SELECTION_RULE``)."""

from __future__ import annotations

import itertools
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field

from .collect import Run, natural, normalise, schedule_key, short_key

SELECTION_RULE = (
    "For each task and schedule the setting with the best mean selection metric over seeds wins. "
    "Only settings with a result for every seed of the comparison are eligible (a failed or "
    "missing seed does not let a setting win on fewer, luckier seeds); degenerate runs are real "
    "outcomes and count. Means equal to 1e-9 are broken by the lower std, then the smaller lr, "
    "then the setting's name. If no setting has every seed, the choice is among the settings with "
    "the most seeds and the cell says so."
)


def mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


@dataclass
class Point:
    """One setting of one schedule on one task, over its seeds."""

    sched: str
    setting: tuple
    label: str
    lr: float | None = None
    runs: list[Run] = field(default_factory=list)
    selection: list[tuple] = field(default_factory=list)  # (seed, value): what selection reads
    reported: list[tuple] = field(default_factory=list)  # (seed, value): what the table shows
    failed: list[Run] = field(default_factory=list)  # placed, but no usable value
    missing: list[int] = field(default_factory=list)  # expected seeds with no run at all
    in_plan: bool = False

    @property
    def seeds(self) -> set:
        return {seed for seed, _ in self.selection}

    @property
    def degenerate(self) -> list[Run]:
        """Degenerate runs averaged in (a degenerate run without metrics is among ``failed``)."""
        return [run for run in self.runs if run.counts and run.degenerate and run not in self.failed]

    def stats(self, which: str = "selection") -> tuple[float, float, int] | None:
        values = [v for _, v in getattr(self, which)]
        return (*mean_std(values), len(values)) if values else None

    def per_seed(self, which: str = "reported") -> dict:
        """{seed: value} (the mean where one seed ran twice at this setting)."""
        grouped = defaultdict(list)
        for seed, value in getattr(self, which):
            grouped[seed].append(value)
        return {seed: statistics.fmean(v) for seed, v in grouped.items()}


@dataclass
class Group:
    """One schedule on one task: its grid and the selected point."""

    sched: str
    points: list[Point]
    selected: Point | None = None
    note: str = ""


@dataclass
class TaskTable:
    col: str
    main: str
    greater: bool
    protocol: str  # dev | selection_split | mixed
    split: object  # task.selection_split of its runs (None for dev)
    expected: list[int]
    groups: dict[str, Group]


def reported_block(run: Run, which: str) -> str:
    return "test" if run.protocol == "selection_split" else which


def _point_for(points: dict, run: Run) -> Point:
    key = (run.sched, run.setting)
    if key not in points:
        points[key] = Point(run.sched, run.setting, run.setting_label or "—", run.lr)
    return points[key]


def _plan_points(points: dict, plan: dict) -> None:
    """Add the compare plan's grid points that have no run yet (shown as missing)."""
    for sched, grid in (plan.get("grids") or {}).items():
        keys = sorted(grid)
        for combo in itertools.product(*(grid[k] for k in keys)):
            setting = tuple((k, normalise(v)) for k, v in zip(keys, combo))
            if (sched, setting) not in points:
                label = ", ".join(f"{short_key(k)}={v}" for k, v in zip(keys, combo)) or "—"
                lr = dict(setting).get("schedule.lr")
                points[(sched, setting)] = Point(sched, setting, label, lr if isinstance(lr, float) else None)
            if (sched, setting) in points:
                points[(sched, setting)].in_plan = True


def select(points: list[Point], expected: list[int], greater: bool) -> tuple[Point | None, str]:
    """The selected point and a note when the choice was not the plain rule (see SELECTION_RULE)."""
    scored = [p for p in points if p.selection]
    if not scored:
        return None, "no setting has a result"
    complete = [p for p in scored if set(expected) <= p.seeds]
    note = ""
    if not complete:
        most = max(len(p.seeds) for p in scored)
        complete = [p for p in scored if len(p.seeds) == most]
        note = f"no setting has all {len(expected)} seeds: chosen among those with {most}"
    sign = 1.0 if greater else -1.0
    best = max(sign * p.stats()[0] for p in complete)
    tied = [p for p in complete if math.isclose(sign * p.stats()[0], best, rel_tol=1e-9, abs_tol=1e-12)]
    tied.sort(key=lambda p: (p.stats()[1], p.lr if p.lr is not None else math.inf, natural(p.label)))
    if len(tied) > 1:
        note = "; ".join(filter(None, [note, f"tied mean with {len(tied) - 1} other setting(s): lower std, then smaller lr"]))
    return tied[0], note


def edge_note(grid: list[Point], chosen: Point | None) -> str:
    """Where the selected setting sits on the edge of a numeric grid axis: which way to widen the
    grid; a 2-value axis cannot show an optimum at all. Empty when the choice is inside the grid."""
    if chosen is None:
        return ""
    notes = []
    for key, value in chosen.setting:
        values = sorted(
            {v for p in grid for k, v in p.setting if k == key and isinstance(v, (int, float)) and not isinstance(v, bool)}
        )
        if len(values) < 2 or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if value not in (values[0], values[-1]):
            continue
        side = "larger" if value == values[-1] else "smaller"
        note = (
            f"{short_key(key)}={value} is the grid's {'largest' if side == 'larger' else 'smallest'}: "
            f"widen the grid towards {side} values"
        )
        if len(values) == 2:
            note += " (a 2-value grid cannot show an optimum)"
        notes.append(note)
    return "; ".join(notes)


def build(runs: list[Run], which: str, plan: dict | None = None) -> list[TaskTable]:
    """Task tables: every run on its grid point, each schedule's setting selected on ``which``
    (the selection slice's metrics under task.selection_split) and reported on ``which`` or, under
    task.selection_split, on ``test`` (the official dev set)."""
    by_col: dict = defaultdict(list)
    for run in runs:
        by_col[run.col].append(run)
    tables = []
    for col in sorted(by_col, key=natural):
        col_runs = by_col[col]
        with_res = [r for r in col_runs if r.res.get("main_metric")]
        main = with_res[0].res["main_metric"] if with_res else "?"
        greater = bool(with_res[0].res.get("greater_is_better", True)) if with_res else True
        protocols = {r.protocol for r in col_runs}
        protocol = protocols.pop() if len(protocols) == 1 else "mixed"
        split = next((r.selection_split for r in col_runs if r.selection_split), None)
        if plan and plan.get("seeds"):
            expected = sorted(int(s) for s in plan["seeds"])
        else:
            expected = sorted({r.seed for r in col_runs if r.seed is not None})
        points: dict = {}
        for run in sorted(col_runs, key=lambda r: str(r.dir)):
            point = _point_for(points, run)
            point.runs.append(run)
            sel = run.metric(which, main) if run.counts else None
            rep = run.metric(reported_block(run, which), main) if run.counts else None
            if sel is None:
                point.failed.append(run)
                continue
            point.selection.append((run.seed, sel))
            if rep is not None:
                point.reported.append((run.seed, rep))
        if plan:
            _plan_points(points, plan)
        groups = {}
        for sched in sorted({s for s, _ in points}, key=schedule_key):
            grid = sorted((p for (s, _), p in points.items() if s == sched), key=lambda p: natural(p.label))
            for p in grid:
                present = {r.seed for r in p.runs}
                p.missing = [s for s in expected if s not in present]
            chosen, note = select(grid, expected, greater)
            note = "; ".join(filter(None, [note, edge_note(grid, chosen)]))
            groups[sched] = Group(sched, grid, chosen, note)
        tables.append(TaskTable(col, main, greater, protocol, split, expected, groups))
    return tables
