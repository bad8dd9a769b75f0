"""What a callback may use of a run: :class:`RunContext`, the first argument of every callback event.

As transformers' ``TrainerCallback`` gets ``(args, state, control)`` rather than the ``Trainer``, our
callbacks get a narrow, documented view of the run instead of the trainer with its ~30 attributes,
so the loop can change its internals without breaking them.

Read:
    ``state`` (:class:`~adaptune.runner.loop.TrainState`: step, epoch, evaluations, losses, best;
    checkpointed, so what must survive a resume lives here), ``logger``, ``model`` (the plain
    module, not the DDP wrapper), ``task``, ``patterns`` (the model's parameter patterns),
    ``device``, ``dist`` (rank, world size, ``is_main``), ``total_steps``, ``steps_per_epoch``,
    ``epoch_ended`` (in ``on_step_end``: the step finished its epoch), ``lr`` (the current learning
    rate of the first parameter group), ``run_dir``, ``ckpt_dir``, ``last_saved_step``.
Act:
    ``evaluate(split)`` (metrics, reduced over ranks), ``save_checkpoint()`` (``last.pt``),
    ``schedule_metrics(step)`` (the schedule's own scalars for the log), ``request_stop()`` (stop
    after the current step; also ``should_stop = True``; under DDP every rank must ask at the same
    step).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .loop import Trainer


class RunContext:
    """The callbacks' view of a run (module docstring)."""

    __slots__ = ("_trainer",)

    def __init__(self, trainer: Trainer):
        self._trainer = trainer

    # ------------------------------------------------------------------ read
    state = property(lambda self: self._trainer.state)
    logger = property(lambda self: self._trainer.logger)
    model = property(lambda self: self._trainer.model)
    task = property(lambda self: self._trainer.task)
    patterns = property(lambda self: self._trainer.patterns)
    device = property(lambda self: self._trainer.device)
    dist = property(lambda self: self._trainer.dist)
    total_steps = property(lambda self: self._trainer.total_steps)
    steps_per_epoch = property(lambda self: self._trainer.steps_per_epoch)
    epoch_ended = property(lambda self: self._trainer.epoch_ended)
    run_dir = property(lambda self: Path(self._trainer.run_dir))
    ckpt_dir = property(lambda self: Path(self._trainer.ckpt_dir))
    last_saved_step = property(lambda self: self._trainer.last_saved_step)

    @property
    def lr(self) -> float:
        return float(self._trainer.optimizer.param_groups[0]["lr"])

    # ------------------------------------------------------------------ act
    def evaluate(self, split: str = "dev") -> dict[str, float]:
        return self._trainer.evaluate(split)

    def save_checkpoint(self) -> Path:
        return self._trainer.save_checkpoint()

    def schedule_metrics(self, step: int) -> dict[str, Any]:
        return self._trainer.schedule.log_metrics(step)

    def request_stop(self) -> None:
        self._trainer.should_stop = True

    @property
    def should_stop(self) -> bool:
        return self._trainer.should_stop

    @should_stop.setter
    def should_stop(self, value: bool) -> None:
        self._trainer.should_stop = bool(value)
