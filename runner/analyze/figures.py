"""The plots, CSV files and ``analysis.md`` sections of ``adaptune analyze``, one task at a time.

Each section gets a PNG and the CSV of exactly the numbers it plots. Schedules are ordered as in
the report (baseline first); seeds are pooled (histograms, heatmaps) or drawn as a band (pruning
curves: the mean over seeds with a min–max band).

Thresholds: (choice) sensitivities are compared against one reference per task, the median of the
sensitivities of *all* analysed runs of that task pooled (``ref``), so every schedule is measured
with the same ruler; "below" fractions are reported at ``ref`` × 10⁻³, 10⁻², 10⁻¹ and 1, and an
entry is *redundant* (heatmap) when its sensitivity is below ``ref`` × ``--redundant`` (default
10⁻²). Fractions come from the cached log10 histograms (0.05-decade bins).
"""

from __future__ import annotations

import csv
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from ..report.collect import schedule_key
from . import scores as S
from .compute import RunAnalysis

BELOW = (1e-3, 1e-2, 1e-1, 1.0)


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        return None
    return plt


def _save_png(plt, fig, png: Path, files: list[Path]) -> None:
    """Lay out, write and close ``fig``; its PNG goes first in ``files`` (before the CSVs)."""
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    files.insert(0, png)


def _write_csv(path: Path, header: Sequence[str], rows: list[Sequence[Any]]) -> Path:
    import io

    from ..checkpoint import atomic_write

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write(path, lambda f: f.write(buf.getvalue().encode()))
    return path


def _by_schedule(analyses: list[RunAnalysis]) -> dict[str, list[RunAnalysis]]:
    groups: dict[str, list[RunAnalysis]] = defaultdict(list)
    for a in analyses:
        groups[a.run.schedule].append(a)
    return {k: sorted(groups[k], key=lambda a: (a.run.seed is None, a.run.seed or 0)) for k in sorted(groups, key=schedule_key)}


def _fmt(values: list[float], scale: float = 100.0, spec: str = ".2f") -> str:
    values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not values:
        return "—"
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:{spec}}"
    return f"{mean:{spec}} ± {statistics.stdev(values) * scale:{spec}}"


def _run_hist(a: RunAnalysis) -> list[int] | None:
    weights = a.sensitivity()
    return S.pool(w["hist"] for w in weights.values()) if weights else None


def reference(analyses: list[RunAnalysis]) -> float | None:
    """The task's reference sensitivity: the median of all its analysed runs' entries pooled."""
    hists = [h for h in (_run_hist(a) for a in analyses) if h]
    return S.hist_quantile(S.pool(hists), 0.5) if hists else None


# ------------------------------------------------------------------------------ 1. distribution
def sensitivity_section(analyses, out: Path, suffix: str, title: str) -> tuple[list[Path], str]:
    groups, ref = _by_schedule(analyses), reference(analyses)
    if ref is None:
        return [], ""
    edges = S.bin_edges()
    rows, below_rows, curves = [], [], []
    for sched, runs in groups.items():
        hists = []
        for a in runs:
            h = _run_hist(a)
            if h is None:
                continue
            hists.append(h)
            for i, c in enumerate(h):
                if c:
                    lo = 0.0 if i == 0 else 10 ** edges[min(i, S.N_BINS) - 1]
                    hi = 10 ** edges[min(i, S.N_BINS)] if i <= S.N_BINS else math.inf
                    rows.append([title, sched, a.run.seed, f"{lo:.6g}", f"{hi:.6g}", c])
            for rel in BELOW:
                below_rows.append([title, sched, a.run.seed, rel, f"{ref * rel:.6g}", f"{S.fraction_below(h, ref * rel):.6f}"])
        if hists:
            curves.append((sched, len(hists), S.pool(hists)))
    files = [
        _write_csv(out / f"sensitivity_hist{suffix}.csv", ["task", "schedule", "seed", "bin_lo", "bin_hi", "count"], rows),
        _write_csv(
            out / f"sensitivity_below{suffix}.csv",
            ["task", "schedule", "seed", "threshold_rel", "threshold", "fraction_below"],
            below_rows,
        ),
    ]
    plt = _plt()
    png = out / f"sensitivity_hist{suffix}.png"
    if plt is not None and curves:
        fig, ax = plt.subplots(figsize=(7, 4))
        used = [i for _, _, h in curves for i, c in enumerate(h) if c and 0 < i <= S.N_BINS]
        lo, hi = (min(used), max(used)) if used else (1, S.N_BINS)
        for sched, n, h in curves:
            total = sum(h)
            xs = [10 ** (edges[i - 1] + S.LOG_STEP / 2) for i in range(lo, hi + 1)]
            ys = [h[i] / total for i in range(lo, hi + 1)]
            zeros = h[0] / total
            ax.step(xs, ys, where="mid", label=f"{sched} (n={n}{f', {zeros:.1%} zero' if zeros else ''})")
        ax.axvline(ref, color="grey", lw=0.8, ls="--", label="pooled median")
        ax.set_xscale("log")
        ax.set_xlabel("sensitivity |θ ⊙ ∇L| (mean over batches)")
        ax.set_ylabel("fraction of entries per 0.05-decade bin")
        ax.set_title(f"{title}: sensitivity of the SAGE-pattern weights")
        ax.legend(fontsize=8)
        _save_png(plt, fig, png, files)
    table = ["| schedule | " + " | ".join(f"< {r:g}·ref" for r in BELOW) + " |", "|---|" + "---|" * len(BELOW)]
    for sched, runs in groups.items():
        cells = []
        for rel in BELOW:
            cells.append(_fmt([S.fraction_below(h, ref * rel) for h in (_run_hist(a) for a in runs) if h]))
        table.append(f"| {sched} | " + " | ".join(cells) + " |")
    text = (
        f"### Sensitivity distribution\n\n![sensitivity]({png.name})\n\n"
        f"Percent of entries below multiples of the pooled median sensitivity ref = {ref:.3g} "
        f"(mean ± std over seeds; [{files[-1].name}]({files[-1].name}), [{files[-2].name}]({files[-2].name})):\n\n"
        + "\n".join(table)
        + "\n"
    )
    return files, text


