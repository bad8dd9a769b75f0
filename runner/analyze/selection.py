"""Section 4 of ``adaptune analyze``: which entries DPS trained, from the selection record that
``schedules/dps/algorithm.py`` keeps in ``last.pt`` (per entry the number of selection phases it
was kept in; the overlap of consecutive masks)."""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from .figures import _by_schedule, _plt, _save_png, _write_csv


def selected_fraction_counts(record: dict[str, Any]) -> list[int]:
    """How many entries were kept in 0, 1, ..., n of the run's n selection phases."""
    n = record["selections"]
    counts = torch.zeros(n + 1, dtype=torch.long)
    for t in record["selected"].values():
        counts += torch.bincount(t.reshape(-1).long().clamp(0, n), minlength=n + 1)
    return counts.tolist()


def dps_section(analyses, records: dict[str, dict], out: Path, suffix: str, title: str) -> tuple[list[Path], str]:
    """``records``: run key -> :func:`adaptune.runner.analyze.load.dps_record` of the runs that have one."""
    groups = {s: [a for a in runs if a.run.key in records] for s, runs in _by_schedule(analyses).items()}
    groups = {s: runs for s, runs in groups.items() if runs}
    if not groups:
        return [], ""
    hist_rows, overlap_rows, bars, lines = [], [], [], []
    for sched, runs in groups.items():
        pooled: dict[float, int] = defaultdict(int)
        for a in runs:
            rec = records[a.run.key]
            n = rec["selections"]
            for k, c in enumerate(selected_fraction_counts(rec)):
                hist_rows.append([title, sched, a.run.seed, n, k, f"{k / n:.6g}", c])
                pooled[k / n] += c
            for i, v in enumerate(rec["overlaps"]):
                overlap_rows.append([title, sched, a.run.seed, i + 2, f"{v:.6f}"])
            lines.append((f"{sched} seed {a.run.seed}", rec["overlaps"]))
        total = sum(pooled.values()) or 1
        bars.append((sched, len(runs), sorted((f, c / total) for f, c in pooled.items())))
    files = [
        _write_csv(
            out / f"dps_selection{suffix}.csv",
            ["task", "schedule", "seed", "selection_phases", "kept_in", "fraction", "entries"],
            hist_rows,
        ),
        _write_csv(
            out / f"dps_overlap{suffix}.csv",
            ["task", "schedule", "seed", "selection_phase", "overlap_with_previous"],
            overlap_rows,
        ),
    ]
    plt = _plt()
    png = out / f"dps_selection{suffix}.png"
    if plt is not None:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        width = 0.8 / max(len(bars), 1)
        for j, (sched, n, pts) in enumerate(bars):
            xs = list(range(len(pts)))
            ax1.bar(
                [x + (j - (len(bars) - 1) / 2) * width for x in xs], [c for _, c in pts], width=width, label=f"{sched} (n={n})"
            )
            ax1.set_xticks(xs, [f"{f:.2g}" for f, _ in pts], fontsize=7)
        ax1.set_xlabel("fraction of selection phases an entry was kept in")
        ax1.set_ylabel("fraction of entries")
        ax1.legend(fontsize=8)
        for label, ys in lines:
            if ys:
                ax2.plot(range(2, len(ys) + 2), ys, marker="o", ms=3, label=label)
        ax2.set_xlabel("selection phase (vs the previous one)")
        ax2.set_ylabel("overlap |M_k ∧ M_prev| / |M_k|")
        if any(ys for _, ys in lines):
            ax2.legend(fontsize=7)
        else:
            ax2.text(0.5, 0.5, "one selection phase: no overlap", ha="center", transform=ax2.transAxes)
        fig.suptitle(f"{title}: DPS selection")
        _save_png(plt, fig, png, files)
    table = ["| schedule | runs | selection phases | never kept | always kept | mean overlap |", "|---|---|---|---|---|---|"]
    for sched, runs in groups.items():
        never, always, overlaps, phases = [], [], [], set()
        for a in runs:
            rec = records[a.run.key]
            counts = selected_fraction_counts(rec)
            total = sum(counts) or 1
            never.append(counts[0] / total)
            always.append(counts[-1] / total)
            overlaps += rec["overlaps"]
            phases.add(rec["selections"])
        mean_overlap = f"{statistics.fmean(overlaps):.3f}" if overlaps else "—"
        table.append(
            f"| {sched} | {len(runs)} | {', '.join(map(str, sorted(phases)))} | "
            f"{100 * statistics.fmean(never):.1f}% | {100 * statistics.fmean(always):.1f}% | {mean_overlap} |"
        )
    text = (
        f"### DPS selection\n\n![dps selection]({png.name})\n\n"
        f"([{files[-2].name}]({files[-2].name}), [{files[-1].name}]({files[-1].name}))\n\n" + "\n".join(table) + "\n"
    )
    return files, text
