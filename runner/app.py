"""The Hydra entry point: compose ``conf/``, run one training job, exit cleanly on user errors."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from adaptune.common.errors import ConfigError
from adaptune.common.extras import missing_message
from adaptune.conf import CONFIG_DIR as _CONF

from .config import register_configs
from .dirnames import dirname
from .hydra_errors import install_one_line_errors

log = logging.getLogger("adaptune")

#: The shipped configs (package data ``adaptune.conf``), found relative to the installed package.
CONFIG_DIR = str(_CONF)


def _point_subdir(overrides: str, items: str) -> str:
    from .compare import point_subdir

    return point_subdir(overrides, items)


def ceil_div(a, b) -> int:
    """``${ceil_div:a,b}`` = ceil(a / b) for positive integers (steps per epoch: examples, batch)."""
    a, b = int(a), int(b)
    if a < 1 or b < 1:
        raise ValueError(f"ceil_div needs positive integers, got {a}, {b}")
    return -(-a // b)


if not OmegaConf.has_resolver("dirname"):
    OmegaConf.register_new_resolver("dirname", dirname)
if not OmegaConf.has_resolver("compare_subdir"):
    OmegaConf.register_new_resolver("compare_subdir", lambda overrides, items: _point_subdir(overrides, items))
if not OmegaConf.has_resolver("ceil_div"):
    OmegaConf.register_new_resolver("ceil_div", ceil_div)


def user_error(message: str, code: int = 2) -> None:
    """Print one line for a mistake the user can fix and exit without a traceback."""
    print(f"adaptune: error: {message}", file=sys.stderr)
    sys.exit(code)


#: Launchers that Hydra plugins (``adaptune[sweeps]``) add.
PLUGIN_OPTIONS = ("joblib", "submitit_local", "submitit_slurm")

_MISSING_OPTION = re.compile(r"Could not (?:find|load) '([^']+)/([^'/]+)'")


def _unknown_schedule_key(err: OmegaConfBaseException) -> str | None:
    """A key the chosen schedule's schema lacks (``schedule=sage schedule.drop_p=0.5``, or an
    experiment preset setting another schedule's key): the line naming the schedule and its keys."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    from adaptune.schedules.config import SCHEDULE_SCHEMAS, unknown_key_message

    schema = getattr(err, "object_type", None)
    if not isinstance(err, (ConfigKeyError, ConfigAttributeError)) or schema not in SCHEDULE_SCHEMAS.values():
        return None
    node = getattr(err, "parent_node", None)
    label = None
    try:
        label = (node.get("label") or node.get("name")) if node is not None else None
    except OmegaConfBaseException:  # an unresolvable label: the schema's name
        pass
    return unknown_key_message(schema, str(getattr(err, "key", "")), label)


def composition_message(err: BaseException) -> str:
    """One line for a config that does not compose: an unknown group option (with the allowed
    ones), an unknown key or a value of the wrong type (naming the key), a bad override."""
    text = str(err)
    missing = _MISSING_OPTION.search(text)
    if missing:
        group, option = missing.groups()
        lines = text.splitlines()
        start = next((i for i, line in enumerate(lines) if line.startswith("Available options")), None)
        allowed = []
        if start is not None:
            for line in lines[start + 1 :]:
                if not line.startswith("\t"):
                    break
                allowed.append(line.strip())
        if not allowed:
            allowed = sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))
        hint = ""
        if group in ("hydra/launcher", "hydra/sweeper") and option in PLUGIN_OPTIONS:
            hint = f" (the {option} plugin is not installed: pip install 'adaptune[sweeps]')"
        return f"{group}={option} is unknown; allowed: {', '.join(allowed)}{hint}"
    inner = next((e for e in (err, err.__cause__, err.__context__) if isinstance(e, OmegaConfBaseException)), None)
    unknown = _unknown_schedule_key(inner) if inner is not None else None
    if unknown:  # set on the command line, or by a preset file (Hydra names it: "In 'experiment/x'")
        source = re.match(r"In '([^']+)'", text)
        return f"{source.group(1)}.yaml sets {unknown}" if source else unknown
    cause = err.__cause__ if isinstance(err.__cause__, OmegaConfBaseException) else None
    if cause is not None or isinstance(err, OmegaConfBaseException):
        inner = cause or err
        key = getattr(inner, "full_key", None)
        first = str(inner).splitlines()[0]
        return f"{key}: {first}" if key else first
    return " ".join(line.strip() for line in text.splitlines() if line.strip())[:400]


register_configs()
install_one_line_errors(lambda err: user_error(composition_message(err)), lambda err: user_error(str(err)))


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    from adaptune.runner.checkpoint import WriteFailed
    from adaptune.runner.lock import RunLocked
    from adaptune.runner.loop import Interrupted, TrainingDiverged, run

    try:
        results = run(cfg, HydraConfig.get().runtime.output_dir)
    except RunLocked as err:
        if HydraConfig.get().mode == RunMode.MULTIRUN:  # another process trains it; the sweep goes on
            log.error("skipped: %s", err)
            return None
        user_error(str(err), code=75)  # EX_TEMPFAIL: try again later
    except WriteFailed as err:
        user_error(str(err), code=74)  # EX_IOERR
    except ConfigError as err:
        user_error(str(err))
    except OmegaConfBaseException as err:
        user_error(composition_message(err))
    except TrainingDiverged as err:
        if HydraConfig.get().mode == RunMode.MULTIRUN:  # recorded in results.json; the sweep goes on
            log.error("run diverged: %s", err)
            return None
        user_error(str(err), code=3)
    except Interrupted as err:
        user_error(str(err), code=130)
    except ModuleNotFoundError as err:  # an optional dependency the chosen task/schedule needs
        message = missing_message(err)
        if message is None:
            raise
        user_error(message)
    main_metric = results["main_metric"]
    return results["best"].get(main_metric)  # what an Optuna sweep optimises
