"""Tasks: GLUE-style text classification, NMT (fairseq), image classification (timm)."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from adaptune.common.errors import ConfigError
from adaptune.common.schema import field_of

from .base import StepLoss, Task

# task.kind -> "module:Class"; imported on demand (fairseq and timm are heavy and fairseq has
# import side effects, see tasks/nmt.py).
TASKS = {
    "glue": "adaptune.tasks.glue:GlueTask",
    "nmt": "adaptune.tasks.nmt:TranslationTask",
    "vit": "adaptune.tasks.vit:ImageClassificationTask",
}


def build_task(cfg: Any, run_dir: Path, seed: int) -> Task:
    """The task of kind ``cfg.kind``, from a mapping, a DictConfig or a schema instance
    (``tasks/config.py``)."""
    kind = field_of(cfg, "kind")
    if kind not in TASKS:
        raise ConfigError(f"task.kind='{kind}' is unknown; allowed: {', '.join(TASKS)}")
    module, cls = TASKS[kind].split(":")
    return getattr(importlib.import_module(module), cls)(cfg, run_dir=run_dir, seed=seed)


__all__ = ["ConfigError", "StepLoss", "TASKS", "Task", "build_task"]
