"""SAGE for ``timm.optim.create_optimizer_v2`` users::

    from timm.optim import create_optimizer_v2
    from adaptune.schedules.integrations.timm import register_sage_optimizers, sage_param_group_fn

    register_sage_optimizers()            # adds "adamwsage" / "adamaxsage" to timm's registry
    opt = create_optimizer_v2(model, opt="adamwsage", lr=1e-4, weight_decay=0.05, beta3=0.75,
                              param_group_fn=sage_param_group_fn(weight_decay=0.05))

``create_optimizer_v2`` hands the groups that ``param_group_fn(model)`` returns straight to the
optimizer class (``opt_class(groups, weight_decay=..., lr=..., **kwargs)``; timm 1.0.31): the
groups carry ``sage`` and their own ``weight_decay`` (0 for the family's ``no_decay`` tensors:
biases, norms, ``pos_embed``, ``cls_token``), so the top-level ``weight_decay`` only reaches groups
that do not set one (none). Extra keyword arguments (``beta3``, ``bias_correction``, ``fused``)
pass through to the optimizer.

**(choice)** Registry names without underscores: ``create_optimizer_v2`` reads ``opt`` as
``[lookahead_]name`` and keeps only the text after the last ``_``, so ``adamw_sage`` would be looked
up as ``sage``. ``lookahead_adamwsage`` works. The patterns default to the ``vit`` family (timm
``VisionTransformer``: ``blocks.N.attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``); pass
``family`` or ``sage_patterns`` for other architectures. A model that also has a
``no_weight_decay()`` method: its names are added to the no-decay set.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from adaptune.common.extras import require
from adaptune.common.families import family_patterns

from ..sage import AdamaxSAGE, AdamWSAGE, sage_param_groups

__all__ = ["register_sage_optimizers", "sage_param_group_fn"]

NAMES = {"adamwsage": AdamWSAGE, "adamaxsage": AdamaxSAGE}


def sage_param_group_fn(family: str = "vit", *, weight_decay: float = 0.05,
                        sage_patterns: Sequence[str] | None = None,
                        no_decay: Sequence[str] | None = None) -> Callable[[torch.nn.Module], list[dict]]:
    """A ``param_group_fn`` for ``create_optimizer_v2``: the model's SAGE groups (see module docstring)."""
    def groups(model: torch.nn.Module) -> list[dict]:
        skip = tuple(no_decay) if no_decay is not None else tuple(family_patterns(family, "no_decay"))
        skip += tuple(getattr(model, "no_weight_decay", lambda: ())())
        return sage_param_groups(model, family=family, sage_patterns=sage_patterns, no_decay=skip,
                                 weight_decay=weight_decay)

    return groups


def register_sage_optimizers() -> list[str]:
    """Register AdamW-SAGE / Adamax-SAGE in timm's optimizer registry (idempotent); their names."""
    require("timm", "adaptune.schedules.integrations.timm")
    from timm.optim import OptimInfo
    from timm.optim._optim_factory import default_registry

    for name, cls in NAMES.items():
        if name not in default_registry.list_optimizers():
            default_registry.register(OptimInfo(name=name, opt_class=cls, has_betas=True,
                                                description=f"{cls.__name__} (SAGE, adaptune.schedules.sage)"))
    return list(NAMES)
