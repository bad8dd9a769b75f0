"""Callbacks: what the training loop does around its steps, as objects configured in ``conf/``.

The loop (:meth:`adaptune.runner.loop.Trainer.fit`) owns the model, optimizer, data and the step maths;
everything else it does is a callback receiving events. The schedule's per-step hooks are the
first callback (:class:`ScheduleHooks`); then come the entries of ``conf/callbacks/default.yaml``
in their order, each ``{_target_: module.Class, **settings}`` built by ``hydra.utils.instantiate``.
Add your own from the command line::

    adaptune +callbacks.mine._target_=my.module.MyCallback +callbacks.mine.some_setting=3

and turn a built-in one off with ``callbacks.logging=null`` (or ``~callbacks.logging``).

Events, in order (``trainer`` is the run's :class:`~adaptune.runner.context.RunContext`, the narrow
view of the :class:`~adaptune.runner.loop.Trainer` that callbacks get; ``step`` is 1-based)::

    on_fit_start(trainer)             after resuming from a checkpoint, before the first step
    for each optimizer step:
        on_step_begin(trainer, step)  before the step's first micro-batch
        #  forward + loss_sum.backward() per micro-batch (scaled under fp16); unscale; divide
        #  the gradients by the step's sample_size
        on_before_clip(trainer, step) the step's gradients, before global clipping (DPS masks
                                      here, as its reference masks inside backward); not fired
                                      when fp16 gradients overflowed (nor is anything below
                                      until after_step: the update and LR step are skipped)
        #  global clipping (trainer.max_grad_norm)
        on_gradients(trainer, step)   final gradients, before optimizer.step() (ChildTuning masks
                                      here, as its reference masks inside the optimizer)
        #  optimizer.step() (GradScaler under fp16), lr_scheduler.step(), zero_grad()
        after_step(trainer, step)     parameters updated
        #  the trainer records the step: state.step == step, samples, train time, and the
        #  position of the next batch (after an epoch's last batch: the next epoch's first)
        on_step_end(trainer, step, loss)   ``loss``: the step's mean loss (sum / sample_size)
        on_epoch_end(trainer, epoch)  after on_step_end of epoch ``epoch``'s last step
        on_stop(trainer, step)        if a callback set trainer.should_stop; then the trainer
                                      raises Interrupted
    on_fit_end(trainer)               after the last step (not after an exception)
    teardown(trainer)                 always, also after an exception

Each event goes to every callback in order before the next event starts. The schedule's own
hooks (``schedules/base.py``) are the first three per-step events without ``trainer``.

Callbacks share the run through that context (its full list: runner/context.py): ``trainer.state``
(:class:`~adaptune.runner.loop.TrainState`, checkpointed), ``trainer.logger``, ``trainer.model``,
``trainer.task``, ``trainer.request_stop()`` / ``trainer.should_stop = True`` (in ``on_step_end``:
stop after the current step; under DDP every rank must ask at the same step),
``trainer.epoch_ended`` (in ``on_step_end``: this step finished its epoch),
``trainer.evaluate(split)``, ``trainer.save_checkpoint()``. (choice) A callback's own attributes
are not checkpointed: what must survive a resume lives in ``trainer.state``. The checkpoint
callback saves during ``on_step_end``, so a callback changing ``trainer.state`` there must come
before it (callbacks added with ``+callbacks.x`` come after the built-in ones); a stop, whoever
asks for it, is saved in ``on_stop``, after every callback's ``on_step_end``.
"""

from __future__ import annotations

import logging
import signal
import sys
from typing import TYPE_CHECKING, Any, Mapping

from adaptune.common.errors import ConfigError

from . import checkpoint as ckpt
from .config import TrainerConfig

if TYPE_CHECKING:  # pragma: no cover
    from .context import RunContext as Trainer  # what the events receive (named as in the docs above)

log = logging.getLogger("adaptune")


class Callback:
    """Base class: every event is a no-op; override the ones you need (order: module docstring)."""

    def on_fit_start(self, trainer: Trainer) -> None:
        """After resuming, before the first step."""

    def on_step_begin(self, trainer: Trainer, step: int) -> None:
        """Before the forward pass of the step's first micro-batch."""

    def on_before_clip(self, trainer: Trainer, step: int) -> None:
        """After backward, unscaling and normalisation; before global clipping. Not fired on a
        step whose fp16 gradients overflowed."""

    def on_gradients(self, trainer: Trainer, step: int) -> None:
        """After backward, unscaling, normalisation and clipping; before ``optimizer.step()``.
        Not fired on a step whose fp16 gradients overflowed."""

    def after_step(self, trainer: Trainer, step: int) -> None:
        """After ``optimizer.step()`` and ``lr_scheduler.step()``."""

    def on_step_end(self, trainer: Trainer, step: int, loss: float) -> None:
        """After the trainer recorded the step (``trainer.state.step == step``); ``loss`` is its
        mean training loss."""

    def on_epoch_end(self, trainer: Trainer, epoch: int) -> None:
        """After ``on_step_end`` of epoch ``epoch``'s last step (``trainer.state.epoch`` is already
        ``epoch + 1``)."""

    def on_stop(self, trainer: Trainer, step: int) -> None:
        """``trainer.should_stop`` was set at step ``step``: the run ends with ``Interrupted``
        (``on_fit_end`` does not follow)."""

    def on_fit_end(self, trainer: Trainer) -> None:
        """After the last step, before the test evaluation and the results."""

    def teardown(self, trainer: Trainer) -> None:
        """At the end of ``fit``, also after an exception: release what ``on_fit_start`` took."""


