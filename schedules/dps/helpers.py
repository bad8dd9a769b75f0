"""DPS's small pieces: argument checks, phase length, keep counts, the top-k threshold."""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import torch

from adaptune.common.errors import ConfigError

from ..defaults import check_range
from ..linear import PARAMETRIZED_SUFFIX, canonical_name, disable_dropout, linear_weights  # noqa: F401  (re-exported)
from ..sync import default_seed  # noqa: F401  (re-exported: adaptune.schedules.dps.default_seed)


def check_dps_hparams(p: Any, update_ratio: Any, variant: Any) -> None:
    """DPS's own argument checks: ValueError naming the argument (``p`` in [0, 1), ``update_ratio``
    in (0, 1], ``variant`` dense | mix)."""
    check_range("p", p, 0, 1)
    check_range("update_ratio", update_ratio, 0, 1, low_open=True, high_open=False)
    if variant not in ("dense", "mix"):
        raise ValueError(f"variant must be 'dense' or 'mix', got {variant!r}")


def phase_length(total_steps: int, update_ratio: float, prefix: str = "schedule", horizon_key: str | None = None) -> int:
    """``U = int(T * update_ratio)``; ``U < 1`` is a ConfigError naming both values (and
    ``horizon_key``, the key that set ``T``, when one did)."""
    length = int(total_steps * update_ratio)
    if length < 1:
        steps = horizon_key or "the number of training steps"
        raise ConfigError(
            f"DPS phase length int(T * {prefix}.update_ratio) = int({total_steps} * {update_ratio}) "
            f"= {length} < 1; raise {prefix}.update_ratio or {steps}"
        )
    return length


def keep_count(numel: int, p: float) -> int:
    """``ceil(numel * (1 - p))`` in exact arithmetic on p's decimal value (see module docstring)."""
    return math.ceil(numel * (1 - Fraction(repr(float(p)))))


def topk_threshold(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """The value of rank ``keep`` in ``scores`` sorted descending (a 0-d tensor).

    ``scores >= result`` keeps at least ``keep`` entries (exactly ``keep`` without ties at the
    threshold; ties are all kept).
    """
    flat = scores.reshape(-1)
    dropped = flat.numel() - keep + 1  # the threshold is also the max of the lowest `dropped`
    if keep <= dropped:
        return torch.topk(flat, keep, sorted=False).values.min()
    return torch.topk(flat, dropped, largest=False, sorted=False).values.max()
