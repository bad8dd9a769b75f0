"""The Mixout-style weight mix shared by DPS-Mix and Mixout, with the reference backward.

Both references (DPS's ``MixLinear`` op and ``bloodwass/mixout``) compute, in the forward pass::

    W_eff = ((1-N)·R + N·W - p·R) / (1-p)   ==   R + N·(W - R) / (1-p)

(``R`` the reference weight, ``N`` a 0/1 mask, ``p`` the mix probability) and return, from a
custom backward, ``dL/dW = dL/dW_eff ⊙ N`` **without** the ``1/(1-p)`` factor that true autograd
would give (docs/algorithms.md §2 and §3). :func:`mix_weight` reproduces exactly that: the selected
entries get the gradient of ``W_eff`` unscaled, so a global-norm clip sees what the references'
clip saw. No gradient flows to ``R`` or ``N`` (constants).

:class:`MixoutWeight` is that forward as a parametrization of a Linear's weight, and
:func:`attach_mix` wraps the selected Linears of a model with it: DPS-Mix binds the wrappers to
``W_pre`` / ``W_tgt`` and its masks, Mixout to the pretrained weight and its column draws.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from adaptune.common.errors import ConfigError

from .linear import PARAMETRIZED_SUFFIX, linear_weights
from .patterns import select_names


class _MixWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor, scale: float):
        ctx.save_for_backward(mask)
        return torch.add(reference, (weight - reference) * mask, alpha=scale)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (mask,) = ctx.saved_tensors
        return grad_out * mask, None, None, None


def mix_weight(weight: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """``reference + mask·(weight - reference)·scale`` whose gradient to ``weight`` is
    ``grad ⊙ mask`` (the references' backward; ``scale`` is ``1/(1-p)``). ``mask`` broadcasts
    against ``weight`` (``(1, in)`` per input column, or ``(out, in)``) and may be bool (used as it
    is: multiplying by a bool tensor promotes on the fly, no float copy of the mask is made)."""
    return _MixWeight.apply(weight, reference, mask, float(scale))


class MixoutWeight(nn.Module):
    """Parametrization of one Linear's ``weight`` for the mix (DPS-Mix, Mixout).

    Holds no parameters or buffers (nothing enters the model's state dict): ``reference``
    (``W_pre`` or ``W_tgt``), ``mask`` (bool, ``(1, in)`` or ``(out, in)``) and ``scale``
    (``1/(1-p)``) are plain attributes that DPS or Mixout set before every optimizer step.
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


def _load_pre_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    plain, wrapped = prefix + "weight", prefix + PARAMETRIZED_SUFFIX
    if plain in state_dict and wrapped not in state_dict:
        state_dict[wrapped] = state_dict.pop(plain)


def attach_mix(
    model: nn.Module, patterns: Sequence[str] | None = None, key: str = "schedule.dps_patterns"
) -> dict[str, MixoutWeight]:
    """Wrap the weight of every selected ``nn.Linear`` of ``model`` for the mix (idempotent).

    Returns ``{plain weight name: MixoutWeight}``, to pass as ``DPS(..., mix=...)`` or
    ``Mixout(..., wrappers=...)``. ``patterns`` None selects every Linear. Until DPS or Mixout
    binds them the wrappers are the identity.
    """
    names = [n for n, w in linear_weights(model) if w.requires_grad]
    chosen = select_names(names, list(patterns), key) if patterns is not None else names
    if not chosen:
        raise ConfigError(f"{key}: this model has no trainable nn.Linear weight to mix")
    wrappers: dict[str, MixoutWeight] = {}
    for name in chosen:
        module = model.get_submodule(name[: -len(".weight")] if name != "weight" else "")
        if parametrize.is_parametrized(module, "weight"):
            existing = [m for m in module.parametrizations.weight if isinstance(m, MixoutWeight)]
            if not existing:
                raise ConfigError(f"{name} already carries another parametrization; the mix cannot wrap it")
            wrappers[name] = existing[0]
            continue
        wrapper = MixoutWeight()
        wrapper.train(module.training)
        parametrize.register_parametrization(module, "weight", wrapper)
        module.register_state_dict_post_hook(_state_dict_post_hook)
        module.register_load_state_dict_pre_hook(_load_pre_hook)
        wrappers[name] = wrapper
    return wrappers
