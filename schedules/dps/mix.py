"""DPS-Mix's forward: a parametrization of each selected Linear's weight (see ``adaptune.schedules.dps``)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from adaptune.common.errors import ConfigError

from ..mixing import mix_weight
from ..patterns import select_names
from .helpers import PARAMETRIZED_SUFFIX, linear_weights


class MixoutWeight(nn.Module):
    """Parametrization of one Linear's ``weight`` under DPS-Mix (see module docstring).

    Holds no parameters or buffers (nothing enters the model's state dict): ``reference``
    (``W_pre`` or ``W_tgt``), ``mask`` (bool, ``(1, in)`` or ``(out, in)``) and ``scale``
    (``1/(1-p)``) are plain attributes that :class:`DPS` sets before every optimizer step.
    Unbound (``reference is None``) or in eval mode it returns the raw weight.
    """

    def __init__(self):
        super().__init__()
        self.reference: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        self.scale: float = 1.0

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.training or self.reference is None:
            return weight
        return mix_weight(weight, self.reference, self.mask, self.scale)


def _state_dict_post_hook(module, state_dict, prefix, local_metadata):
    key = prefix + PARAMETRIZED_SUFFIX
    if key in state_dict:
        state_dict[prefix + "weight"] = state_dict.pop(key)


def _load_pre_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                   error_msgs):
    plain, wrapped = prefix + "weight", prefix + PARAMETRIZED_SUFFIX
    if plain in state_dict and wrapped not in state_dict:
        state_dict[wrapped] = state_dict.pop(plain)


def attach_mix(model: nn.Module, patterns: Sequence[str] | None = None,
               key: str = "schedule.dps_patterns") -> dict[str, MixoutWeight]:
    """Wrap the weight of every selected ``nn.Linear`` of ``model`` for DPS-Mix (idempotent).

    Returns ``{plain weight name: MixoutWeight}``, to pass as ``DPS(..., mix=...)``. ``patterns``
    None selects every Linear. Until a :class:`DPS` binds them the wrappers are the identity.
    """
    names = [n for n, w in linear_weights(model) if w.requires_grad]
    chosen = select_names(names, list(patterns), key) if patterns is not None else names
    if not chosen:
        raise ConfigError(f"{key}: this model has no trainable nn.Linear weight for DPS-Mix")
    wrappers: dict[str, MixoutWeight] = {}
    for name in chosen:
        module = model.get_submodule(name[: -len(".weight")] if name != "weight" else "")
        if parametrize.is_parametrized(module, "weight"):
            existing = [m for m in module.parametrizations.weight if isinstance(m, MixoutWeight)]
            if not existing:
                raise ConfigError(f"{name} already carries another parametrization; DPS-Mix cannot wrap it")
            wrappers[name] = existing[0]
            continue
        wrapper = MixoutWeight()
        wrapper.train(module.training)
        parametrize.register_parametrization(module, "weight", wrapper)
        module.register_state_dict_post_hook(_state_dict_post_hook)
        module.register_load_state_dict_pre_hook(_load_pre_hook)
        wrappers[name] = wrapper
    return wrappers
