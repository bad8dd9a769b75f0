"""Experiment loggers: Weights & Biases (default, offline unless told otherwise), a CSV file,
TensorBoard event files, several at once (``logger.kind`` plus ``logger.also``), or none.

A logger failure never fails a training run: every W&B call is guarded, the first failure is
reported once as a warning and the logger goes quiet.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import time
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


#: The W&B run id of a run directory, kept beside its checkpoints.
RUN_ID_FILE = "wandb_run_id.txt"
#: W&B's modes (``$WANDB_MODE`` values we accept).
MODES = ("offline", "online", "disabled")


def wandb_settings(cfg: LoggerConfig) -> dict[str, Any]:
    """mode / project / entity as W&B users expect: a key set in the config wins, then
    ``$WANDB_MODE`` / ``$WANDB_PROJECT`` / ``$WANDB_ENTITY``, then our defaults (offline,
    "adaptune", W&B's default entity). A bad ``$WANDB_MODE`` is a one-line ConfigError."""
    from adaptune.common.errors import ConfigError

    mode = cfg.mode or os.environ.get("WANDB_MODE") or "offline"
    if mode not in MODES:
        raise ConfigError(f"WANDB_MODE={mode} is unknown; allowed: {', '.join(MODES)} (or set logger.mode)")
    return {
        "mode": mode,
        "project": cfg.project or os.environ.get("WANDB_PROJECT") or "adaptune",
        "entity": cfg.entity or os.environ.get("WANDB_ENTITY") or None,
    }


def wandb_run_id(run_dir: Path, fresh: bool) -> str:
    """The run's W&B id: a new one when training starts from step 0 (``resume=false`` in a used
    directory must not log steps 1..N into a W&B run already at N), kept in
    ``run_dir/wandb_run_id.txt`` so that resuming from a checkpoint continues the same W&B run.
    A directory without the file (an older version) keeps its path-derived id."""
    path = Path(run_dir) / RUN_ID_FILE
    if not fresh:
        try:
            return path.read_text().strip()
        except OSError:
            return hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]
    run_id = hashlib.sha1(f"{Path(run_dir).resolve()}:{time.time_ns()}:{os.getpid()}".encode()).hexdigest()[:16]
    from .checkpoint import atomic_write

    atomic_write(path, lambda f: f.write(run_id.encode()))
    return run_id


