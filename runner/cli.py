"""``adaptune`` command: Hydra training by default, ``adaptune report DIR`` for tables,
``adaptune compare NAME`` for per-schedule grids over the same seeds (conf/compare/),
``adaptune analyze DIR`` for sensitivity, pruning and DPS-selection plots of finished runs."""
from __future__ import annotations

import sys


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "report":
        from runner.report import main as report_main

        sys.exit(report_main(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "analyze":
        from runner.analyze import main as analyze_main

        sys.exit(analyze_main(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "compare":
        from runner.compare import main as compare_main

        sys.exit(compare_main(sys.argv[2:]))
    from runner.app import main as hydra_main

    hydra_main()


if __name__ == "__main__":
    main()
