"""``adaptune`` command: Hydra training by default, ``adaptune report DIR`` for tables,
``adaptune compare NAME|PATH.yaml`` for per-schedule grids over the same seeds (presets in
conf/compare/, or a spec file of your own), ``adaptune search NAME|PATH.yaml`` for an Optuna search over
one schedule's settings on a selection split (presets in conf/search/; resumable, several workers
on one study), ``adaptune analyze DIR`` for sensitivity, pruning and
DPS-selection plots of finished runs, ``adaptune export RUN_DIR OUT_DIR`` for a trained model in
Hugging Face / timm format, ``adaptune cache list|prune|clear`` for the feature cache,
``adaptune plugin-path fairseq`` for fairseq's ``--user-dir``."""

from __future__ import annotations

import sys

PLUGINS = ("fairseq",)


def plugin_path(argv: list[str]) -> int:
    """Print the directory to pass as fairseq's ``--user-dir`` (it works from a wheel install)."""
    if argv in (["-h"], ["--help"]):
        print(f"usage: adaptune plugin-path {{{','.join(PLUGINS)}}}\n\nPrint the directory to pass as fairseq's --user-dir.")
        return 0
    if len(argv) != 1 or argv[0] not in PLUGINS:
        print(f"adaptune plugin-path: error: name one plugin: {', '.join(PLUGINS)}", file=sys.stderr)
        return 2
    from importlib.resources import files

    print(files("adaptune.schedules.integrations") / "fairseq_user_dir" / "adaptune_fairseq")
    return 0


def _dispatch(argv: list[str]) -> int | None:
    command = argv[0] if argv else None
    if command == "plugin-path":
        return plugin_path(argv[1:])
    if command == "report":
        from adaptune.runner.report import main as report_main

        return report_main(argv[1:])
    if command == "analyze":
        from adaptune.runner.analyze import main as analyze_main

        return analyze_main(argv[1:])
    if command == "export":
        from adaptune.runner.export import main as export_main

        return export_main(argv[1:])
    if command == "compare":
        from adaptune.runner.compare import main as compare_main

        return compare_main(argv[1:])
    if command == "cache":
        from adaptune.runner.cache import main as cache_main

        return cache_main(argv[1:])
    if command == "search":
        from adaptune.runner.search import main as search_main

        return search_main(argv[1:])
    from adaptune.runner.app import main as hydra_main

    hydra_main()  # exits by itself on errors; its return value is the run's best metric, not a status
    return 0


def main() -> None:
    try:
        code = _dispatch(sys.argv[1:])
    except ModuleNotFoundError as err:  # an extra that is not installed: one line, no traceback
        from adaptune.common.extras import missing_message

        message = missing_message(err)
        if message is None:
            raise
        print(f"adaptune: error: {message}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code)


if __name__ == "__main__":
    main()
