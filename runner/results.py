"""``results.json``: what a finished run reports, and whether a run directory holds one.

A run ends ``completed`` or ``diverged`` (a non-finite loss; the results then hold the evaluations
made before it). Either way ``degenerate`` says why the run's outcome is not a trained model
(``"predicts one class ('0') for every dev example"``, ``"diverged: loss became nan at step 5"``)
or is null, so that reports count such runs instead of silently averaging them in.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .loop import Trainer

log = logging.getLogger("adaptune")

#: statuses of a run that is over: re-running it with resume=auto returns its results.json
FINISHED = ("completed", "diverged")
ADVICE = (
    "try another learning rate (schedule.lr: too low never leaves the majority class, too high "
    "collapses to it) or more steps (trainer.epochs / trainer.max_steps)"
)


def results_complete(run_dir: Path) -> dict | None:
    """The results of a finished run in ``run_dir``, or None."""
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        return None
    try:
        results = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return results if results.get("status") in FINISHED else None


def collect(
    trainer: Trainer, final: dict, test: dict | None, status: str = "completed", degenerate: str | None = None
) -> dict[str, Any]:
    """The results of ``trainer``'s run; a completed run's degeneracy comes from its task."""
    st, sections = trainer.state, trainer.sections
    if status == "completed" and final:
        degenerate = trainer.task.degenerate(final)
        if degenerate:
            log.warning("degenerate run: %s; %s", degenerate, ADVICE)
    return {
        "status": status,
        "degenerate": degenerate,
        "task": trainer.task.kind,
        "task_name": sections.task.name,
        # a preset may label a variant (schedule=dps_mix: "dps_mix") for reports
        "schedule": sections.schedule.label or sections.schedule.name,
        "seed": sections.root.seed,
        "main_metric": trainer.task.main_metric,
        "greater_is_better": trainer.task.greater_is_better,
        "final": final,
        "best": st.best_metrics,
        "best_step": st.best_step,
        "test": test,
        "steps": st.step,
        "total_steps": trainer.total_steps,
        "epochs": st.step / trainer.steps_per_epoch,
        "train_time_s": st.train_time,
        "samples_per_s": st.samples / max(st.train_time, 1e-9),
        "precision": trainer.precision,
        # fp16: steps skipped for overflowed gradients (no update; DPS adds nothing to its scores)
        "fp16_overflow_steps": list(st.overflow_steps),
        "evals": st.evals,
        "train_loss": st.train_loss,
        "task_summary": trainer.task.summary(),
        "config": sections.resolved,
    }
