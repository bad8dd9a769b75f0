"""``python -m adaptune ...`` = the ``adaptune`` command (also what ``torchrun -m adaptune`` starts)."""

from adaptune.runner.cli import main

main()
