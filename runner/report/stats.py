"""Paired statistics: schedules run with the same seeds (same data order and initial head), so
each schedule's per-seed result is compared with the baseline's result for the same seed."""

from __future__ import annotations

import math
import statistics
import warnings

from .selection import TaskTable

#: the text the report prints next to the interval
CI_METHOD = "95% CI: mean ± t(0.975, n-1) · sd / √n (Student t, paired differences)"


def _finite(x) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def paired(a: list[float], b: list[float], greater: bool = True) -> dict:
    """Statistics of the per-seed differences ``a - b``: their mean, its t-based 95% interval,
    the paired t-test's p-value (``scipy.stats.ttest_rel``; none where the differences have no
    spread, except 1 when they are all zero), Wilcoxon's signed-rank p-value where n >= 6, and
    wins / losses / ties (a win is better in the metric's direction)."""
    from scipy import stats

    d = [float(x) - float(y) for x, y in zip(a, b, strict=True)]
    n = len(d)
    out = {
        "n": n,
        "mean": statistics.fmean(d) if d else None,
        "sd": None,
        "ci95": None,
        "p_ttest_rel": None,
        "p_wilcoxon": None,
        "wins": sum((x > 0) if greater else (x < 0) for x in d),
        "losses": sum((x < 0) if greater else (x > 0) for x in d),
        "ties": sum(x == 0 for x in d),
    }
    if n >= 2:
        sd = statistics.stdev(d)
        half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
        out.update(sd=sd, ci95=[out["mean"] - half, out["mean"] + half])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # (choice) differences equal up to float rounding (e.g. 0.755 - 0.8017 and 0.7383 - 0.785)
            # have no spread: a t-test would turn the rounding noise into a p-value of ~1e-16
            if sd > 1e-9 * max(1.0, abs(out["mean"])):
                out["p_ttest_rel"] = _finite(stats.ttest_rel(a, b).pvalue)
            elif out["mean"] == 0:
                out["p_ttest_rel"] = 1.0
            if n >= 6 and any(d):
                out["p_wilcoxon"] = _finite(stats.wilcoxon(d).pvalue)
    return out


#: the text the report prints under the main table for the average column's interval
AVERAGE_CI_METHOD = (
    "average: the mean over tasks of each task's mean over seeds; [95% interval]: percentile "
    "bootstrap over seeds, resampled within each task (scipy.stats.bootstrap, 9,999 resamples)"
)


def average_interval(per_task: list[list[float]], n_resamples: int = 9999, seed: int = 0) -> list[float] | None:
    """The 95% percentile-bootstrap interval of the cross-task average (mean over tasks of each
    task's mean over seeds), each task's seeds resampled independently (``scipy.stats.bootstrap``
    with one sample per task). None when a task has fewer than 2 seeds (nothing to resample) or
    the values have no spread. **(choice)** Percentile rather than BCa: with 3-10 seeds BCa's
    jackknife is unstable and fails on ties; seeded, so a report is reproducible."""
    if not per_task or any(len(v) < 2 for v in per_task):
        return None
    if all(max(v) == min(v) for v in per_task):
        return None
    import numpy as np
    from scipy import stats

    def average(*samples, axis=-1):
        return np.mean([np.mean(x, axis=axis) for x in samples], axis=0)

    res = stats.bootstrap(
        [np.asarray(v, dtype=float) for v in per_task],
        average,
        n_resamples=n_resamples,
        confidence_level=0.95,
        method="percentile",
        vectorized=True,
        random_state=np.random.default_rng(seed),
    )
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return [low, high] if math.isfinite(low) and math.isfinite(high) else None


def _all_degenerate(point) -> bool:
    counted = [run for run in point.runs if run.counts and run not in point.failed]
    return bool(counted) and all(run.degenerate for run in counted)


def paired_to_baseline(table: TaskTable) -> list[dict]:
    """Per schedule (at its selected setting) against the baseline (at its selected setting):
    the seeds both have a reported value for, the differences (schedule − baseline) and
    :func:`paired`'s statistics. Nothing when the task has no baseline or one baseline is ambiguous."""
    refs = [s for s in table.groups if s.split(" (")[0] == "baseline"]
    if len(refs) != 1 or table.groups[refs[0]].selected is None:
        return []
    base = table.groups[refs[0]].selected.per_seed("reported")
    out = []
    for sched, group in table.groups.items():
        if sched == refs[0] or group.selected is None:
            continue
        mine = group.selected.per_seed("reported")
        seeds = sorted(s for s in mine if s in base and s is not None)
        if not seeds:
            continue
        a, b = [mine[s] for s in seeds], [base[s] for s in seeds]
        row = {
            "schedule": sched,
            "baseline": refs[0],
            "seeds": seeds,
            "differences": [x - y for x, y in zip(a, b)],
            "schedule_values": a,
            "baseline_values": b,
        }
        row.update(paired(a, b, table.greater))
        # (choice) two arms that are both degenerate in every run compare two constant predictors:
        # no p-value (a t-test of equal constants prints p = 1.000, which reads as evidence)
        row["both_degenerate"] = all(_all_degenerate(p) for p in (group.selected, table.groups[refs[0]].selected))
        if row["both_degenerate"]:
            row["p_ttest_rel"] = row["p_wilcoxon"] = None
        out.append(row)
    return out
