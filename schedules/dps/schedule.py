"""``schedule=dps``: the baseline optimizer plus :class:`~adaptune.schedules.dps.DPS` (the runner adapter)."""

from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from adaptune.common.families import ParamPatterns

from ..baseline import BaselineSchedule
from ..config import DPSConfig
from .algorithm import DPS
from ..sync import shared_seed
from ..linear import disable_dropout, linear_weights
from .helpers import phase_length
from ..mixing import MixoutWeight, attach_mix


class DPSSchedule(BaselineSchedule):
    """``schedule=dps``: the baseline optimizer and LR schedule, plus :class:`DPS`.

    Config keys (:class:`~adaptune.schedules.config.DPSConfig`, ``conf/schedule/dps.yaml``): the
    baseline's, plus ``variant`` (dense | mix), ``drop_p`` (DPS's ``p``), ``update_ratio``, ``T``
    (null: the run's optimizer steps), ``dps_patterns`` (null: the model family's default) and
    ``disable_dropout`` (default true).
    """

    name = "dps"
    schema = DPSConfig

    def __init__(self, cfg: DPSConfig | Mapping[str, Any]):
        super().__init__(cfg)
        self.p, self.update_ratio, self.variant = self.cfg.drop_p, self.cfg.update_ratio, self.cfg.variant
        self.dps: DPS | None = None
        self._mix: dict[str, MixoutWeight] | None = None

    def prepare_model(self, model: nn.Module, patterns: ParamPatterns) -> None:
        if self.cfg.disable_dropout:
            disable_dropout(model)
        if self.variant == "mix":
            self._mix = attach_mix(model, self.patterns(patterns, "dps"))

    def setup(self, model: nn.Module, patterns: ParamPatterns, total_steps: int) -> None:
        if self.variant == "mix" and self._mix is None:
            self._mix = attach_mix(model, self.patterns(patterns, "dps"))
        # DPS's T: schedule.T (the low-resource protocol: one epoch) or the run's length; the LR
        # schedule always spans the whole run. U >= 1 is checked before building anything else.
        horizon = int(self.cfg.T) if self.cfg.T is not None else int(total_steps)
        phase_length(horizon, float(self.update_ratio), horizon_key="schedule.T" if self.cfg.T is not None else None)
        super().setup(model, patterns, total_steps)
        self.dps = DPS(
            linear_weights(model),
            horizon,
            self.p,
            self.update_ratio,
            self.variant,
            patterns=self.patterns(patterns, "dps"),
            mix=self._mix,
            seed=shared_seed(),
        )
        self.restore_pending_state()

    def on_step_begin(self, step: int) -> None:
        self.dps.on_step_begin(step)

    def on_before_clip(self, step: int) -> None:
        # the reference masks inside backward: the global-norm clip sees the masked gradient
        self.dps.on_gradients(step)

    def log_metrics(self, step: int) -> dict[str, float]:
        metrics = super().log_metrics(step)
        metrics.update(
            {
                "dps/phase": float(self.dps.phase(step)),
                "dps/selection": 1.0 if self.dps.is_selection(step) else 0.0,
                "dps/kept_fraction": self.dps.kept_fraction(),
            }
        )
        return metrics

    def state_owner(self) -> DPS | None:
        return self.dps
