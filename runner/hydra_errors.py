"""The one place that reaches into Hydra's internals: its composition errors as one line.

Hydra prints a config that does not compose as a block (its search path, a hint about
``HYDRA_FULL_ERROR``); the ``adaptune`` command prints one ``adaptune: error:`` line and exits 2.
Hydra has no public hook for this, so :func:`install_one_line_errors` wraps
``hydra._internal.utils.run_and_report`` (which ``hydra._internal.hydra`` imports by name) and
checks first that both are where Hydra 1.3 keeps them: if a Hydra release moves them, the command
fails at import with a message naming this module instead of silently printing Hydra's block
(``tests/test_config.py`` checks the hook on every run of the suite). ``HYDRA_FULL_ERROR=1`` still
gives Hydra's full traceback.
"""

from __future__ import annotations

import os
from typing import Callable

from omegaconf.errors import OmegaConfBaseException

from adaptune.common.errors import ConfigError


def _raised_by_hydra(err: BaseException) -> bool:
    """Whether the innermost frame outside the standard library that raised ``err`` is Hydra's (or
    a Hydra plugin's), not ours or a user's."""
    import sysconfig
    import traceback

    stdlib = sysconfig.get_paths()["stdlib"]
    frames = [f.filename for f in traceback.extract_tb(err.__traceback__) if not f.filename.startswith(stdlib)]
    return bool(frames) and any(part in frames[-1] for part in ("/hydra/", "/hydra_plugins/"))


class HydraChanged(RuntimeError):
    """Hydra's internals are not where this module expects them."""


def install_one_line_errors(composition: Callable[[BaseException], None], config: Callable[[ConfigError], None]) -> None:
    """Route Hydra's composition / override errors to ``composition(err)`` and our ConfigError to
    ``config(err)`` (each prints one line and exits); idempotent."""
    import hydra
    import hydra._internal.hydra as hydra_core
    import hydra._internal.utils as hydra_utils
    from hydra.errors import CompactHydraException, ConfigCompositionException, OverrideParseException

    for module in (hydra_utils, hydra_core):
        if not callable(getattr(module, "run_and_report", None)):
            raise HydraChanged(
                f"{module.__name__}.run_and_report is gone (Hydra {hydra.__version__}); "
                "adaptune.runner.hydra_errors needs updating for this Hydra release"
            )
    original = hydra_utils.run_and_report
    if getattr(original, "_adaptune", False):
        return

    def run_and_report(func):
        try:
            return func()
        except (ConfigCompositionException, OverrideParseException, CompactHydraException, OmegaConfBaseException) as err:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            composition(err)
        except ConfigError as err:
            config(err)
        except OSError as err:  # Hydra's own writes: the run / sweep directory, its .hydra/ configs, the log file
            if os.environ.get("HYDRA_FULL_ERROR") == "1" or not _raised_by_hydra(err):
                raise
            where = err.filename or "the run directory"
            config(
                ConfigError(
                    f"cannot write {where} ({err.strerror or type(err).__name__}); set hydra.run.dir "
                    f"(hydra.sweep.dir with -m) to a directory you can write"
                )
            )

    run_and_report._adaptune = True
    hydra_utils.run_and_report = run_and_report
    hydra_core.run_and_report = run_and_report
