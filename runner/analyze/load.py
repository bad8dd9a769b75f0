"""Finding the runs of a directory and rebuilding one run's task and trained model.

A run is what ``adaptune report`` finds (:func:`adaptune.runner.report.collect.collect`) that has a
checkpoint. Its task and model are rebuilt by the components the training loop builds them with
(:func:`adaptune.runner.components.build_components`) from the config the run saved
(``results.json``'s ``config``, else the checkpoint's): the same task setup, model, device and
precision, so that an evaluation here is the evaluation the run made. The schedule is not built:
its model changes (the mix wrappers, dropout off) are the identity in eval mode, where every
analysis runs, and the checkpoint stores plain weight names. (choice) Only what cannot matter is changed: no
callbacks or logger, no progress bar, ``trainer.device`` / ``trainer.num_threads`` from the command
line, and for translation the dev BLEU cap (``--max-sentences``). The weights come from
``checkpoints/best.pt``, else ``last.pt``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adaptune.common.errors import ConfigError

from .. import checkpoint as ckpt
from ..report.collect import Run, collect, label_runs, load_plan

log = logging.getLogger("adaptune")


@dataclass
class AnalysedRun:
    run: Run
    key: str  # a file-name-safe id, unique under the analysed directory
    checkpoint: Path  # best.pt, else last.pt
    config: dict
    label: str = ""  # the schedule's row: "sage", or "sage (lr=5e-4)" with --settings all

    @property
    def task(self) -> str:
        """The report's task column (``glue/rte``, ``glue/rte [task.train_subset=500]``)."""
        return self.run.col or self.run.task

    @property
    def schedule(self) -> str:
        return self.label or self.run.schedule

    @property
    def seed(self) -> int | None:
        return self.run.seed

    def stamp(self) -> dict[str, Any]:
        """What identifies the weights: the checkpoint's name, size and modification time."""
        stat = self.checkpoint.stat()
        return {"checkpoint": self.checkpoint.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def checkpoint_of(run_dir: Path) -> Path | None:
    for name in (ckpt.BEST, ckpt.LAST):
        path = run_dir / "checkpoints" / name
        if path.is_file():
            return path
    return None


def _key(root: Path, run_dir: Path) -> str:
    rel = run_dir.resolve().relative_to(root.resolve()) if run_dir != root else Path(run_dir.name)
    return "__".join(rel.parts) or run_dir.name


def _selected(runs: list[Run], root: Path) -> set[Path] | None:
    """Directories of the runs at each schedule's selected setting (``adaptune report``'s rule), or
    None when nothing can be selected (e.g. no completed run)."""
    from ..report.selection import build

    try:
        tables = build([r for r in runs if r.res.get("main_metric")], "final", load_plan(root))
    except Exception:  # noqa: BLE001 - incomplete results: analyse every run
        return None
    chosen = {r.dir for t in tables for g in t.groups.values() if g.selected for r in g.selected.runs}
    return chosen or None


def find_runs(root: Path, settings: str = "selected") -> list[AnalysedRun]:
    """Runs under ``root`` (or ``root`` itself) with a checkpoint; ConfigError naming ``root`` when
    there is none. Where a schedule ran a grid, ``settings="selected"`` keeps the setting that
    ``adaptune report`` selects per task (choice: the comparison the report makes, at a fraction of
    the cost); ``"all"`` keeps every setting, each its own row."""
    from ..resume import saved_config

    if not root.is_dir():
        raise ConfigError(f"{root} is not a directory")
    runs, _ = collect(root)
    label_runs(runs, load_plan(root))
    chosen = _selected(runs, root) if settings == "selected" else None
    out = []
    for run in runs:
        if chosen is not None and run.dir not in chosen and run.res.get("main_metric"):
            continue
        path = checkpoint_of(run.dir)
        if path is None or "analysis" in run.dir.relative_to(root).parts:
            continue
        config = saved_config(run.dir, run.res)
        if config is None:
            log.warning("%s: no saved config (results.json or last.pt); skipped", run.dir)
            continue
        label = run.sched + (f" ({run.setting_label})" if settings == "all" and run.setting_label else "")
        out.append(AnalysedRun(run, _key(root, run.dir), path, config, label))
    if not out:
        raise ConfigError(f"no run with a checkpoint (checkpoints/best.pt or last.pt) under {root}")
    return out


def rebuild(run: AnalysedRun, device: str | None = None, max_sentences: int | None = None):
    """The run's task and model with the checkpoint's weights loaded, for evaluation
    (:class:`~adaptune.runner.components.Evaluator`: no optimizer, schedule, process group or callbacks)."""
    from omegaconf import OmegaConf

    from ..components import Evaluator

    config = {k: v for k, v in run.config.items() if k != "hydra"}
    cfg = OmegaConf.create(config)
    cfg.callbacks = None
    cfg.trainer.progress = False
    if device is not None:
        cfg.trainer.device = device
    cfg.trainer.num_threads = int(os.environ.get("OMP_NUM_THREADS") or cfg.trainer.num_threads)
    if max_sentences is not None and cfg.task.get("kind") == "nmt":
        cfg.task.eval_bleu_max_sentences = int(max_sentences)
    evaluator = Evaluator(cfg, run.run.dir)
    ckpt.load_weights(evaluator.model, ckpt.load(run.checkpoint, map_location=evaluator.device), run.checkpoint)
    return evaluator


def dps_record(run: AnalysedRun) -> dict[str, Any] | None:
    """The DPS selection record saved in ``last.pt`` (``schedules/dps/algorithm.py``): per weight the
    counts of selection phases each entry was kept in, the number of phases and the overlaps of
    consecutive masks; None for a run without DPS or a checkpoint from before the record existed."""
    path = run.run.dir / "checkpoints" / ckpt.LAST
    if not path.is_file():
        return None
    data = ckpt.peek(path)
    state = data.get("schedule") or {}
    if "selected" not in state or not state.get("selections"):
        return None
    return {
        "selected": dict(state["selected"]),
        "selections": int(state["selections"]),
        "overlaps": [float(v) for v in state.get("overlaps", [])],
    }
