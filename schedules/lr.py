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


class LinearWarmupDecay:
    """Linear warmup from 0 over ``warmup`` updates, then linear decay to 0 at ``total``."""

    def __init__(self, warmup: int, total: int):
        self.warmup, self.total = int(warmup), int(total)

    def __call__(self, s: int) -> float:
        if s < self.warmup:
            return s / max(1, self.warmup)
        return max(0.0, (self.total - s) / max(1, self.total - self.warmup))


class WarmupLinearPPB:
    """pytorch-pretrained-bert 0.6.0's ``warmup_linear`` (MT-DNN's optimizers, hence the SAGE
    paper's GLUE runs): with progress ``x = s / total`` and ``w = warmup / total``, the factor is
    ``x / w`` while ``x < w``, else ``1 - x``. It is *not* ``linear``: after warmup it continues from
    ``1 - w`` (0.9 for a 10% warmup) rather than restarting at 1, so every later step's lr is
    ``(1 - w)`` times ``linear``'s (x 1/1.11 for w = 0.1), reaching 0 at ``total``. As in the
    reference, ``s`` counts the updates completed before this one (the first update gets 0).
    (choice) ``w`` is ``warmup / total`` of the integer warmup steps (``schedule.warmup_ratio``
    rounded to whole updates), which equals the reference's ratio whenever ``ratio * total`` is a
    whole number."""

    def __init__(self, warmup: int, total: int):
        self.warmup, self.total = int(warmup), int(total)

    def __call__(self, s: int) -> float:
        x = s / max(1, self.total)
        w = self.warmup / max(1, self.total)
        return x / w if x < w else max(0.0, 1.0 - x)


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


_FACTORS = {
    "linear": LinearWarmupDecay,
    "warmup_linear_ppb": WarmupLinearPPB,
    "inverse_sqrt": InverseSqrt,
    "constant": ConstantWarmup,
    "cosine": CosineWarmup,
}
#: the names ``schedule.lr_schedule`` accepts (the schema reads them from here)
LR_SCHEDULES = tuple(_FACTORS)


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


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, kind: str, warmup: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    if kind not in _FACTORS:
        raise ConfigError(f"schedule.lr_schedule='{kind}' is unknown; allowed: {', '.join(LR_SCHEDULES)}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _FACTORS[kind](warmup, total_steps))
