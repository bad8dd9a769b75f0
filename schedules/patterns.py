"""Matching parameter names against patterns (substrings, as the reference implementations do).

The patterns themselves belong to the models: the task supplies them (``Task.param_patterns``),
drawing on :mod:`adaptune.common.families`, re-exported here for code outside the runner.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

from adaptune.common.errors import ConfigError
from adaptune.common.families import FAMILY_PATTERNS, ParamPatterns, family_patterns

__all__ = ["FAMILY_PATTERNS", "ParamPatterns", "family_patterns", "matches", "resolve_patterns", "select_names"]


def matches(name: str, patterns: Iterable[str]) -> bool:
    """True when any pattern is a substring of ``name``."""
    return any(p in name for p in patterns)


def select_names(names: Sequence[str], patterns: Sequence[str], key: str) -> list[str]:
    """Names matched by ``patterns``; a pattern list that matches nothing is a ConfigError.

    ``key`` is the config key the patterns came from, used in the message.
    """
    chosen = [n for n in names if matches(n, patterns)]
    if not chosen:
        sample = ", ".join(list(names)[:6])
        raise ConfigError(f"{key}={list(patterns)} matches no parameter of this model (names look like: {sample}, ...)")
    return chosen


def resolve_patterns(explicit, patterns: Mapping[str, Sequence[str]], kind: str, key: str) -> tuple[str, ...]:
    """The one rule for which parameters a method touches: the patterns the user gave
    (``explicit``: a config key or an argument), else the model's own ``patterns[kind]`` (the task
    or the model family supplies them); ConfigError naming ``key`` when neither exists."""
    if explicit:
        return tuple(explicit)
    if kind not in patterns:
        raise ConfigError(f"this model declares no '{kind}' parameter patterns; set {key}")
    return tuple(patterns[kind])
