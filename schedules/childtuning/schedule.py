"""``schedule=childtuning_d`` / ``schedule=childtuning_f``: the baseline optimizer plus a ChildTuning
gradient mask (see ``adaptune.schedules.childtuning``)."""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from adaptune.common.families import ParamPatterns

from ..baseline import BaselineSchedule
from ..config import ChildTuningDConfig, ChildTuningFConfig
from ..sync import shared_seed
from .algorithm import ChildTuningD, ChildTuningF

log = logging.getLogger("adaptune")


def _fisher_progress(done: int, n: int) -> None:
    """ChildTuning-D's Fisher pass (a whole training epoch before step 1) in the log: every 10%."""
    if done == n or done * 10 // n != (done - 1) * 10 // n:
        log.info("ChildTuning-D Fisher pass: %d of %d batches (%d%%)", done, n, 100 * done // n)


class _ChildTuningSchedule(BaselineSchedule):
    """The baseline's optimizer (``schedule.optimizer``, ``schedule.impl``) and LR schedule; the
    mask object (``self.child``) is built in :meth:`setup` and masks ``.grad`` in
    :meth:`on_gradients` (after global clipping, before ``optimizer.step()``)."""

    def __init__(self, cfg: Mapping[str, Any]):
        super().__init__(cfg)
        self.child: ChildTuningD | ChildTuningF | None = None

    def _build(self, model: nn.Module, patterns: ParamPatterns) -> ChildTuningD | ChildTuningF:
        raise NotImplementedError

    def setup(self, model: nn.Module, patterns: ParamPatterns, total_steps: int) -> None:
        super().setup(model, patterns, total_steps)
        self.child = self._build(model, patterns)
        self.restore_pending_state()

    def on_gradients(self, step: int) -> None:
        self.child.apply()

    def state_owner(self) -> ChildTuningD | ChildTuningF | None:
        return self.child


class ChildTuningFSchedule(_ChildTuningSchedule):
    """``schedule=childtuning_f``: every step, every gradient entry the optimizer holds is kept
    with probability ``schedule.keep_p`` (ChildTuning's ``reserve_p``) and rescaled by its inverse."""

    name = "childtuning_f"
    schema = ChildTuningFConfig

    def _build(self, model: nn.Module, patterns: ParamPatterns) -> ChildTuningF:
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        return ChildTuningF(params, self.cfg.keep_p, seed=shared_seed())


class ChildTuningDSchedule(_ChildTuningSchedule):
    """``schedule=childtuning_d``: a Fisher pass before training fixes a mask over the tensors
    matched by ``schedule.childtuning_patterns`` (the top ``schedule.keep_p`` of their entries,
    one global threshold); every step masks their gradients with it."""

    name = "childtuning_d"
    schema = ChildTuningDConfig

    def _build(self, model: nn.Module, patterns: ParamPatterns) -> ChildTuningD:
        return ChildTuningD(model.named_parameters(), self.cfg.keep_p, self.cfg.childtuning_patterns)

    def before_training(
        self, model: nn.Module, loss_batches: Sequence[Callable[[], torch.Tensor]], max_grad_norm: float | None
    ) -> None:
        devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
        was_training = model.training
        model.train()
        with torch.random.fork_rng(devices=devices):  # training's dropout stays the baseline's
            self.child.compute(model, loss_batches, max_grad_norm, progress=_fisher_progress)
        model.train(was_training)

    def log_metrics(self, step: int) -> dict[str, float]:
        return {
            **super().log_metrics(step),
            "childtuning/kept_fraction": float(self.child.kept),
            "childtuning/threshold": float(self.child.threshold or 0.0),
        }
