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

    run_and_report._adaptune = True
    hydra_utils.run_and_report = run_and_report
    hydra_core.run_and_report = run_and_report
