"""The one training loop every task and schedule goes through.

Entry point: :func:`run(cfg, run_dir)` with a composed config (``conf/config.yaml``) and a run
directory. It returns the results dict it also writes to ``<run_dir>/results.json``.

The :class:`Trainer` owns the objects and the step maths; the rest are callbacks (the schedule's
hooks first, then ``conf/callbacks/``; events and their order: ``runner/callbacks.py``). Per
optimizer step (``trainer.grad_accum_steps`` micro-batches), after, in a fresh (not resumed) run,
``schedule.before_training`` once (ChildTuning-D's Fisher pass over the epoch-0 batches):

1. ``on_step_begin(step)``
2. each micro-batch: forward under autocast, ``loss_sum.backward()`` (scaled under fp16)
3. unscale (fp16), divide gradients by the step's total ``sample_size`` (so accumulation equals
   one large batch); ``on_before_clip(step)``; global grad-norm clipping (``trainer.max_grad_norm``)
4. ``on_gradients(step)`` (this and ``on_before_clip`` are skipped when fp16 gradients
   overflowed, as is the update)
5. ``optimizer.step()`` (through the GradScaler under fp16), ``lr_scheduler.step()``
6. ``after_step(step)``; the trainer records the step and the next batch's position (epoch roll-over)
7. ``on_step_end(step, loss)``: logging, evaluation + best.pt, stop agreement, last.pt (the default
   callbacks); ``on_epoch_end(epoch)`` after an epoch's last step; on a stop request ``on_stop``
   (last.pt) and ``Interrupted``

Checkpoints (``checkpoints/last.pt``) hold model, optimizer, LR scheduler, scaler and schedule
state, the RNG state, the position in the epoch and the resolved config: a resumed run on CPU
continues bit-identically. SIGINT/SIGTERM finish the current step, write a checkpoint and stop.
"""

from __future__ import annotations

import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig

from adaptune.common.errors import ConfigError
from adaptune.schedules import Schedule, build_schedule
from adaptune.tasks.base import move_to

from . import checkpoint as ckpt
from .batches import train_batch_source
from .callbacks import ScheduleHooks, build_callbacks
from .components import build_components, resolve_device
from .context import RunContext
from .config import TrainerConfig
from .devices import job_device, multirun_job_num
from .distributed import init_distributed, ranks_in_sync
from .data_fingerprint import changes, fingerprint
from .loggers import NullLogger, build_logger
from .precision import autocast_context
from .results import collect, results_complete
from .validate import Sections, validate_config

log = logging.getLogger("adaptune")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message


class Interrupted(RuntimeError):
    """A stop was requested (SIGINT/SIGTERM, or a callback set ``trainer.should_stop``); the
    checkpoint callback wrote a checkpoint at the last completed step."""


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    samples: int = 0
    train_time: float = 0.0
    best_value: float | None = None
    best_step: int | None = None
    best_metrics: dict = field(default_factory=dict)
    evals: list = field(default_factory=list)  # [{"step": s, **metrics}]
    train_loss: list = field(default_factory=list)  # [[step, mean loss over the log interval]]
    loss_window: list = field(default_factory=list)  # step losses since the last log line
    overflow_steps: list = field(default_factory=list)  # fp16: steps whose gradients overflowed (skipped)

    def last_eval(self) -> dict:
        """The metrics of the latest evaluation (without its step), or {} before any."""
        return {k: v for k, v in self.evals[-1].items() if k != "step"} if self.evals else {}


