"""``adaptune analyze RUN_OR_SWEEP_DIR``: what the schedules did to the network.

For every run under the directory (a run: ``results.json`` and ``checkpoints/``, found as
``adaptune report`` finds them) the run's task and model are rebuilt from its saved config and its
``checkpoints/best.pt`` (else ``last.pt``) is loaded (:mod:`.load`). Written to
``<dir>/analysis/``, a PNG and a CSV per plot and ``analysis.md`` embedding them, per task:

1. the distribution of the sensitivity ``|θ ⊙ ∇L|`` of the SAGE-pattern weights (the encoder's
   linear weights), accumulated over ``--max-batches`` batches of ``--split`` (:mod:`.scores`), a
   log-scale histogram per schedule (seeds pooled) and the fraction of entries below thresholds;
2. pruning curves: the ``--sparsities`` lowest-scoring entries of those weights zeroed by
   sensitivity and by magnitude (``--criteria``; per tensor, or ``--scope global``), the task's
   main dev metric through the runner's evaluation (``runner/evaluation.py``), mean and min–max
   band over seeds;
3. per layer and sub-layer (query/key/value/attention output/FFN in/out): mean sensitivity and the
   fraction of redundant entries, as heatmaps;
4. for DPS runs: how often each entry was selected, and the overlap of consecutive masks.

Results are cached per run (``analysis/cache/``, :mod:`.compute`): a re-run computes only what is
missing, and a new checkpoint (other size or time) invalidates its run's entries.
"""

from __future__ import annotations

import argparse
import logging
import re
from collections import defaultdict
from pathlib import Path

from adaptune.common.errors import ConfigError

from .compute import CRITERIA, Options, RunAnalysis
from .load import AnalysedRun, dps_record, find_runs

__all__ = ["AnalysedRun", "Options", "RunAnalysis", "analyze", "find_runs", "main"]

log = logging.getLogger("adaptune")
SPLITS = ("dev", "train", "test")
SCOPES = ("layer", "global")


