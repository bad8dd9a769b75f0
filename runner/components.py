"""The objects a run is made of, built in one place for training and for evaluation.

:func:`build_components` turns a validated config into the seeded task (data read), its model
(prepared by the schedule when one is given, on the device) and the model's parameter patterns,
with the precision the device gets. The :class:`~adaptune.runner.loop.Trainer` adds the optimizer,
schedule, process group and callbacks on top; :class:`Evaluator` adds only evaluation, which is all
``adaptune analyze`` and ``adaptune export`` need from a finished run (no optimizer state, no
process group, no callbacks).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adaptune.common.errors import ConfigError
from adaptune.tasks import build_task

from .precision import Precision, autocast_context


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={name} but no CUDA device is available; use trainer.device=cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Components:
    device: torch.device
    amp: Precision
    task: Any
    model: torch.nn.Module
    patterns: Any

    @property
    def precision(self) -> str:
        return self.amp.name


def build_components(sections, run_dir: Path, device: torch.device, schedule=None) -> Components:
    """Seed, build and set up the task, build its model (``schedule.prepare_model`` first, when
    a schedule is given: dropout off, the mix wrappers) and move it to ``device``."""
    if device.type == "cpu":
        torch.set_num_threads(sections.trainer.num_threads)
    amp = Precision(sections.trainer.precision, device)
    seed_everything(sections.root.seed)
    task = build_task(sections.task, Path(run_dir), sections.root.seed)
    task.setup()
    model = task.build_model()
    patterns = task.param_patterns(model)
    if schedule is not None:
        schedule.prepare_model(model, patterns)
    model.to(device)
    return Components(device, amp, task, model, patterns)


class Evaluator:
    """A finished run's task and model, for evaluation only: ``model``, ``task``, ``patterns``,
    ``device``, ``precision`` and :meth:`evaluate`, as the trainer has them."""

    def __init__(self, cfg, run_dir: Path, device: str | None = None):
        from .validate import validate_config

        sections = validate_config(cfg)
        parts = build_components(sections, run_dir, resolve_device(device or sections.trainer.device))
        self.device, self.amp, self.task, self.model, self.patterns = (
            parts.device,
            parts.amp,
            parts.task,
            parts.model,
            parts.patterns,
        )
        self.precision = parts.precision
        self.workers = sections.trainer.num_workers

    def evaluate(self, split: str = "dev") -> dict[str, float]:
        from .evaluation import evaluate

        return evaluate(
            self.task,
            self.model,
            split,
            device=self.device,
            autocast=lambda: autocast_context(self.precision, self.device),
            num_workers=self.workers,
        )
