"""SAGE: sensitivity-guided adaptive learning rate (Liang et al., ICLR 2022; docs/algorithms.md §1).

Sensitivity ``I = |θ ⊙ g|`` estimates how much the loss changes if an entry is zeroed. SAGE keeps
an exponential moving average ``Ī`` of it and scales each entry's step by the local uncertainty
``|I - Ī| / (Ī + ε²)``: entries whose smoothed sensitivity is low get larger steps.

This package exports

- :class:`AdamWSAGE` and :class:`AdamaxSAGE`, plain ``torch.optim.Optimizer`` subclasses
  (named ``adamw_sage`` / ``adamax_sage`` in ``adaptune.schedules.base.OPTIMIZERS``, imported on use). A
  parameter group with ``sage=False`` is updated by the plain base optimizer's maths; groups that
  do not say get ``sage=True``.
- :func:`sage_param_groups`, optimizer-ready groups for users outside the runner::

      groups = sage_param_groups(model, family="bert", weight_decay=0.01)
      opt = AdamaxSAGE(groups, lr=2e-4, beta3=0.85)     # works with HF Trainer(optimizers=(opt, sched))

- :class:`SAGESchedule`, the ``schedule=sage`` entry of the runner, and
  :func:`sensitivity_summary`, the statistics it logs.

One module per concern:

- ``optimizer.py``: what both optimizers share (validated hyper-parameters, state, the choice
  between the ``reference`` and ``fused`` implementations, the step loop) and the implementation
  choices, with the measured speed;
- ``adamw.py`` / ``adamax.py``: each optimizer's maths, once per backend: the readable reference
  loop and the fused expression that ``torch.compile`` compiles;
- ``compiled.py``: the ``torch.compile`` backend (its process-wide state and helpers);
- ``cpu_kernel.py`` and ``csrc/sage_cpu.cpp``: the multi-tensor C++ kernel, the fused path on CPU;
- ``groups.py``: :func:`sage_param_groups`;
- ``telemetry.py``: the probe of entries and :func:`sensitivity_summary`;
- ``schedule.py``: :class:`SAGESchedule`.
"""

from __future__ import annotations

from .adamax import AdamaxSAGE, MTDNNAdamax
from .adamw import AdamWSAGE, HFAdamW
from .groups import sage_param_groups
from .schedule import SAGESchedule
from .telemetry import sensitivity_summary

__all__ = ["AdamWSAGE", "AdamaxSAGE", "HFAdamW", "MTDNNAdamax", "SAGESchedule", "sage_param_groups", "sensitivity_summary"]
