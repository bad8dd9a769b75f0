"""What the spec files of ``adaptune compare`` and ``adaptune search`` share: finding one (a shipped
preset ``conf/<group>/NAME.yaml`` or a user's YAML file by its path), reading it as a mapping with
known keys, and the checks of the keys both have (``experiment``, ``seeds``, ``overrides``); every
problem is a one-line ConfigError naming the file and the key."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

from adaptune.common.errors import ConfigError

_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def names(conf: Path, group: str) -> list[str]:
    """The options of a config group (file stems of ``conf/<group>/*.yaml``)."""
    return sorted(p.stem for p in (conf / group).glob("*.yaml"))


def override_key(item: str) -> str:
    """``key`` of a Hydra override ``[+~]key=value``."""
    return item.partition("=")[0].lstrip("+~")


def check_override(item, where: str, reserved: tuple[str, ...], owner: str) -> str:
    """``item`` if it is a Hydra override ``key=value`` whose key is not one of ``reserved`` (the
    keys the command sets itself; ``owner`` says who and from what, for the message)."""
    if not isinstance(item, str) or "=" not in item:
        raise ConfigError(f"{where}: {item!r} is not a hydra override (key=value)")
    if override_key(item) in reserved:
        raise ConfigError(f"{where}: {override_key(item)} is set by {owner}")
    return item


def is_path(name: str) -> bool:
    """A spec argument that names a file (``my_grid.yaml``, ``specs/x.yml``, ``./x``) rather than a preset."""
    return name.endswith((".yaml", ".yml")) or "/" in name or "\\" in name


def locate(name: str, conf: Path, group: str, kind: str) -> tuple[Path, str, str]:
    """(file, name, how to cite it in messages) of a ``kind`` spec ("compare spec"): the preset
    ``conf/<group>/NAME.yaml`` or a user's YAML file by its path (its name is the file's stem)."""
    if is_path(name):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"{kind} {name} does not exist (a YAML file, or one of the presets: {', '.join(names(conf, group))})"
            )
        if not _NAME.fullmatch(path.stem):
            raise ConfigError(
                f"{kind} {name}: its file name names the {group} and may only hold letters, digits, '_', '.' and '-'"
            )
        return path, path.stem, str(name)
    path = conf / group / f"{name}.yaml"
    if not _NAME.fullmatch(name) or not path.is_file():
        raise ConfigError(
            f"conf/{group}/{name}.yaml does not exist; allowed names: "
            f"{', '.join(names(conf, group))} (or the path of a YAML file)"
        )
    return path, name, f"conf/{group}/{name}.yaml"


def read(path: Path, where: str, keys: tuple[str, ...]) -> dict:
    """The YAML file as a plain mapping whose keys are all in ``keys``."""
    from omegaconf import OmegaConf

    try:
        spec = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as err:
        raise ConfigError(f"{where}: {str(err).splitlines()[0]}") from err
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected a mapping with keys {', '.join(keys)}")
    for key in spec:
        if key not in keys:
            raise ConfigError(f"{where}: unknown key '{key}'; allowed: {', '.join(keys)}")
    return spec


def experiment(spec: dict, where: str, conf: Path) -> str | None:
    """``experiment``: null or one of ``conf/experiment``."""
    value = spec.get("experiment")
    if value is not None and value not in names(conf, "experiment"):
        raise ConfigError(f"{where}: experiment={value} is unknown; allowed: {', '.join(names(conf, 'experiment'))}")
    return value


def seeds(spec: dict, where: str) -> list[int]:
    """``seeds``: a non-empty list of distinct integers."""
    value = spec.get("seeds")
    if (
        not isinstance(value, list)
        or not value
        or len(set(value)) != len(value)
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in value)
    ):
        raise ConfigError(f"{where}: seeds: expected a non-empty list of distinct integers, got {value!r}")
    return value


def overrides(spec: dict, where: str, check: Callable[[object, str], str]) -> list[str]:
    """``overrides``: a list of Hydra overrides, each passed through ``check(item, where)``."""
    value = spec.get("overrides") or []
    if not isinstance(value, list):
        raise ConfigError(f"{where}: overrides: expected a list of key=value, got {value!r}")
    return [check(o, f"{where}: overrides") for o in value]
