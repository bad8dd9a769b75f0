"""Optimizer-ready SAGE parameter groups for users outside the runner::

groups = sage_param_groups(model, family="bert", weight_decay=0.01)
opt = AdamaxSAGE(groups, lr=2e-4, beta3=0.85)     # works with HF Trainer(optimizers=(opt, sched))
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..param_groups import build_param_groups, strip_names
from ..patterns import family_patterns


def sage_param_groups(
    model_or_named_params,
    family: str = "bert",
    sage_patterns: Sequence[str] | None = None,
    no_decay: Sequence[str] | None = None,
    weight_decay: float = 0.01,
) -> list[dict]:
    """Optimizer-ready parameter groups for SAGE, for use outside the runner.

    Args:
        model_or_named_params: an ``nn.Module`` or an iterable of ``(name, parameter)``.
        family: model family whose default patterns apply (``bert``, ``roberta``, ``deberta``,
            ``fairseq_transformer``, ``vit``; see ``common/families.py``).
        sage_patterns: name substrings of the SAGE tensors (default: the family's).
        no_decay: name substrings of tensors without weight decay (default: the family's).
        weight_decay: decay of the other tensors.

    Returns:
        Groups with ``params``, ``weight_decay`` and ``sage`` (no ``names``), ready for
        :class:`AdamWSAGE` / :class:`AdamaxSAGE`. A pattern list matching no parameter raises
        :class:`~adaptune.common.errors.ConfigError`.
    """
    named = (
        model_or_named_params.named_parameters() if isinstance(model_or_named_params, torch.nn.Module) else model_or_named_params
    )
    groups = build_param_groups(
        named,
        weight_decay=weight_decay,
        no_decay=tuple(no_decay) if no_decay is not None else family_patterns(family, "no_decay"),
        flag="sage",
        flag_patterns=tuple(sage_patterns) if sage_patterns else family_patterns(family, "sage"),
        flag_key="sage_patterns",
    )
    return strip_names(groups)
