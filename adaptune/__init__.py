"""adaptune: fine-tune and train Transformers with sensitivity-aware schedules (SAGE, DPS and the
DPS paper's baselines) and compare them honestly.

One import package. The repository keeps its own layout (``runner/ tasks/ schedules/ common/
conf/`` at the top level); ``pyproject.toml`` maps each folder into this package
(``[tool.setuptools] package-dir``), for wheels and editable installs alike:

- :mod:`adaptune.schedules`: the algorithms (SAGE optimizers, DPS, ChildTuning, Mixout) and the
  integrations for HF Trainer, accelerate, timm and fairseq; needs only torch and numpy;
- :mod:`adaptune.runner`: the Hydra app, training loop, reports (``pip install 'adaptune[runner]'``);
- :mod:`adaptune.tasks`: GLUE-style text classification, translation, image classification;
- :mod:`adaptune.common`: what all of them share (errors, model families, schemas);
- :mod:`adaptune.conf`: the Hydra configs, shipped as package data.

This folder holds only the package's root; the code lives in the folders above.
"""

__version__ = "0.2.0"