class Trainer:
    """Holds the objects of one run; :meth:`fit` trains, evaluates and writes results."""

    def __init__(self, cfg: DictConfig, run_dir: Path, sections: Sections | None = None):
        self.cfg = cfg
        self.sections = sections or validate_config(cfg)
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.tcfg: TrainerConfig = self.sections.trainer
        self.device = resolve_device(self.tcfg.device)
        if self.device.type == "cuda" and "LOCAL_RANK" in os.environ:
            self.device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}")
        # a parallel sweep's job: a GPU of its own, queueing when all are taken (runner/devices.py)
        self.device, self._gpu_lock = job_device(self.device, multirun_job_num())
        self.dist = init_distributed(self.device)
        self.schedule = build_schedule(self.sections.schedule)
        # the schedule's hooks first, then conf/callbacks in order (built before the slow setup)
        self.callbacks = [ScheduleHooks(self.schedule), *build_callbacks(cfg.get("callbacks"))]
        # seeded task, data, model (prepared by the schedule) on the device: runner/components.py
        parts = build_components(self.sections, self.run_dir, self.device, schedule=self.schedule)
        self.amp, self.task, self.model, self.patterns = parts.amp, parts.task, parts.model, parts.patterns
        self.precision = self.amp.name
        # Schedules, evaluation and checkpoints use the plain module; the training forward goes
        # through DistributedDataParallel when torchrun started several processes.
        self.train_model = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            self.train_model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        if self.tcfg.compile:
            # (choice) only the training forward (and so its backward) is compiled; evaluation and
            # the schedules use the plain module. Dynamic shapes: GLUE batches vary in width.
            self.train_model = torch.compile(self.train_model, dynamic=True)

        self.accum = self.tcfg.grad_accum_steps
        self.workers = self.tcfg.num_workers
        self.steps_per_epoch = math.ceil(len(self.task.train_batches(0)) / self.accum)
        if self.steps_per_epoch == 0:
            raise ConfigError("the training set is empty (check task.data_dir / task.train_subset)")
        self.total_steps = self.tcfg.max_steps or self.tcfg.epochs * self.steps_per_epoch
        self.schedule.setup(self.model, self.patterns, self.total_steps)
        self.optimizer = self.schedule.optimizer
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.scaler = self.amp.scaler  # None unless fp16
        self.state = TrainState()
        self.logger = NullLogger()
        self.should_stop = False  # set by a callback: stop after the current step
        self.last_saved_step: int | None = None
        self.data_fingerprint: dict = {}  # the task's data files (runner/data_fingerprint.py), saved in checkpoints
        self.context = RunContext(self)  # what callbacks see of the run (runner/context.py)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        path = self.ckpt_dir / ckpt.LAST
        if not self.dist.is_main:
            self.last_saved_step = self.state.step
            return path
        try:
            ckpt.save_rotating(
                {
                    "version": 1,
                    "model": self.model.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "lr_scheduler": self.schedule.lr_scheduler.state_dict(),
                    "scaler": self.amp.state_dict(),
                    "schedule": self.schedule.state_dict(),
                    "rng": ckpt.rng_state(),
                    "state": asdict(self.state),
                    "config": self.sections.resolved,
                    "data": self.data_fingerprint,
                },
                self.ckpt_dir,
            )
        except ckpt.WriteFailed as err:
            kept = (
                f"the checkpoint of step {self.last_saved_step} ({path}) is intact"
                if self.last_saved_step is not None and path.is_file()
                else f"{path.name} of an earlier invocation is intact"
                if path.is_file()
                else "no checkpoint was written before it"
            )
            raise ckpt.WriteFailed(
                err.path, f"{err.reason}; {kept}; run the same command again once the cause is fixed to resume"
            ) from err
        self.last_saved_step = self.state.step
        return path

    def load_checkpoint(self, path: Path) -> None:
        """Restore everything from ``path``; a checkpoint of another version (missing keys, other
        fields, other shapes) is a one-line ConfigError naming the file, before a step is trained."""
        data = ckpt.load(path, map_location=self.device)
        err = ckpt.incompatible(path, data)
        if err is not None:
            raise err
        unknown = sorted(set(data["state"]) - {f.name for f in fields(TrainState)})
        if unknown:
            raise ConfigError(
                f"{path} was written by another version of adaptune (its training state has "
                f"{', '.join(unknown)}); pass resume=false to start over in that directory"
            )
        ckpt.load_weights(self.model, data, path)
        try:
            self.optimizer.load_state_dict(data["optimizer"])
            self.schedule.lr_scheduler.load_state_dict(data["lr_scheduler"])
            self.amp.load_state_dict(data.get("scaler"))
            self.schedule.load_state_dict(data["schedule"])
        except (KeyError, ValueError, TypeError) as exc:
            raise ConfigError(
                f"{path}: its optimizer / schedule state does not fit this run ({str(exc)[:160]}); "
                "pass resume=false to start over in that directory"
            ) from None
        ckpt.set_rng_state(data["rng"])
        self.state = TrainState(**data["state"])
        log.info("resumed from %s at step %d (epoch %d)", path, self.state.step, self.state.epoch)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, split: str = "dev") -> dict[str, float]:
        """Metrics on ``split``: this rank's share of the batches, reduced over all ranks (every
        rank gets the same metrics); see runner/evaluation.py."""
        from .evaluation import evaluate

        return evaluate(
            self.task,
            self.model,
            split,
            device=self.device,
            autocast=lambda: autocast_context(self.precision, self.device),
            dist=self.dist,
            num_workers=self.workers,
        )

    # ------------------------------------------------------------------ training
    def _train_step(self, step: int, batches, start: int, n_plans: int) -> tuple[int, float]:
        """One optimizer step over the next micro-batches of ``batches`` (plans ``start`` to
        ``start+accum`` of ``n_plans``); returns (next plan index, mean loss)."""
        self._fire("on_step_begin", step)
        loss_total, sample_size, n_samples = torch.zeros((), device=self.device), 0.0, 0
        stop = min(start + self.accum, n_plans)
        for index in range(start, stop):
            batch = move_to(next(batches), self.device)
            # under DDP, gradients are all-reduced once, on the step's last micro-batch
            sync = index == stop - 1 or not self.dist.enabled
            with nullcontext() if sync else self.train_model.no_sync():
                with self.amp.autocast():
                    out = self.task.loss(self.train_model, batch)
                loss_sum = out.loss_sum.float()
                self.amp.backward(loss_sum)
            loss_total += loss_sum.detach()
            sample_size += float(out.sample_size)
            n_samples += int(out.n_samples)
        # sums over the ranks (as they are in one process)
        sample_size, n_samples = self.dist.all_sum(sample_size), int(self.dist.all_sum(n_samples))
        mean_loss = self.dist.all_sum(float(loss_total)) / max(sample_size, 1.0)
        if not math.isfinite(mean_loss):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(
                f"loss became {mean_loss} at step {step}; training stopped, the last good checkpoint is "
                f"{self.ckpt_dir / ckpt.LAST if (self.ckpt_dir / ckpt.LAST).exists() else '(none yet)'}; "
                "try a lower schedule.lr or trainer.precision=fp32",
                reason=f"loss became {mean_loss} at step {step}",
            )
        self.amp.unscale_(self.optimizer)
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads and sample_size > 0:
            # DDP averaged the ranks' gradient sums: scale back to the global sum, then normalise
            torch._foreach_mul_(grads, self.dist.world / sample_size)
        overflow = self.amp.overflowed(grads)  # fp16 only: skip hooks, update and LR step
        if overflow:  # recorded in results.json: DPS's scores and every schedule's update skip it
            self.state.overflow_steps.append(step)
            log.info("step %d: fp16 gradients overflowed; update, LR step and schedule hooks skipped", step)
        if not overflow:
            self._fire("on_before_clip", step)  # DPS masks here: the clip sees masked gradients
        max_norm = self.tcfg.max_grad_norm
        if max_norm:
            torch.nn.utils.clip_grad_norm_(self.params, float(max_norm))
        if not overflow:
            self._fire("on_gradients", step)
        self.amp.step(self.optimizer)
        if not overflow:
            self.schedule.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._fire("after_step", step)
        self.state.samples += n_samples
        return stop, mean_loss

    def _batch_loss(self, plan) -> torch.Tensor:
        """The mean loss of one training batch (this rank's shard of ``plan``) through the training
        model under the run's autocast: ``Schedule.before_training``'s callables."""
        if self.dist.enabled:
            plan = self.task.shard_plan(plan, self.dist.rank, self.dist.world)
        batch = move_to(self.task.make_batch(plan), self.device)
        with self.amp.autocast():
            out = self.task.loss(self.train_model, batch)
        return out.loss_sum.float() / max(float(out.sample_size), 1.0)

    def _fire(self, event: str, *args) -> None:
        """Send ``event`` to every callback with the run's :class:`~adaptune.runner.context.RunContext`."""
        for callback in self.callbacks:
            getattr(callback, event)(self.context, *args)

    @property
    def epoch_ended(self) -> bool:
        """In ``on_step_end``: the step just done was its epoch's last (the state already points
        at the next epoch's first batch)."""
        return self.state.step > 0 and self.state.batch_in_epoch == 0

    def fit(self, logger, resume_from: Path | None = None) -> dict:
        """Train to ``total_steps`` firing the callbacks' events, evaluate the test split, return
        the results."""
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        self.logger, st = logger, self.state
        self.model.train()
        if resume_from is None and type(self.schedule).before_training is not Schedule.before_training:
            # once per run (ChildTuning-D's Fisher pass); its result is schedule state
            self.schedule.before_training(
                self.model, [partial(self._batch_loss, plan) for plan in self.task.train_batches(0)], self.tcfg.max_grad_norm
            )
        try:
            self._fire("on_fit_start")
            while st.step < self.total_steps:
                epoch, plans = st.epoch, self.task.train_batches(st.epoch)
                batches = train_batch_source(
                    self.task, plans, st.batch_in_epoch, self.dist, self.workers, pin_memory=self.device.type == "cuda"
                )
                while st.epoch == epoch and st.step < self.total_steps:
                    t0 = time.perf_counter()
                    step = st.step + 1
                    position, loss = self._train_step(step, batches, st.batch_in_epoch, len(plans))
                    st.step, st.train_time = step, st.train_time + time.perf_counter() - t0
                    # after the epoch's last batch the next step starts the next epoch's order
                    st.epoch, st.batch_in_epoch = (epoch + 1, 0) if position >= len(plans) else (epoch, position)
                    self._fire("on_step_end", step, loss)
                    if st.epoch != epoch:
                        self._fire("on_epoch_end", epoch)
                    if self.should_stop:  # (the stop callback makes every DDP rank agree)
                        self._fire("on_stop", step)
                        saved = "checkpoint saved in" if self.last_saved_step == step else "no checkpoint written in"
                        raise Interrupted(
                            f"interrupted at step {step}/{self.total_steps}; {saved} "
                            f"{self.ckpt_dir}; run the same command again to resume"
                        )
            self._fire("on_fit_end")
        finally:
            self._fire("teardown")
        test = self.evaluate("test") if self.task.has_test else None
        results = collect(self, st.last_eval(), test)
        if self.dist.enabled:  # parameters, optimizer and schedule state must agree on every rank
            results["ddp_ranks_in_sync"] = ranks_in_sync(
                self.dist, self.model.state_dict(), self.optimizer.state_dict()["state"], self.schedule.state_dict()
            )
            if not results["ddp_ranks_in_sync"]:
                log.error("DDP ranks diverged: parameters or schedule state differ between ranks")
        return results


