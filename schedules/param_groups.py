"""One place that turns a model's named parameters into optimizer parameter groups.

Every schedule builds its groups here: the decay / no-decay split (no weight decay for biases and
normalisation weights) and, optionally, a boolean flag per group (``sage=True`` for the tensors
matched by the SAGE patterns). Groups that would be empty are dropped; the order is stable
(flagged before unflagged, decay before no-decay) so optimizer state dicts line up across runs.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from .patterns import matches, select_names


def build_param_groups(
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
    *,
    weight_decay: float,
    no_decay: Sequence[str],
    flag: str | None = None,
    flag_patterns: Sequence[str] | None = None,
    flag_key: str = "schedule.patterns",
) -> list[dict]:
    """Split trainable parameters into groups.

    Args:
        named_parameters: ``model.named_parameters()``; frozen parameters are skipped.
        weight_decay: decay for the "decay" groups; "no-decay" groups get 0.
        no_decay: substrings; a matching name gets no weight decay.
        flag: name of a boolean group option (e.g. ``"sage"``), or None for no flag.
        flag_patterns: substrings selecting the flagged tensors; matching nothing raises
            :class:`ConfigError` naming ``flag_key``.

    Returns:
        A list of dicts with ``params``, ``weight_decay``, ``names`` and (if ``flag``) the flag.
        ``names`` is for reporting; drop it before handing groups to an optimizer that stores it
        (see :func:`strip_names`).
    """
    named = [(n, p) for n, p in named_parameters if p.requires_grad]
    names = [n for n, _ in named]
    flagged: set[str] = set()
    if flag is not None:
        flagged = set(select_names(names, list(flag_patterns or ()), flag_key))
    buckets: dict[tuple[bool, bool], list[tuple[str, torch.nn.Parameter]]] = {}
    for n, p in named:
        key = (n in flagged, not matches(n, no_decay))
        buckets.setdefault(key, []).append((n, p))
    groups = []
    for is_flagged in (True, False) if flag is not None else (False,):
        for decays in (True, False):
            members = buckets.get((is_flagged, decays))
            if not members:
                continue
            group = {
                "params": [p for _, p in members],
                "names": [n for n, _ in members],
                "weight_decay": float(weight_decay) if decays else 0.0,
            }
            if flag is not None:
                group[flag] = is_flagged
            groups.append(group)
    return groups


def strip_names(groups: list[dict]) -> list[dict]:
    """Copies of ``groups`` without the ``names`` key (kept out of optimizer state dicts)."""
    return [{k: v for k, v in g.items() if k != "names"} for g in groups]
