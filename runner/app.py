"""The Hydra entry point: compose ``conf/``, run one training job, exit cleanly on user errors."""
from __future__ import annotations

import hashlib
import logging
import re
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from common.errors import ConfigError

log = logging.getLogger("adaptune")

#: conf/ at the repository root (the package is installed in editable mode).
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def dirname(overrides: str) -> str:
    """A run-directory name from Hydra's override string: '/' and odd characters become '_';
    names over 120 characters keep their start plus a hash of the whole (file-name limits)."""
    name = re.sub(r"[^A-Za-z0-9=,._+-]+", "_", overrides).strip("_")
    if len(name) > 120:
        name = f"{name[:100]}-{hashlib.sha1(name.encode()).hexdigest()[:12]}"
    return name or "default"


if not OmegaConf.has_resolver("dirname"):
    OmegaConf.register_new_resolver("dirname", dirname)


def user_error(message: str, code: int = 2) -> None:
    """Print one line for a mistake the user can fix and exit without a traceback."""
    print(f"adaptune: error: {message}", file=sys.stderr)
    sys.exit(code)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    from runner.loop import Interrupted, TrainingDiverged, run

    try:
        results = run(cfg, HydraConfig.get().runtime.output_dir)
    except ConfigError as err:
        user_error(str(err))
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        msg = str(err).splitlines()[0]
        user_error(f"{key}: {msg}" if key else msg)
    except TrainingDiverged as err:
        user_error(str(err), code=3)
    except Interrupted as err:
        user_error(str(err), code=130)
    main_metric = results["main_metric"]
    return results["best"].get(main_metric)  # what an Optuna sweep optimises
