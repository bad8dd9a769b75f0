"""The spec of ``adaptune search``: loading and validating it (one-line ConfigError naming the key),
its Optuna search space and a trial's multirun command."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

from adaptune.common.errors import ConfigError
from adaptune.conf import CONFIG_DIR as CONF

from .. import specs
from ..compare import _key, _names, fmt

KEYS = ("experiment", "schedule", "seeds", "overrides", "params", "n_trials", "sampler_seed", "startup_trials", "direction")
PARAM_KEYS = ("low", "high", "log", "choices")
DIRECTIONS = ("maximize", "minimize")
#: chosen by the search itself: an override or a searched key may not set them
RESERVED = ("seed", "schedule", "name", "experiment", "hydra.sweep.dir", "hydra.sweep.subdir")
#: the results.json block a trial is scored on (the report's default ``--which final``)
BLOCK = "final"


def locate(name: str) -> tuple[Path, str, str]:
    """(file, name, how to cite it) of a search spec: a shipped preset NAME or a YAML file's path."""
    return specs.locate(name, CONF, "search", "search spec")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_override(item, where: str) -> str:
    return specs.check_override(
        item,
        where,
        RESERVED,
        "adaptune search (the experiment, schedule and seeds come from the spec's keys, the run directories from the trial)",
    )


def _param(where: str, name: str, space) -> dict:
    where = f"{where}: params.{name}"
    if not re.fullmatch(r"[A-Za-z_][\w.]*", name) or name in RESERVED or name.startswith("hydra"):
        raise ConfigError(
            f"{where}: not a searchable key (a config key such as schedule.lr; "
            f"{', '.join(RESERVED)} and hydra.* are set by adaptune search)"
        )
    if not isinstance(space, dict):
        raise ConfigError(f"{where}: expected {{low: L, high: H, log: true|false}} or {{choices: [...]}}")
    for key in space:
        if key not in PARAM_KEYS:
            raise ConfigError(f"{where}: unknown key '{key}'; allowed: {', '.join(PARAM_KEYS)}")
    if "choices" in space:
        choices = space["choices"]
        if set(space) != {"choices"}:
            raise ConfigError(f"{where}: choices does not combine with low, high or log")
        if (
            not isinstance(choices, list)
            or not choices
            or len(set(map(str, choices))) != len(choices)
            or not all(
                is_number(c) or isinstance(c, bool) or (isinstance(c, str) and re.fullmatch(r"[\w.+-]+", c)) for c in choices
            )
        ):
            raise ConfigError(
                f"{where}: choices: expected a non-empty list of distinct numbers, booleans or plain words, got {choices!r}"
            )
        return {"choices": choices}
    low, high, log = space.get("low"), space.get("high"), space.get("log", False)
    if not is_number(low) or not is_number(high) or not low < high:
        raise ConfigError(f"{where}: expected numbers low < high, got low={low!r}, high={high!r}")
    if not isinstance(log, bool):
        raise ConfigError(f"{where}: log: expected true or false, got {log!r}")
    if log and low <= 0:
        raise ConfigError(f"{where}: log: true needs low > 0, got low={low!r}")
    return {"low": float(low), "high": float(high), "log": log}


def load(name: str) -> dict:
    """The validated search spec (preset NAME or a YAML file's path); ConfigError (one line) if not."""
    path, name, where = locate(name)
    spec = specs.read(path, where, KEYS)
    experiment = specs.experiment(spec, where, CONF)
    schedule = spec.get("schedule")
    if schedule not in _names("schedule"):
        raise ConfigError(f"{where}: schedule={schedule} is unknown; allowed: {', '.join(_names('schedule'))}")
    seeds = specs.seeds(spec, where)
    overrides = specs.overrides(spec, where, check_override)
    params = spec.get("params")
    if not isinstance(params, dict) or not params:
        raise ConfigError(f"{where}: params: expected a mapping of key -> {{low, high, log}} or {{choices}}")
    params = {str(k): _param(where, str(k), v) for k, v in params.items()}
    for item in overrides:
        if _key(item) in params:
            raise ConfigError(f"{where}: overrides: {_key(item)} is searched (params); drop it from overrides")
    n_trials = spec.get("n_trials")
    if not _is_int(n_trials) or n_trials < 1:
        raise ConfigError(f"{where}: n_trials: expected a positive integer, got {n_trials!r}")
    sampler_seed = spec.get("sampler_seed")
    if sampler_seed is not None and (not _is_int(sampler_seed) or sampler_seed < 0):
        raise ConfigError(f"{where}: sampler_seed: expected a non-negative integer or null, got {sampler_seed!r}")
    startup = spec.get("startup_trials", 10)
    if not _is_int(startup) or startup < 0:
        raise ConfigError(f"{where}: startup_trials: expected a non-negative integer, got {startup!r}")
    direction = spec.get("direction", "maximize")
    if direction not in DIRECTIONS:
        raise ConfigError(f"{where}: direction={direction} is unknown; allowed: {', '.join(DIRECTIONS)}")
    return {
        "name": name,
        "source": where,
        "experiment": experiment,
        "schedule": schedule,
        "seeds": seeds,
        "overrides": overrides,
        "params": params,
        "n_trials": n_trials,
        "sampler_seed": sampler_seed,
        "startup_trials": startup,
        "direction": direction,
    }


def check_extra(spec: dict, extra: list[str]) -> None:
    for item in extra:
        check_override(item, "extra override")
        if _key(item) in spec["params"]:
            raise ConfigError(f"{_key(item)} is searched in {spec['source']} (params); edit its range there")


def distributions(spec: dict) -> dict:
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    return {
        k: CategoricalDistribution(p["choices"]) if "choices" in p else FloatDistribution(p["low"], p["high"], log=p["log"])
        for k, p in spec["params"].items()
    }


def command(spec: dict, params: dict, trial_dir: Path, extra: list[str] = ()) -> list[str]:
    """The multirun of one trial: every seed at ``params``, into ``trial_dir/seed_S``."""
    cmd = [sys.executable, "-m", "adaptune", "-m"]
    if spec["experiment"]:
        cmd.append(f"experiment={spec['experiment']}")
    cmd.append(f"schedule={spec['schedule']}")
    cmd += [f"{k}={fmt(params[k])}" for k in sorted(params)]
    cmd += [
        "seed=" + ",".join(str(s) for s in spec["seeds"]),
        f"name={spec['name']}",
        f"hydra.sweep.dir={trial_dir}",
        "hydra.sweep.subdir=seed_${seed}",
    ]
    return cmd + list(spec["overrides"]) + list(extra)


def composed_selection_split(spec: dict, extra: list[str]):
    """Compose the first run's config (a one-line ConfigError if it does not compose) and return its
    ``task.selection_split``."""
    from hydra import compose, initialize_config_dir

    from adaptune.runner.app import CONFIG_DIR, composition_message

    sample = {k: p["choices"][0] if "choices" in p else p["low"] for k, p in spec["params"].items()}
    overrides = [o for o in command(spec, sample, Path("."), extra)[4:] if not _key(o).startswith("hydra")]
    overrides = [o for o in overrides if _key(o) != "seed"] + [f"seed={spec['seeds'][0]}"]
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
        return cfg.task.get("selection_split")
    except Exception as err:
        raise ConfigError(composition_message(err)) from err