# ------------------------------------------------------------------------------ 2. pruning
def pruning_section(
    analyses, out: Path, suffix: str, title: str, criteria: Sequence[str], main_metric: str, scope: str
) -> tuple[list[Path], str]:
    groups = _by_schedule(analyses)
    rows, series = [], {}
    for criterion in criteria:
        for sched, runs in groups.items():
            points: dict[float, list[float]] = defaultdict(list)
            for a in runs:
                for s, metrics in a.curve(criterion):
                    value = metrics.get(main_metric)
                    rows.append([title, sched, a.run.seed, criterion, s, main_metric, value])
                    if isinstance(value, (int, float)) and math.isfinite(value):
                        points[s].append(value)
            if points:
                series[(criterion, sched)] = sorted(points.items())
    if not rows:
        return [], ""
    files = [
        _write_csv(out / f"pruning{suffix}.csv", ["task", "schedule", "seed", "criterion", "sparsity", "metric", "value"], rows)
    ]
    plt = _plt()
    png = out / f"pruning{suffix}.png"
    if plt is not None and series:
        fig, axes = plt.subplots(1, len(criteria), figsize=(5.5 * len(criteria), 4), squeeze=False, sharey=True)
        for ax, criterion in zip(axes[0], criteria):
            for sched in groups:
                pts = series.get((criterion, sched))
                if not pts:
                    continue
                xs = [100 * s for s, _ in pts]
                (line,) = ax.plot(
                    xs,
                    [statistics.fmean(v) for _, v in pts],
                    marker="o",
                    ms=3,
                    label=f"{sched} (n={max(len(v) for _, v in pts)})",
                )
                ax.fill_between(xs, [min(v) for _, v in pts], [max(v) for _, v in pts], color=line.get_color(), alpha=0.2)
            ax.set_title(f"pruned by {criterion} ({scope})")
            ax.set_xlabel("sparsity of the SAGE-pattern weights (%)")
            ax.set_ylabel(f"dev {main_metric}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"{title}: pruning curves (mean, min–max over seeds)")
        _save_png(plt, fig, png, files)
    sparsities = sorted({s for pts in series.values() for s, _ in pts})
    table = [
        "| criterion | schedule | " + " | ".join(f"{100 * s:g}%" for s in sparsities) + " |",
        "|---|---|" + "---|" * len(sparsities),
    ]
    for (criterion, sched), pts in series.items():
        got = dict(pts)
        table.append(f"| {criterion} | {sched} | " + " | ".join(_fmt(got.get(s, []), 1.0, ".4f") for s in sparsities) + " |")
    text = (
        f"### Pruning curves\n\n![pruning]({png.name})\n\nDev {main_metric} (mean ± std over seeds; "
        f"[{files[-1].name}]({files[-1].name})):\n\n" + "\n".join(table) + "\n"
    )
    return files, text


# ------------------------------------------------------------------------------ 3. per layer
def layers_section(analyses, out: Path, suffix: str, title: str, redundant: float) -> tuple[list[Path], str]:
    groups, ref = _by_schedule(analyses), reference(analyses)
    if ref is None:
        return [], ""
    tau = ref * redundant
    names = {n for a in analyses for n in (a.sensitivity() or {})}
    decoder = any(S.layer_of(n)[0].startswith("dec ") for n in names)  # else "3", not "enc 3"
    rows = []
    cells: dict[str, dict[tuple[str, str], list[float]]] = {}
    for sched, runs in groups.items():
        acc: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])  # sum, below, n
        for a in runs:
            for name, w in (a.sensitivity() or {}).items():
                layer, sub = S.layer_of(name)
                layer = layer if decoder else layer.removeprefix("enc ")
                frac = S.fraction_below(w["hist"], tau)
                rows.append([title, sched, a.run.seed, name, layer, sub, w["numel"], f"{w['mean']:.6g}", f"{frac:.6f}"])
                cell = acc[(layer, sub)]
                cell[0] += w["mean"] * w["numel"]
                cell[1] += frac * w["numel"]
                cell[2] += w["numel"]
        if acc:
            cells[sched] = {k: [v[0] / v[2], v[1] / v[2]] for k, v in acc.items()}
    if not rows:
        return [], ""
    files = [
        _write_csv(
            out / f"layers{suffix}.csv",
            ["task", "schedule", "seed", "weight", "layer", "sublayer", "entries", "mean_sensitivity", "redundant_fraction"],
            rows,
        )
    ]
    layers = sorted({k[0] for c in cells.values() for k in c}, key=S.layer_sort_key)
    subs = sorted({k[1] for c in cells.values() for k in c}, key=S.sublayer_sort_key)
    plt = _plt()
    png = out / f"layers{suffix}.png"
    if plt is not None and cells:
        import numpy as np

        n = len(cells)
        fig, axes = plt.subplots(2, n, figsize=(1.0 + 0.55 * len(subs) * n + 1.2 * n, 1.5 + 0.7 * len(layers)), squeeze=False)
        mats = {
            s: [
                np.array([[c.get((lay, u), [math.nan, math.nan])[j] for u in subs] for lay in layers], dtype=float)
                for j in (0, 1)
            ]
            for s, c in cells.items()
        }
        logs = [np.log10(np.where(m[0] > 0, m[0], np.nan)) for m in mats.values()]
        vmin, vmax = np.nanmin([np.nanmin(x) for x in logs]), np.nanmax([np.nanmax(x) for x in logs])
        for col, (sched, (mean, red)) in enumerate(mats.items()):
            for row, (mat, kw, label) in enumerate(
                (
                    (
                        np.log10(np.where(mean > 0, mean, np.nan)),
                        {"vmin": vmin, "vmax": vmax, "cmap": "viridis"},
                        "log10 mean sensitivity",
                    ),
                    (red, {"vmin": 0.0, "vmax": 1.0, "cmap": "magma_r"}, f"redundant (< {redundant:g}·ref)"),
                )
            ):
                ax = axes[row][col]
                im = ax.imshow(mat, aspect="auto", **kw)
                ax.set_xticks(range(len(subs)), subs, rotation=60, fontsize=7)
                ax.set_yticks(range(len(layers)), layers, fontsize=7)
                ax.set_title(f"{sched}: {label}", fontsize=8)
                fig.colorbar(im, ax=ax, fraction=0.046)
        fig.suptitle(f"{title}: per layer (seeds pooled)")
        _save_png(plt, fig, png, files)
    table = ["| schedule | mean sensitivity | redundant |", "|---|---|---|"]
    for sched, runs in groups.items():
        means, reds = [], []
        for a in runs:
            ws = a.sensitivity() or {}
            total = sum(w["numel"] for w in ws.values()) or 1
            means.append(sum(w["mean"] * w["numel"] for w in ws.values()) / total)
            reds.append(sum(S.fraction_below(w["hist"], tau) * w["numel"] for w in ws.values()) / total)
        table.append(f"| {sched} | {_fmt(means, 1.0, '.3g')} | {_fmt(reds)}% |")
    text = (
        f"### Per layer\n\n![layers]({png.name})\n\nRedundant: sensitivity below {redundant:g} × ref = "
        f"{tau:.3g}. Over all analysed weights (mean ± std over seeds; [{files[-1].name}]({files[-1].name})):\n\n"
        + "\n".join(table)
        + "\n"
    )
    return files, text
