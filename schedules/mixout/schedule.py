"""``schedule=mixout``: the baseline optimizer plus :class:`~adaptune.schedules.mixout.Mixout` (the runner adapter)."""

from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from adaptune.common.families import ParamPatterns

from ..baseline import BaselineSchedule
from ..config import MixoutConfig
from ..linear import disable_dropout
from ..mixing import MixoutWeight, attach_mix
from ..patterns import resolve_patterns
from ..sync import shared_seed
from .algorithm import Mixout

KEY = "schedule.mixout_patterns"


class MixoutSchedule(BaselineSchedule):
    """``schedule=mixout``: the baseline's optimizer and LR schedule; Linear weights mixed toward
    their start-of-training values with probability ``schedule.mix_p`` (Mixout's ``p``); dropout off
    (``schedule.disable_dropout``)."""

    name = "mixout"
    schema = MixoutConfig

    def __init__(self, cfg: MixoutConfig | Mapping[str, Any]):
        super().__init__(cfg)
        self.mixout: Mixout | None = None
        self._wrappers: dict[str, MixoutWeight] | None = None

    def _patterns(self, patterns: ParamPatterns) -> tuple[str, ...]:
        """Mixout mixes the Linears DPS would select (the model's ``dps`` patterns) unless told otherwise."""
        return resolve_patterns(self.cfg.mixout_patterns, patterns, "dps", KEY)

    def prepare_model(self, model: nn.Module, patterns: ParamPatterns) -> None:
        if self.cfg.disable_dropout:
            disable_dropout(model)
        self._wrappers = attach_mix(model, self._patterns(patterns), KEY)

    def setup(self, model: nn.Module, patterns: ParamPatterns, total_steps: int) -> None:
        if self._wrappers is None:
            self._wrappers = attach_mix(model, self._patterns(patterns), KEY)
        super().setup(model, patterns, total_steps)
        # the targets are snapshotted here, after the loop moved the model to its device
        self.mixout = Mixout(model, self.cfg.mix_p, wrappers=self._wrappers, seed=shared_seed(), key=KEY)
        self.restore_pending_state()

    def log_metrics(self, step: int) -> dict[str, float]:
        return {**super().log_metrics(step), "mixout/kept_columns": self.mixout.kept}

    def state_owner(self) -> Mixout | None:
        return self.mixout
