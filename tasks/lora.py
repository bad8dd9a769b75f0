"""``task.peft=lora``: LoRA adapters on a task's model with the ``peft`` library.

**(choice)** Only the adapters and the task head train. The head (a new, randomly initialised
classifier) must train, so it is kept trainable through peft's ``modules_to_save`` (for
``task_type="SEQ_CLS"`` peft adds ``classifier`` / ``score`` itself; other tasks pass their head's
module name): peft trains a copy of it (``classifier.modules_to_save.default``) and keeps the
original frozen. Every other base weight, the pooler included, is frozen.

**(choice)** DPS selects from the adapter matrices (``lora_A`` / ``lora_B``, which peft builds as
``nn.Linear`` modules); SAGE scales ``lora_A`` only: its multiplier is exactly 0 where a weight is
0, and peft initialises ``lora_B`` to zeros, so a SAGE-scaled ``lora_B`` would never move and the
adapter would never train (``schedules/integrations/patterns.py`` explains it). ``lora_B`` and the
head are trained by the base optimizer's plain maths (``adaptune.common.families.lora_patterns``, shared
with ``adaptune.schedules.integrations``).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from adaptune.common.errors import ConfigError


def apply_lora(
    model: torch.nn.Module,
    cfg: Any,
    task_type: str | None = "SEQ_CLS",
    modules_to_save: Sequence[str] | None = None,
    key: str = "task.lora",
) -> torch.nn.Module:
    """``model`` wrapped by ``peft.get_peft_model`` with the settings ``cfg`` (``task.lora``)."""
    try:
        import peft
    except ImportError:
        raise ConfigError("task.peft=lora needs the peft package (pip install peft; `make setup` installs it)") from None
    targets = list(cfg.target_modules) if cfg.target_modules else None
    config = peft.LoraConfig(
        r=int(cfg.r),
        lora_alpha=float(cfg.alpha),
        lora_dropout=float(cfg.dropout),
        target_modules=targets,
        task_type=task_type,
        modules_to_save=list(modules_to_save) if modules_to_save else None,
    )
    try:
        wrapped = peft.get_peft_model(model, config)
    except ValueError as err:
        raise ConfigError(f"{key}.target_modules={targets}: {str(err).splitlines()[0][:200]}") from None
    return wrapped
