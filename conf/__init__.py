"""The Hydra configs (``config.yaml`` and its groups), shipped inside the package as
``adaptune.conf``; :data:`CONFIG_DIR` is where they are, installed or in a checkout."""

from pathlib import Path

CONFIG_DIR: Path = Path(__file__).resolve().parent