class ScheduleHooks(Callback):
    """The schedule's per-step hooks (``schedules/base.py``) as the first callback."""

    def __init__(self, schedule):
        self.schedule = schedule

    def on_step_begin(self, trainer: Trainer, step: int) -> None:
        self.schedule.on_step_begin(step)

    def on_before_clip(self, trainer: Trainer, step: int) -> None:
        self.schedule.on_before_clip(step)

    def on_gradients(self, trainer: Trainer, step: int) -> None:
        self.schedule.on_gradients(step)

    def after_step(self, trainer: Trainer, step: int) -> None:
        self.schedule.after_step(step)


def _every(value: Any, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"every must be a positive integer{' or null' if allow_none else ''}, got {value!r}")
    return value


class Logging(Callback):
    """Every ``every`` steps and at the last step: the mean training loss since the previous log
    point, the epoch, samples/s and the schedule's ``log_metrics`` go to the logger (W&B) and the
    loss to ``trainer.state.train_loss`` (``results.json``); with ``progress``, rank 0 shows the
    loss and learning rate: a tqdm bar on a terminal, and (choice) where stderr is not a terminal
    (a SLURM log, ``| tee``, a file) one plain line per log point instead, so that logs hold no
    carriage-return bar redraws. The loss window lives in ``trainer.state``, so a resumed run logs
    the same means as an uninterrupted one."""

    def __init__(self, every: int = TrainerConfig.log_every, progress: bool = TrainerConfig.progress):
        self.every = _every(every)
        self.progress = bool(progress)
        self.bar = None
        self.lines = False  # progress as log lines (stderr is not a terminal)

    def on_fit_start(self, trainer: Trainer) -> None:
        if self.progress and trainer.dist.is_main:
            if not sys.stderr.isatty():
                self.lines = True
                return
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=trainer.total_steps, initial=trainer.state.step, desc="train", unit="step", dynamic_ncols=True, leave=True
            )

    def on_step_end(self, trainer: Trainer, step: int, loss: float) -> None:
        st = trainer.state
        st.loss_window.append(loss)
        if self.bar is not None:
            self.bar.update(1)
        if step % self.every and step != trainer.total_steps:
            return
        mean = sum(st.loss_window) / len(st.loss_window)
        st.loss_window.clear()
        st.train_loss.append([step, mean])
        epoch = st.epoch - 1 if trainer.epoch_ended else st.epoch  # the epoch this step belongs to
        metrics = {"train/loss": mean, "train/epoch": epoch, "train/samples_per_s": st.samples / max(st.train_time, 1e-9)}
        metrics.update({f"train/{k}": v for k, v in trainer.schedule_metrics(step).items()})
        trainer.logger.log(metrics, step=step)
        lr = trainer.lr
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.2e}")
        elif self.lines:
            log.info(
                "step %d/%d (%d%%) loss %.4f lr %.2e %.1f samples/s",
                step,
                trainer.total_steps,
                100 * step // trainer.total_steps,
                mean,
                lr,
                metrics["train/samples_per_s"],
            )

    def teardown(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Evaluation(Callback):
    """Dev evaluation every ``every`` steps (null: at the end of each epoch), at the last step,
    and at the end of ``fit`` when the last step has none (a run resumed after its last step).
    Each one is appended to ``trainer.state.evals`` and logged as ``dev/*``; a new best of the
    task's main metric is written to ``checkpoints/best.pt`` (model weights, step, metrics)."""

    def __init__(self, every: int | None = TrainerConfig.eval_every):
        self.every = _every(every, allow_none=True)

    def on_step_end(self, trainer: Trainer, step: int, loss: float) -> None:
        due = trainer.epoch_ended if self.every is None else step % self.every == 0
        if due or step == trainer.total_steps:
            self.evaluate(trainer)

    def on_fit_end(self, trainer: Trainer) -> None:
        evals = trainer.state.evals
        if not evals or evals[-1]["step"] != trainer.state.step:
            self.evaluate(trainer)

    def evaluate(self, trainer: Trainer) -> dict[str, float]:
        metrics = trainer.evaluate("dev")
        st, task, step = trainer.state, trainer.task, trainer.state.step
        if task.main_metric not in metrics:
            raise RuntimeError(f"task {task.kind} did not report its main metric '{task.main_metric}'")
        st.evals.append({"step": step, **metrics})
        trainer.logger.log({f"dev/{k}": v for k, v in metrics.items()}, step=step)
        log.info("step %d dev: %s", step, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        value = metrics[task.main_metric]
        if st.best_value is None or (value > st.best_value if task.greater_is_better else value < st.best_value):
            st.best_value, st.best_step, st.best_metrics = value, step, dict(metrics)
            if trainer.dist.is_main:
                ckpt.atomic_save(
                    {"model": trainer.model.state_dict(), "step": step, "metrics": dict(metrics)}, trainer.ckpt_dir / ckpt.BEST
                )
        return metrics


class StopOnSignal(Callback):
    """The first SIGINT/SIGTERM asks the run to stop after the current step (a second one aborts
    at once). Under DDP the ranks agree every step (one all-reduce of a flag), so every rank stops
    at the same step; the checkpoint callback then writes ``last.pt`` (``on_stop``) and the
    trainer raises ``Interrupted``. (choice) Without this callback a signal interrupts wherever it lands."""

    def __init__(self):
        self.requested = False
        self._old: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:
        if self.requested:  # second signal: stop now
            raise KeyboardInterrupt
        self.requested = True
        log.warning("stop requested: finishing this step and writing a checkpoint (again to abort)")

    def on_fit_start(self, trainer: Trainer) -> None:
        self.requested = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not in the main thread (e.g. some launchers): no handler
                pass

    def on_step_end(self, trainer: Trainer, step: int, loss: float) -> None:
        if trainer.dist.enabled:
            self.requested = trainer.dist.any(self.requested)
        if self.requested:
            trainer.should_stop = True

    def teardown(self, trainer: Trainer) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()


class Checkpoint(Callback):
    """``checkpoints/last.pt`` (:meth:`Trainer.save_checkpoint`: atomic, written by rank 0) every
    ``every`` steps, after each evaluation (so a resumed run neither repeats nor loses it), when
    the run stops (``on_stop``), and at the end of ``fit`` when the final state is not saved yet.
    Comes after the evaluation callback, whose results it saves."""

    def __init__(self, every: int = TrainerConfig.save_every):
        self.every = _every(every)
        self._saved: tuple[int, int] | None = None

    @staticmethod
    def _mark(trainer: Trainer) -> tuple[int, int]:
        return trainer.state.step, len(trainer.state.evals)

    def _save(self, trainer: Trainer) -> None:
        trainer.save_checkpoint()
        self._saved = self._mark(trainer)

    def on_fit_start(self, trainer: Trainer) -> None:
        self._saved = self._mark(trainer)  # what a resumed run loaded (nothing to save at step 0)

    def on_step_end(self, trainer: Trainer, step: int, loss: float) -> None:
        evals = trainer.state.evals
        if step % self.every == 0 or (evals and evals[-1]["step"] == step):
            self._save(trainer)

    def on_stop(self, trainer: Trainer, step: int) -> None:
        if self._saved != self._mark(trainer):
            self._save(trainer)

    def on_fit_end(self, trainer: Trainer) -> None:
        if self._mark(trainer) != self._saved:
            self._save(trainer)


def build_callbacks(cfg: Mapping[str, Any] | None) -> list[Callback]:
    """The callbacks configured in ``cfg`` (the ``callbacks`` config node), in order. Each entry is
    ``{_target_: module.Class, **settings}``; a null entry is skipped. Mistakes (no ``_target_``,
    a class that cannot be imported or built, not a :class:`Callback`) raise ConfigError naming
    ``callbacks.<name>``."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    out = []
    for name, node in (cfg or {}).items():
        if node is None:
            continue
        target = node.get("_target_") if isinstance(node, Mapping) else None
        if not target:
            raise ConfigError(
                f"callbacks.{name} needs a _target_ (module.Class of a adaptune.runner.callbacks.Callback), got {node!r}"
            )
        try:
            callback = instantiate(node, _convert_="all")
        except InstantiationException as err:
            cause = err.__cause__
            if isinstance(cause, ConfigError):
                raise ConfigError(f"callbacks.{name}: {cause}") from cause
            lines = [line.strip() for line in str(cause or err).splitlines() if line.strip()]
            if isinstance(cause, ImportError) and len(lines) > 1:  # Hydra's "Error loading 'x':", then why
                lines = [" ".join(lines[1:])]
            reason = lines[0] if lines else type(cause or err).__name__
            raise ConfigError(f"callbacks.{name}: cannot build {target}: {reason}") from err
        if not isinstance(callback, Callback):
            raise ConfigError(
                f"callbacks.{name}: {target} is not a adaptune.runner.callbacks.Callback (got {type(callback).__name__})"
            )
        out.append(callback)
    return out
