"""The SAGE / DPS / no-decay name patterns of a model handed to an integration.

**(choice)** A PEFT model with LoRA adapters (trainable parameters named ``...lora_A...`` /
``...lora_B...``) gets ``adaptune.common.families.lora_patterns``: DPS selects from both adapter matrices (peft's
``lora_A`` / ``lora_B`` are ``nn.Linear`` modules, so DPS sees their weights as Linear weights);
SAGE scales ``lora_A`` only. SAGE's multiplier ``|I - Ī| / (Ī + ε²)`` with ``I = |θ ⊙ g|`` is
exactly 0 wherever ``θ = 0``, and peft initialises ``lora_B`` to zeros: under SAGE it would never
move, so ``lora_A`` (whose gradient is proportional to ``lora_B``) would never get a gradient and the
adapter would never train (``tests/test_integrations_peft.py`` shows it). ``lora_B`` is trained by
the base optimizer's plain maths (the same Adamax / AdamW moments, no SAGE scaling). Everything
else that is trainable (e.g. a classifier head kept trainable by peft's ``modules_to_save``) is
trained by the plain maths and never masked. Frozen
base weights are never in any optimizer group. The runner's LoRA tasks (``task.peft=lora``) use
the same patterns (``tasks/lora.py``).

Other models: the family of ``model.config.model_type`` (``common/families.py``), or the one
passed as ``family``.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from adaptune.common.errors import ConfigError
from adaptune.common.families import (
    FAMILY_PATTERNS,
    HF_MODEL_TYPES,
    LORA_SUBSTRINGS,
    ParamPatterns,
    family_patterns,
    lora_patterns,
)

from ..patterns import resolve_patterns


def is_lora_model(model: torch.nn.Module) -> bool:
    """Whether ``model`` has trainable LoRA adapter weights (a peft LoRA model)."""
    return any(p.requires_grad and any(s in n for s in LORA_SUBSTRINGS) for n, p in model.named_parameters())


def infer_family(model: torch.nn.Module) -> str:
    """The pattern family of a Hugging Face model from ``model.config.model_type``."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in HF_MODEL_TYPES:
        return HF_MODEL_TYPES[model_type]
    raise ConfigError(
        f"family: cannot infer the parameter patterns of model_type={model_type!r}; pass family= "
        f"(allowed: {', '.join(sorted(FAMILY_PATTERNS))}) or explicit patterns"
    )


def model_patterns(model: torch.nn.Module, family: str | None = None) -> ParamPatterns:
    """``{"sage", "dps", "no_decay"}`` patterns for ``model``: LoRA adapters for a LoRA model, else
    the family's (``family`` or inferred from ``model.config.model_type``)."""
    lora = is_lora_model(model)
    if family is None:
        try:
            family = infer_family(model)
        except ConfigError:
            if not lora:
                raise
            family = "bert"  # LoRA: only no_decay comes from the family (biases, norms)
    base: Mapping[str, tuple[str, ...]] = family_patterns(family)
    return lora_patterns(dict(base)) if lora else dict(base)


def dps_patterns(model: torch.nn.Module, patterns: Sequence[str] | None, family: str | None) -> list[str]:
    """The weights DPS selects in a model handed to an integration: ``patterns``, else the model's
    (LoRA adapters, or its family's DPS Linears): :func:`~adaptune.schedules.patterns.resolve_patterns`."""
    return list(resolve_patterns(patterns, model_patterns(model, family) if not patterns else {}, "dps", "patterns"))
