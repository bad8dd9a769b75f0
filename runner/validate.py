"""The composed config checked against the schemas: types, ranges and closed sets, every key
whether this run uses it or not. Each failure is a :class:`ConfigError` naming the key."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from adaptune.common.errors import ConfigError
from adaptune.common.schema import build, validate
from adaptune.schedules.config import ScheduleConfig, build_schedule_config
from adaptune.tasks.config import TASK_SCHEMAS

from .config import LoggerConfig, RootConfig, TrainerConfig


@dataclass
class Sections:
    """The checked sections of one run's config, as schema instances."""

    root: RootConfig
    trainer: TrainerConfig
    logger: LoggerConfig
    schedule: ScheduleConfig  # the chosen schedule's own schema (schedules/config.py: SCHEDULE_SCHEMAS)
    task: Any
    resolved: dict  # the whole config as plain containers (checkpoints, results.json, W&B, resume checks)


def validate_config(cfg: DictConfig) -> Sections:
    """Check every section of ``cfg`` against its schema; return them as typed instances."""
    known = {f.name for f in dataclasses.fields(RootConfig)} | {"hydra"}
    unknown = sorted(set(cfg.keys()) - known)
    if unknown:  # `+foo=1` adds a top-level key that nothing reads: a typo, never a setting
        raise ConfigError(
            f"{unknown[0]}: not a key of the config; top-level keys: {', '.join(sorted(known - {'hydra'}))} "
            f"(a section's own keys are set as section.key=..., e.g. schedule.lr=2e-5)"
        )
    kind = cfg.task.get("kind")
    if kind not in TASK_SCHEMAS:
        raise ConfigError(f"task.kind='{kind}' is unknown; allowed: {', '.join(TASK_SCHEMAS)}")
    root = RootConfig(
        name=str(cfg.get("name")),
        seed=cfg.get("seed"),
        resume=cfg.get("resume"),
        presets=OmegaConf.to_container(cfg.presets, resolve=True),
    )
    validate(root, "")
    return Sections(
        root=root,
        trainer=build(TrainerConfig, cfg.trainer, "trainer"),
        logger=build(LoggerConfig, cfg.logger, "logger"),
        schedule=build_schedule_config(cfg.schedule),
        task=build(TASK_SCHEMAS[kind], cfg.task, "task"),
        resolved=OmegaConf.to_container(cfg, resolve=True),
    )
