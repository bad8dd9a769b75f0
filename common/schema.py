"""Typed config schemas: one dataclass per config group, with range checks beside each field.

Every config group (``trainer``, ``schedule``, ``task`` per kind, ``logger``) has one dataclass.
Its fields hold the only default of each key; the YAML files in ``conf/`` are presets that extend
the schema (Hydra's ConfigStore, see ``runner/config.py``), so OmegaConf type-checks every key,
used in this run or not, and an unknown key is an error naming it. Range and closed-set checks
sit beside the field as ``setting(default, check=...)`` and run in :func:`build`::

    @dataclass
    class TrainerConfig:
        batch_size: int = setting(32, check=positive)
        precision: str = setting("auto", check=one_of("auto", "fp32", "bf16", "fp16"))

Components receive a dataclass instance (``build(TrainerConfig, mapping, "trainer")``) and read
attributes without fallback defaults.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

from .errors import ConfigError

#: A check returns None when the value is fine, else the end of a message: "must be > 0, got -1".
Check = Callable[[Any], "str | None"]


def setting(default: Any = dataclasses.MISSING, *, check: Check | None = None, factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field with a default (or a ``factory`` for lists/dicts) and an optional check."""
    meta = {"check": check} if check else {}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def optional(check: Check) -> Check:
    """``check``, or null."""
    return lambda v: None if v is None else check(v)


def positive(v: Any) -> str | None:
    """An integer > 0."""
    return None if _is_int(v) and v > 0 else f"must be a positive integer, got {v!r}"


def non_negative_int(v: Any) -> str | None:
    return None if _is_int(v) and v >= 0 else f"must be an integer >= 0, got {v!r}"


def at_least(low: float, *, open_: bool = False) -> Check:
    """A number >= low (> low when ``open_``)."""
    sign = ">" if open_ else ">="

    def check(v: Any) -> str | None:
        ok = _is_number(v) and (v > low if open_ else v >= low)
        return None if ok else f"must be a number {sign} {low:g}, got {v!r}"

    return check


def in_range(low: float, high: float, *, low_open: bool = False, high_open: bool = True) -> Check:
    """A number in the interval; brackets say which ends are open, as in the message."""
    text = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def check(v: Any) -> str | None:
        ok = _is_number(v) and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
        return None if ok else f"must be a number in {text}, got {v!r}"

    return check


def one_of(*allowed: Any) -> Check:
    """A value of a closed set; the message lists the allowed values."""

    def check(v: Any) -> str | None:
        if any(type(v) is type(a) and v == a for a in allowed):
            return None
        return f"={v!r} is unknown; allowed: {', '.join(str(a).lower() if isinstance(a, bool) else str(a) for a in allowed)}"

    return check


def pair_in(low: float, high: float) -> Check:
    """Two numbers in [low, high) (Adam's betas)."""

    def check(v: Any) -> str | None:
        ok = v is not None and len(v) == 2 and all(_is_number(b) and low <= b < high for b in v)
        return None if ok else f"must be two numbers in [{low:g}, {high:g}), got {list(v) if v is not None else v}"

    return check


def _message(key: str, problem: str) -> str:
    return f"{key}{problem}" if problem.startswith("=") else f"{key} {problem}"


def validate(obj: Any, prefix: str) -> None:
    """Run every field's check (recursing into nested dataclasses); ConfigError naming the key."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(value):
            validate(value, key)
        check = f.metadata.get("check")
        problem = check(value) if check is not None else None
        if problem:
            raise ConfigError(_message(key, problem))
    post = getattr(obj, "check", None)
    if callable(post):
        post(prefix)


def check_values(schema: type, prefix: str, **values: Any) -> None:
    """Run the checks of ``schema``'s fields on loose values (for APIs used outside the config,
    e.g. ``DPS(p=...)``), so that each range lives only beside its field."""
    checks = {f.name: f.metadata.get("check") for f in dataclasses.fields(schema)}
    for name, value in values.items():
        problem = checks[name](value) if checks.get(name) else None
        if problem:
            raise ConfigError(_message(f"{prefix}.{name}", problem))


def build(schema: type, cfg: Any, prefix: str) -> Any:
    """A validated ``schema`` instance from a mapping, a DictConfig or an instance.

    Unknown keys and values of the wrong type are ConfigErrors naming the key (as OmegaConf
    reports them when composing the config from the command line).
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(cfg, schema):
        obj = cfg
    else:
        try:
            data = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg or {})
            merged = OmegaConf.merge(OmegaConf.structured(schema), data)
            obj = OmegaConf.to_object(merged)
        except OmegaConfBaseException as err:
            raise ConfigError(omegaconf_message(err, prefix)) from None
    validate(obj, prefix)
    return obj


def omegaconf_message(err: Exception, prefix: str = "") -> str:
    """One line from an OmegaConf error: the full key, then its first line."""
    key = getattr(err, "full_key", None) or ""
    if prefix and key and not key.startswith(prefix + "."):
        key = f"{prefix}.{key}"
    first = (str(err).splitlines() or [type(err).__name__])[0]
    return f"{key}: {first}" if key else first


def field_of(cfg: Any, name: str) -> Any:
    """``cfg``'s ``name`` whether ``cfg`` is a mapping (a DictConfig, a dict) or a schema
    instance; None where it has none (for registries dispatching on ``name`` / ``kind``)."""
    return cfg.get(name) if isinstance(cfg, Mapping) else getattr(cfg, name, None)


_ABSENT = object()


def schema_default(schema: type, key: str) -> Any:
    """The default ``schema`` gives ``key`` (a fresh copy for list / dict defaults)."""
    for f in dataclasses.fields(schema):
        if f.name == key:
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            if f.default is dataclasses.MISSING:
                raise ValueError(f"{schema.__name__}.{key} has no default")
            return f.default
    raise ValueError(f"{schema.__name__} has no key {key!r}")


def preset(name: str, *, _root_: Any, _parent_: Any, _node_: Any) -> Any:
    """The ``${preset:NAME}`` resolver: ``presets.NAME`` where the experiment sets it, else the
    default the node's schema gives this key. A group option reads an experiment's setting that
    only it has through it (``conf/schedule/dps.yaml``: ``update_ratio: ${preset:dps_update_ratio}``),
    so that an experiment swept over several schedules never sets a key another one lacks, and the
    default stays in the schema."""
    from omegaconf import OmegaConf

    value = OmegaConf.select(_root_, f"presets.{name}", default=_ABSENT)
    if value is not _ABSENT:
        return value
    schema = OmegaConf.get_type(_parent_)
    if not dataclasses.is_dataclass(schema):
        raise ValueError(f"${{preset:{name}}} ({_node_._key()}) is not in a typed config node, so it has no default")
    return schema_default(schema, _node_._key())