class WandbLogger(NullLogger):
    """Wraps one ``wandb`` run. ``mode=offline`` writes ``<run_dir>/wandb/offline-run-*``
    (:attr:`offline_dir`: what ``wandb sync`` takes)."""

    def __init__(
        self, cfg: LoggerConfig, run_dir: Path, config: Mapping[str, Any], tags: list[str], name: str, fresh: bool = True
    ):
        self.run = None
        self.offline_dir: Path | None = None
        try:
            import wandb

            settings = wandb_settings(cfg)
            run_dir = Path(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            os.environ.setdefault("WANDB_SILENT", "true")
            self.run = wandb.init(
                project=settings["project"],
                entity=settings["entity"],
                group=cfg.group,
                job_type=cfg.job_type,
                tags=sorted(set(tags) | set(cfg.tags)),
                config=dict(config),
                dir=str(run_dir),
                mode=settings["mode"],
                name=name,
                id=wandb_run_id(run_dir, fresh),
                resume="allow",
                reinit="finish_previous",
            )
            if settings["mode"] == "offline" and getattr(self.run, "dir", None):
                self.offline_dir = Path(self.run.dir).parent
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


class CsvLogger(NullLogger):
    """``run_dir/metrics.csv``: every logged scalar as one row ``step,metric,value`` (tidy,
    pandas-ready: ``pd.read_csv(...).pivot(index="step", columns="metric", values="value")``);
    the end-of-run summaries (``final/*``, ``best/*``, ``test/*``) at the last step. A resumed run
    first drops the rows after its checkpoint's step, so the file equals an uninterrupted run's."""

    FILE = "metrics.csv"

    def __init__(self, run_dir: Path, resumed_step: int | None = None):
        self.path = Path(run_dir) / self.FILE
        self.last_step = 0
        keep = []
        if resumed_step is not None and self.path.is_file():
            with open(self.path, newline="") as f:
                keep = [row for row in csv.DictReader(f) if int(row["step"]) <= resumed_step]
            self.last_step = resumed_step
        from .checkpoint import atomic_write

        lines = ["step,metric,value"] + [f"{r['step']},{r['metric']},{r['value']}" for r in keep]
        atomic_write(self.path, lambda f: f.write(("\n".join(lines) + "\n").encode()))
        self.file = open(self.path, "a", newline="")
        self.writer = csv.writer(self.file)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.last_step = step
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.writerow([step, key, repr(float(value))])
        self.file.flush()

    def summary(self, values: Mapping[str, Any]) -> None:
        self.log(values, self.last_step)

    def finish(self, exit_code: int = 0) -> None:
        if not self.file.closed:
            self.file.close()


class TensorBoardLogger(NullLogger):
    """TensorBoard event files under ``run_dir/tensorboard`` (``tensorboard --logdir outputs``):
    every logged scalar by its key (``train/loss``, ``dev/accuracy``) at its step; the end-of-run
    summaries (``final/*``, ``best/*``, ``test/*``) at the last step. **(choice)** A resumed run
    starts a new event file with ``purge_step`` at its checkpoint's step, so TensorBoard drops the
    steps the interrupted run logged after it (the curves equal an uninterrupted run's)."""

    DIR = "tensorboard"

    def __init__(self, run_dir: Path, resumed_step: int | None = None):
        from adaptune.common.extras import require

        require("tensorboard", "logger=tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.path = Path(run_dir) / self.DIR
        self.last_step = resumed_step or 0
        self.writer = SummaryWriter(str(self.path), purge_step=None if resumed_step is None else resumed_step + 1)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.last_step = step
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, float(value), step)
        self.writer.flush()

    def summary(self, values: Mapping[str, Any]) -> None:
        self.log(values, self.last_step)

    def finish(self, exit_code: int = 0) -> None:
        self.writer.close()


class MultiLogger(NullLogger):
    """Several loggers at once (``logger.kind`` plus ``logger.also``)."""

    def __init__(self, loggers: list[NullLogger]):
        self.loggers = loggers

    @property
    def offline_dir(self):
        return next((lg.offline_dir for lg in self.loggers if getattr(lg, "offline_dir", None)), None)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for lg in self.loggers:
            lg.log(metrics, step)

    def summary(self, values: Mapping[str, Any]) -> None:
        for lg in self.loggers:
            lg.summary(values)

    def finish(self, exit_code: int = 0) -> None:
        for lg in self.loggers:
            lg.finish(exit_code)


def build_logger(
    cfg: LoggerConfig,
    run_dir: Path,
    config: Mapping[str, Any],
    tags: list[str],
    name: str,
    fresh: bool = True,
    resumed_step: int | None = None,
) -> NullLogger:
    """The logger(s) ``cfg`` (``logger.*``, typed: runner/config.py) describes: ``kind`` and every
    one in ``also``; ``fresh``: the run starts from step 0 (a new W&B run id)."""
    loggers: list[NullLogger] = []
    for kind in dict.fromkeys([cfg.kind, *cfg.also]):
        if kind == "wandb" and wandb_settings(cfg)["mode"] != "disabled":
            loggers.append(WandbLogger(cfg, run_dir, config, tags, name, fresh=fresh))
        elif kind == "csv":
            loggers.append(CsvLogger(run_dir, None if fresh else resumed_step))
        elif kind == "tensorboard":
            loggers.append(TensorBoardLogger(run_dir, None if fresh else resumed_step))
    if not loggers:
        return NullLogger()
    return loggers[0] if len(loggers) == 1 else MultiLogger(loggers)
