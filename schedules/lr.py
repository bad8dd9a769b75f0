"""Learning-rate schedules as multiplicative factors of the base lr (``torch.optim.lr_scheduler.LambdaLR``).

The factor objects are small classes rather than closures so that ``LambdaLR.state_dict()``
stores their (plain-number) attributes and a resumed run rebuilds the same schedule.
``factor(s)`` is the multiplier applied for the update that follows ``s`` completed updates,
exactly like Hugging Face's ``get_linear_schedule_with_warmup`` and fairseq's ``inverse_sqrt``.
"""
from __future__ import annotations

import math

import torch

from adaptune.common.errors import ConfigError

LR_SCHEDULES = ("linear", "inverse_sqrt", "constant", "cosine")


class LinearWarmupDecay:
    """Linear warmup from 0 over ``warmup`` updates, then linear decay to 0 at ``total``."""

    def __init__(self, warmup: int, total: int):
        self.warmup, self.total = int(warmup), int(total)

    def __call__(self, s: int) -> float:
        if s < self.warmup:
            return s / max(1, self.warmup)
        return max(0.0, (self.total - s) / max(1, self.total - self.warmup))


class InverseSqrt:
    """fairseq's ``inverse_sqrt``: linear warmup to 1, then ``sqrt(warmup / s)``."""

    def __init__(self, warmup: int, total: int = 0):
        self.warmup = int(warmup)

    def __call__(self, s: int) -> float:
        if self.warmup > 0 and s < self.warmup:
            return s / self.warmup
        return math.sqrt(max(1, self.warmup) / max(1, s))


class ConstantWarmup:
    """Linear warmup, then constant."""

    def __init__(self, warmup: int, total: int = 0):
        self.warmup = int(warmup)

    def __call__(self, s: int) -> float:
        return s / self.warmup if s < self.warmup else 1.0


class CosineWarmup:
    """Linear warmup, then half-cosine decay to 0 at ``total``."""

    def __init__(self, warmup: int, total: int):
        self.warmup, self.total = int(warmup), int(total)

    def __call__(self, s: int) -> float:
        if s < self.warmup:
            return s / max(1, self.warmup)
        progress = min(1.0, (s - self.warmup) / max(1, self.total - self.warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))


_FACTORS = {"linear": LinearWarmupDecay, "inverse_sqrt": InverseSqrt,
            "constant": ConstantWarmup, "cosine": CosineWarmup}


def warmup_steps(total_steps: int, warmup_ratio: float | None, warmup: int | None) -> int:
    """``warmup`` (absolute updates) wins over ``warmup_ratio`` (fraction of ``total_steps``)."""
    if warmup is not None:
        if int(warmup) < 0:
            raise ConfigError(f"schedule.warmup_steps must be >= 0, got {warmup}")
        return int(warmup)
    ratio = float(warmup_ratio or 0.0)
    if not 0.0 <= ratio < 1.0:
        raise ConfigError(f"schedule.warmup_ratio must be in [0, 1), got {warmup_ratio}")
    return int(round(ratio * total_steps))


def build_lr_scheduler(optimizer: torch.optim.Optimizer, kind: str, warmup: int,
                       total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    if kind not in _FACTORS:
        raise ConfigError(f"schedule.lr_schedule='{kind}' is unknown; allowed: {', '.join(LR_SCHEDULES)}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _FACTORS[kind](warmup, total_steps))
