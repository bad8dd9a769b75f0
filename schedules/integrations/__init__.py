"""SAGE and DPS where researchers already train: small adapters around the schedules' public API.

One module per framework, each importing its framework only when imported itself (importing this
package imports none of them):

- :mod:`adaptune.schedules.integrations.hf`: Hugging Face ``Trainer``: :func:`~.hf.sage_optimizer_cls_and_kwargs`
  (``Trainer(optimizer_cls_and_kwargs=...)``), :func:`~.hf.make_sage_optimizer`
  (``Trainer(optimizers=(opt, None))``) and :class:`~.hf.DPSCallback`.
- :mod:`adaptune.schedules.integrations.accelerate`: :class:`~.accelerate.AccelerateDPS`, DPS in a plain
  ``accelerate`` loop (``examples/accelerate_dps.py``).
- :mod:`adaptune.schedules.integrations.timm`: :func:`~.timm.sage_param_group_fn` for
  ``timm.optim.create_optimizer_v2(..., param_group_fn=...)`` and the ``adamwsage`` /
  ``adamaxsage`` names in timm's optimizer registry.
- ``schedules/integrations/fairseq_user_dir/adaptune_fairseq/`` (``adaptune plugin-path fairseq``
  prints it): a fairseq ``--user-dir`` registering
  ``--optimizer adam_sage`` / ``adamax_sage``. **Never import it from runner code**: importing
  fairseq registers its dataclasses in Hydra's ConfigStore.
- :mod:`adaptune.schedules.integrations.patterns`: which tensors SAGE scales and DPS selects for a model
  (its family from ``config.model_type``, or the LoRA adapters of a PEFT model).
"""

from __future__ import annotations

from .patterns import infer_family, is_lora_model, model_patterns

__all__ = ["infer_family", "is_lora_model", "model_patterns"]
