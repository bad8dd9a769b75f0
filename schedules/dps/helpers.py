"""DPS's small pieces: phase length, keep counts, the top-k threshold, names, seeds, dropout."""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from adaptune.common.errors import ConfigError

from ..defaults import check_range
from ..sync import default_seed  # noqa: F401  (re-exported: adaptune.schedules.dps.default_seed)

PARAMETRIZED_SUFFIX = "parametrizations.weight.original"


def check_dps_hparams(p: Any, update_ratio: Any, variant: Any) -> None:
    """DPS's own argument checks: ValueError naming the argument (``p`` in [0, 1), ``update_ratio``
    in (0, 1], ``variant`` dense | mix)."""
    check_range("p", p, 0, 1)
    check_range("update_ratio", update_ratio, 0, 1, low_open=True, high_open=False)
    if variant not in ("dense", "mix"):
        raise ValueError(f"variant must be 'dense' or 'mix', got {variant!r}")


def phase_length(total_steps: int, update_ratio: float, prefix: str = "schedule",
                 horizon_key: str | None = None) -> int:
    """``U = int(T * update_ratio)``; ``U < 1`` is a ConfigError naming both values (and
    ``horizon_key``, the key that set ``T``, when one did)."""
    length = int(total_steps * update_ratio)
    if length < 1:
        steps = horizon_key or "the number of training steps"
        raise ConfigError(
            f"DPS phase length int(T * {prefix}.update_ratio) = int({total_steps} * {update_ratio}) "
            f"= {length} < 1; raise {prefix}.update_ratio or {steps}")
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
    dropped = flat.numel() - keep + 1          # the threshold is also the max of the lowest `dropped`
    if keep <= dropped:
        return torch.topk(flat, keep, sorted=False).values.min()
    return torch.topk(flat, dropped, largest=False, sorted=False).values.max()


def canonical_name(name: str) -> str:
    """``a.b.parametrizations.weight.original`` -> ``a.b.weight`` (other names unchanged)."""
    if name == PARAMETRIZED_SUFFIX:
        return "weight"
    if name.endswith("." + PARAMETRIZED_SUFFIX):
        return name[: -len(PARAMETRIZED_SUFFIX)] + "weight"
    return name


def linear_weights(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, weight)`` of every ``nn.Linear`` in ``model`` (plain names, also when parametrized)."""
    out = []
    for mod_name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if parametrize.is_parametrized(module, "weight"):
            weight = module.parametrizations.weight.original
        else:
            weight = module.weight
        out.append((f"{mod_name}.weight" if mod_name else "weight", weight))
    return out


def disable_dropout(model: nn.Module) -> int:
    """Set every dropout probability in ``model`` to 0 (the DPS preset); returns how many were set.

    Covers ``nn.Dropout*`` modules, any module whose class name contains ``Dropout`` with a float
    ``p`` (fairseq's ``FairseqDropout``, ...), float attributes whose name contains ``dropout``
    (e.g. ``attention_dropout`` read at forward time by some Hugging Face attention classes), and
    the float ``*dropout*`` entries of a Hugging Face ``model.config`` (for code that reads the
    config at forward time). Transformers 5's BERT self-attention reads ``self.dropout.p`` at
    every forward, so zeroing the module is enough there; tests/test_dps.py checks that two
    training-mode forwards agree. Stochastic depth (timm ``DropPath``) is not dropout and is left.
    """
    changed = 0
    for module in model.modules():
        is_dropout = isinstance(module, nn.modules.dropout._DropoutNd) or (
            "Dropout" in type(module).__name__ and isinstance(getattr(module, "p", None), float))
        if is_dropout and module.p != 0.0:
            module.p = 0.0
            changed += 1
        for attr, value in list(vars(module).items()):
            if "dropout" in attr.lower() and isinstance(value, float) and value != 0.0:
                setattr(module, attr, 0.0)
                changed += 1
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        for key, value in config.to_dict().items():
            if "dropout" in key.lower() and isinstance(value, float) and value != 0.0:
                setattr(config, key, 0.0)
                changed += 1
    return changed
