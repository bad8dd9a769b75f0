"""Named test sets in the report: results.json ``test`` metrics named ``<set>/<metric>`` (the DPS
out-of-domain protocol's ``snli/accuracy``, ``scitail/accuracy``, ...; ``tasks/ood.py``).

For each task column and schedule, at the schedule's selected setting: mean ± std over seeds of
each named set's metric (losses and predicted-class fractions left out), and the average over the
sets. Selection never reads these numbers (it reads the dev metrics, as for every task).
"""

from __future__ import annotations

import statistics

from .selection import Point, TaskTable, mean_std
from .units import scale


def _is_named(key: str) -> bool:
    name, sep, metric = key.partition("/")
    return bool(sep and name) and not metric.startswith(("loss", "pred_"))


def named_keys(table: TaskTable) -> list[str]:
    """The ``<set>/<metric>`` keys of the test blocks of the table's selected points, in the order
    the runs list them."""
    keys: dict[str, None] = {}
    for group in table.groups.values():
        for run in group.selected.runs if group.selected else []:
            for key in run.res.get("test") or {}:
                if _is_named(key):
                    keys.setdefault(key, None)
    return list(keys)


def point_stats(point: Point | None, key: str) -> tuple[float, float, int] | None:
    values = [v for v in (r.metric("test", key) for r in (point.runs if point else []) if r.counts) if v is not None]
    return (*mean_std(values), len(values)) if values else None


def _scale(key: str) -> float:
    return scale(key.partition("/")[2])


def markdown_section(tables: list[TaskTable]) -> list[str]:
    out: list[str] = []
    for t in tables:
        keys = named_keys(t)
        if not keys:
            continue
        if not out:
            out += [
                "",
                "## Named test sets",
                "",
                (
                    "results.json `test` metrics of named sets (e.g. the out-of-domain protocol's "
                    "`test/snli/accuracy`), each schedule at its selected setting, mean ± std over seeds "
                    "(× 100 for fractions). Selection never reads them."
                ),
            ]
        header = ["schedule", *keys, "average"]
        out += ["", f"**{t.col}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for sched, group in t.groups.items():
            line, means = [sched], []
            for key in keys:
                s = point_stats(group.selected, key)
                k = _scale(key)
                line.append(f"{k * s[0]:.2f} ± {k * s[1]:.2f} (n={s[2]})" if s else "—")
                if s:
                    means.append(k * s[0])
            line.append(f"{statistics.fmean(means):.2f}" if means and len(means) == len(keys) else "—")
            out.append("| " + " | ".join(line) + " |")
    return out


def report_json(tables: list[TaskTable]) -> list[dict]:
    return [
        {
            "task": t.col,
            "sets": {
                key: {
                    sched: (dict(zip(("mean", "std", "n"), s)) if (s := point_stats(g.selected, key)) else None)
                    for sched, g in t.groups.items()
                }
                for key in named_keys(t)
            },
        }
        for t in tables
        if named_keys(t)
    ]
