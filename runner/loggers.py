"""Experiment loggers: Weights & Biases (default, offline unless told otherwise) or none.

A logger failure never fails a training run: every W&B call is guarded, the first failure is
reported once as a warning and the logger goes quiet.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from .config import LoggerConfig

log = logging.getLogger("adaptune")


class NullLogger:
    def log(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def summary(self, values: Mapping[str, Any]) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class WandbLogger(NullLogger):
    """Wraps one ``wandb`` run. ``mode=offline`` writes ``<run_dir>/wandb/offline-run-*``."""

    def __init__(self, cfg: LoggerConfig, run_dir: Path, config: Mapping[str, Any],
                 tags: list[str], name: str):
        self.run = None
        try:
            import wandb

            run_dir = Path(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            # A stable id per run directory: a resumed run continues the same W&B run.
            run_id = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]
            os.environ.setdefault("WANDB_SILENT", "true")
            self.run = wandb.init(
                project=cfg.project, entity=cfg.entity, group=cfg.group,
                job_type=cfg.job_type, tags=sorted(set(tags) | set(cfg.tags)),
                config=dict(config), dir=str(run_dir), mode=cfg.mode,
                name=name, id=run_id, resume="allow", reinit="finish_previous",
            )
        except Exception as err:  # noqa: BLE001 - W&B must never fail the run
            self._disable(err)

    def _disable(self, err: BaseException) -> None:
        log.warning("W&B logging disabled: %s: %s", type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        self.run = None

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if self.run is None:
            return
        try:
            self.run.log(dict(metrics), step=step)
        except Exception as err:  # noqa: BLE001
            self._disable(err)

    def summary(self, values: Mapping[str, Any]) -> None:
        if self.run is None:
            return
        try:
            for key, value in values.items():
                self.run.summary[key] = value
        except Exception as err:  # noqa: BLE001
            self._disable(err)

    def finish(self, exit_code: int = 0) -> None:
        if self.run is None:
            return
        try:
            self.run.finish(exit_code=exit_code)
        except Exception as err:  # noqa: BLE001
            self._disable(err)
        self.run = None


def build_logger(cfg: LoggerConfig, run_dir: Path, config: Mapping[str, Any],
                 tags: list[str], name: str) -> NullLogger:
    """The logger ``cfg`` (``logger.*``, typed: runner/config.py) describes."""
    if cfg.kind == "wandb" and cfg.mode != "disabled":
        return WandbLogger(cfg, run_dir, config, tags, name)
    return NullLogger()
