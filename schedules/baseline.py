"""The baseline schedule: AdamW or Adamax with warmup then decay (linear, inverse-sqrt, ...).

``schedule.optimizer=adamw`` uses ``torch.optim.AdamW`` (decoupled weight decay);
``schedule.optimizer=adamax`` uses ``torch.optim.Adamax`` (bias-corrected m, weight decay added to
the gradient); ``schedule.optimizer=adamax_mtdnn`` is MT-DNN's Adamax, the SAGE paper's GLUE
baseline (:class:`adaptune.schedules.sage.MTDNNAdamax`: no bias correction, weight decay added to the
update). Any name registered in ``adaptune.schedules.base.OPTIMIZERS`` works.
"""

from __future__ import annotations

import torch

from adaptune.common.families import ParamPatterns

from .base import Schedule
from .config import BaselineConfig


class BaselineSchedule(Schedule):
    name = "baseline"
    schema = BaselineConfig

    def setup(self, model: torch.nn.Module, patterns: ParamPatterns, total_steps: int) -> None:
        groups = self.param_groups(model, patterns)
        self.optimizer = self.make_optimizer(self.cfg.optimizer, groups)
        self.lr_scheduler = self.make_lr_scheduler(total_steps)

    def log_metrics(self, step: int) -> dict[str, float]:
        return {"lr": self.optimizer.param_groups[0]["lr"]}