def run(cfg: DictConfig, run_dir: Path | str) -> dict:
    """Train and evaluate one run configured by ``cfg`` in ``run_dir``; return its results.
    The run holds ``run_dir``'s lock throughout (:mod:`.lock`: one writer per directory)."""
    from .distributed import adopt_slurm_environment
    from .lock import run_lock

    run_dir = Path(run_dir)
    sections = validate_config(cfg)
    adopt_slurm_environment()  # a multi-task SLURM job is one DDP run (RANK, WORLD_SIZE, ...)
    with run_lock(run_dir, enabled=int(os.environ.get("RANK", "0")) == 0):
        return _run_locked(cfg, run_dir, sections)


def _run_locked(cfg: DictConfig, run_dir: Path, sections) -> dict:
    resume = sections.root.resume
    done = results_complete(run_dir)
    last = run_dir / "checkpoints" / ckpt.LAST
    from .resume import check_resume, checkpoint_config
    from .summary import end_block, start_block

    if resume == "auto" and done is not None:  # a changed config must not return the old results
        check_resume(sections.resolved, done.get("config"), run_dir, run_dir / "results.json")
        if done["status"] == "diverged":
            raise TrainingDiverged(f"{done['degenerate']} (an earlier run in {run_dir}; pass resume=false to train again)")
        log.info("run already complete in %s (results.json); pass resume=false to train again", run_dir)
        return done
    resume_from = None
    if resume in (True, "auto"):  # the newest intact checkpoint; a damaged last.pt is set aside
        resume_from = ckpt.resume_candidate(last.parent, main_process=int(os.environ.get("RANK", "0")) == 0)
    if resume is True and resume_from is None:
        raise ConfigError(f"resume=true but there is no checkpoint at {last}")
    if resume_from is not None:  # load_state_dict would keep the saved optimizer settings
        check_resume(sections.resolved, checkpoint_config(resume_from), run_dir, resume_from)
    data_now = fingerprint(sections.resolved.get("task") or {})
    if resume_from is not None:  # the same config on other data would train on two data sets
        saved = ckpt.peek(resume_from)
        changed = changes(saved.get("data") if isinstance(saved, dict) else None, data_now)
        if changed:
            raise ConfigError(
                f"the data changed since {resume_from} was written: {changed[0]}"
                f"{f' and {len(changed) - 1} more' if len(changed) > 1 else ''}; restore it, or pass "
                "resume=false to start over on the new data"
            )
    best = last.parent / ckpt.BEST
    if resume_from is None and best.is_file() and int(os.environ.get("RANK", "0")) == 0:
        best.unlink()  # an earlier run's best (resume=false, or a damaged history) is not this run's
        log.info("removed %s of an earlier run in this directory (this run starts over)", best)

    start = time.time()
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, run_dir, sections)
    trainer.data_fingerprint = data_now
    tags = [
        f"task:{trainer.task.kind}",
        f"schedule:{sections.schedule.name}",
        f"seed:{sections.root.seed}",
        f"dataset:{sections.task.name}",
    ]
    logger = NullLogger()
    if trainer.dist.is_main:
        resumed_step = ckpt.saved_step(resume_from) if resume_from is not None else None
        logger = build_logger(
            sections.logger,
            run_dir,
            sections.resolved,
            tags,
            name=f"{sections.root.name}/{run_dir.name}",
            fresh=resume_from is None,
            resumed_step=resumed_step,
        )
        log.info(start_block(trainer, run_dir, resume_from, resumed_step))
    exit_code = 1
    try:
        try:
            results = trainer.fit(logger, resume_from=resume_from)
        except TrainingDiverged as err:  # recorded, so that a sweep's report counts the run
            results = collect(trainer, trainer.state.last_eval(), None, status="diverged", degenerate=f"diverged: {err.reason}")
            if trainer.dist.is_main:
                ckpt.atomic_save_json({**results, "wall_time_s": time.time() - start}, run_dir / "results.json")
            raise
        results["wall_time_s"] = time.time() - start
        results["world_size"] = trainer.dist.world
        if trainer.dist.is_main:
            ckpt.atomic_save_json(results, run_dir / "results.json")
            if not sections.trainer.keep_previous:  # complete: last.pt was checked when written
                (trainer.ckpt_dir / ckpt.PREVIOUS).unlink(missing_ok=True)
        logger.summary({f"final/{k}": v for k, v in results["final"].items()})
        logger.summary({f"best/{k}": v for k, v in results["best"].items()})
        if results["test"]:
            logger.summary({f"test/{k}": v for k, v in results["test"].items()})
        logger.summary({"samples_per_s": results["samples_per_s"], "steps": results["steps"]})
        if trainer.dist.is_main:
            log.info(end_block(results, run_dir, getattr(logger, "offline_dir", None)))
        exit_code = 0
        return results
    finally:
        logger.finish(exit_code=exit_code)