def _sparsities(text: str) -> tuple[float, ...]:
    try:
        values = sorted({float(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise ConfigError(f"--sparsities={text!r}: expected percentages separated by commas, e.g. 0,10,50,90") from None
    if not values or any(not 0 <= v <= 100 for v in values):
        raise ConfigError(f"--sparsities={text!r}: each value must be a percentage in [0, 100]")
    return tuple(v / 100 for v in values)


def _criteria(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
    bad = [n for n in names if n not in CRITERIA]
    if bad or not names:
        raise ConfigError(f"--criteria={text!r}: '{(bad or [''])[0]}' is unknown; allowed: {', '.join(CRITERIA)}")
    return names


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def analyze(
    root: Path, opts: Options, redundant: float = 1e-2, progress: bool = True, settings: str = "selected"
) -> tuple[str, list[Path]]:
    """Compute what is missing and write ``<root>/analysis/``; returns (analysis.md, files written)."""
    from .figures import layers_section, pruning_section, sensitivity_section
    from .selection import dps_section

    runs = find_runs(root, settings)
    out = root / "analysis"
    analyses = [RunAnalysis(r, out / "cache", opts) for r in runs]
    total = sum(a.evaluations_missing() for a in analyses)
    bar = None
    if progress and total:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="analyze", unit="eval", dynamic_ncols=True)
    skipped: list[str] = []
    done: list[RunAnalysis] = []
    try:
        for a in analyses:
            if bar is not None:
                bar.set_postfix_str(f"{a.run.schedule} seed {a.run.seed}")
            try:
                a.compute(advance=bar.update if bar is not None else lambda: None)
            except ConfigError as err:
                skipped.append(f"{a.run.key}: {err}")
                log.warning("analyze: skipped %s: %s", a.run.run.dir, err)
                continue
            done.append(a)
    finally:
        if bar is not None:
            bar.close()
    if not done:
        raise ConfigError(f"no run under {root} could be analysed ({skipped[0]})")
    records = {a.run.key: rec for a in done if (rec := dps_record(a.run)) is not None}
    by_task: dict[str, list[RunAnalysis]] = defaultdict(list)
    for a in done:
        by_task[a.run.task].append(a)
    files: list[Path] = []
    parts = [_header(root, opts, redundant, done, settings)]
    for task, group in sorted(by_task.items()):
        suffix = "" if len(by_task) == 1 else "_" + _slug(task)
        main_metric = next(
            (
                m
                for a in group
                for m in ((a.results.get("dense") or {}).get("main_metric"), a.run.run.res.get("main_metric"))
                if m
            ),
            "main",
        )
        parts.append(f"## {task}\n")
        for written, text in (
            sensitivity_section(group, out, suffix, task),
            pruning_section(group, out, suffix, task, opts.criteria, main_metric, opts.scope),
            layers_section(group, out, suffix, task, redundant),
            dps_section(group, records, out, suffix, task),
        ):
            files += written
            if text:
                parts.append(text)
        no_record = [a for a in group if a.run.schedule.startswith("dps") and a.run.key not in records]
        if no_record:
            parts.append(
                f"{len(no_record)} DPS run(s) have no selection record in last.pt (trained before "
                "it was recorded, or no selection phase was reached).\n"
            )
    if skipped:
        parts.append("## Skipped runs\n\n" + "\n".join(f"- {s}" for s in skipped) + "\n")
    parts.append(_caveats())
    text = "\n".join(parts)
    from ..checkpoint import atomic_write

    atomic_write(out / "analysis.md", lambda f: f.write(text.encode()))
    return text, [out / "analysis.md", *files]


def _header(root: Path, opts: Options, redundant: float, done: list[RunAnalysis], settings: str) -> str:
    ckpts = sorted({a.run.checkpoint.name for a in done})
    which = (
        "each schedule at the setting `adaptune report` selects" if settings == "selected" else "every setting of every schedule"
    )
    return (
        f"# Redundancy analysis: {root}\n\n"
        f"{len(done)} run(s) ({which}), weights from {' / '.join(ckpts)}. Weights analysed: the 2-D tensors matched by "
        f"the model family's SAGE patterns. Sensitivity |θ ⊙ ∇L|: mean over {opts.max_batches} "
        f"{opts.split} batch(es) of the per-batch value (model in eval mode). Pruning: the lowest-scoring "
        f"entries zeroed {'per tensor' if opts.scope == 'layer' else 'over all analysed tensors at once'}, "
        f"then the dev set evaluated as in training"
        f"{f' (NMT BLEU on at most {opts.max_sentences} sentences)' if opts.max_sentences else ''}. "
        f"ref: the median sensitivity of all analysed runs of a task pooled; redundant: below "
        f"{redundant:g} × ref.\n"
    )


def _caveats() -> str:
    return (
        "## Reading this\n\n"
        "- Sensitivities are of the *trained* weights on a few batches: they show where the loss is "
        "locally flat, not what each entry contributed during training.\n"
        "- Pruning curves zero entries without retraining; they compare how much each schedule's model "
        "relies on its low-scoring entries. With few seeds and a small dev set, overlapping bands mean "
        "no difference is shown.\n"
        "- Absolute sensitivities scale with the loss and the learning rate's end point; compare schedules "
        "within a task, against the same ref.\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adaptune analyze", description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path, help="a run directory or a sweep directory holding runs")
    parser.add_argument(
        "--max-batches",
        type=int,
        default=Options.max_batches,
        help="batches over which the sensitivity is accumulated (default %(default)s)",
    )
    parser.add_argument(
        "--sparsities",
        default="0,10,20,30,40,50,60,70,80,90",
        help="pruning levels in percent, comma-separated (default %(default)s)",
    )
    parser.add_argument("--split", choices=SPLITS, default="dev", help="batches for the sensitivity (default dev)")
    parser.add_argument("--criteria", default=",".join(CRITERIA), help="pruning scores (default %(default)s)")
    parser.add_argument(
        "--scope",
        choices=SCOPES,
        default="layer",
        help="prune the same fraction of every tensor (layer, default) or the lowest over all (global)",
    )
    parser.add_argument(
        "--redundant",
        type=float,
        default=1e-2,
        help="redundant: sensitivity below this times the task's pooled median (default %(default)s)",
    )
    parser.add_argument(
        "--max-sentences",
        type=int,
        default=None,
        help="NMT: dev sentences translated for BLEU per evaluation (default: the run's own cap)",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: the run's trainer.device)")
    parser.add_argument(
        "--settings",
        choices=("selected", "all"),
        default="selected",
        help="where a schedule ran a grid: the setting the report selects (default) or all",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        if args.max_batches < 1:
            raise ConfigError(f"--max-batches must be a positive integer, got {args.max_batches}")
        if args.max_sentences is not None and args.max_sentences < 1:
            raise ConfigError(f"--max-sentences must be a positive integer, got {args.max_sentences}")
        if not args.redundant > 0:
            raise ConfigError(f"--redundant must be positive, got {args.redundant}")
        opts = Options(
            split=args.split,
            max_batches=args.max_batches,
            sparsities=_sparsities(args.sparsities),
            criteria=_criteria(args.criteria),
            scope=args.scope,
            max_sentences=args.max_sentences,
            device=args.device,
        )
        _, written = analyze(args.directory, opts, args.redundant, progress=not args.no_progress, settings=args.settings)
    except ConfigError as err:
        print(f"adaptune analyze: error: {err}")
        return 2
    print(f"wrote {written[0]} and {len(written) - 1} plot/CSV file(s) in {written[0].parent}")
    return 0
