"""Training schedules: ``baseline``, ``sage``, ``dps`` and the DPS paper's baselines
``childtuning_d``, ``childtuning_f``, ``mixout``, all behind :class:`adaptune.schedules.base.Schedule`."""

from __future__ import annotations

import importlib
from typing import Any, Mapping

from adaptune.common.errors import ConfigError
from adaptune.common.schema import field_of

from .base import OPTIMIZERS, Schedule, optimizer_class, register_optimizer
from .config import SCHEDULE_SCHEMAS, ScheduleConfig

# name -> "module:Class"; imported on demand so that importing one schedule never costs the others.
# Each class builds its config with its own schema (``Schedule.schema``: SCHEDULE_SCHEMAS[name]).
SCHEDULES = {
    "baseline": "adaptune.schedules.baseline:BaselineSchedule",
    "sage": "adaptune.schedules.sage:SAGESchedule",
    "dps": "adaptune.schedules.dps:DPSSchedule",
    "childtuning_d": "adaptune.schedules.childtuning:ChildTuningDSchedule",  # the DPS paper's baselines
    "childtuning_f": "adaptune.schedules.childtuning:ChildTuningFSchedule",
    "mixout": "adaptune.schedules.mixout:MixoutSchedule",
}


def build_schedule(cfg: ScheduleConfig | Mapping[str, Any]) -> Schedule:
    """Instantiate the schedule named by ``cfg.name`` (a mapping, a DictConfig or an instance of
    the schedule's schema, :data:`~adaptune.schedules.config.SCHEDULE_SCHEMAS`)."""
    name = field_of(cfg, "name")
    if name not in SCHEDULES or name not in SCHEDULE_SCHEMAS:
        raise ConfigError(f"schedule.name='{name}' is unknown; allowed: {', '.join(SCHEDULES)}")
    module, cls = SCHEDULES[name].split(":")
    return getattr(importlib.import_module(module), cls)(cfg)


__all__ = ["ConfigError", "OPTIMIZERS", "SCHEDULES", "Schedule", "build_schedule", "optimizer_class", "register_optimizer"]
