"""Training schedules: ``baseline``, ``sage``, ``dps`` and the DPS paper's baselines
``childtuning_d``, ``childtuning_f``, ``mixout``, all behind :class:`schedules.base.Schedule`."""
from __future__ import annotations

import importlib
from typing import Any, Mapping

from common.errors import ConfigError
from common.schema import field_of

from .base import OPTIMIZERS, Schedule, optimizer_class, register_optimizer
from .config import ScheduleConfig

# name -> "module:Class"; imported on demand so that importing one schedule never costs the others.
SCHEDULES = {
    "baseline": "schedules.baseline:BaselineSchedule",
    "sage": "schedules.sage:SAGESchedule",
    "dps": "schedules.dps:DPSSchedule",
    "childtuning_d": "schedules.childtuning:ChildTuningDSchedule",   # the DPS paper's baselines
    "childtuning_f": "schedules.childtuning:ChildTuningFSchedule",
    "mixout": "schedules.mixout:MixoutSchedule",
}


def build_schedule(cfg: ScheduleConfig | Mapping[str, Any]) -> Schedule:
    """Instantiate the schedule named by ``cfg.name`` (a mapping, a DictConfig or a
    :class:`~schedules.config.ScheduleConfig`)."""
    name = field_of(cfg, "name")
    if name not in SCHEDULES:
        raise ConfigError(f"schedule.name='{name}' is unknown; allowed: {', '.join(SCHEDULES)}")
    module, cls = SCHEDULES[name].split(":")
    return getattr(importlib.import_module(module), cls)(cfg)


__all__ = ["ConfigError", "OPTIMIZERS", "SCHEDULES", "Schedule", "build_schedule", "optimizer_class",
           "register_optimizer"]
