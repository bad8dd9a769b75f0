"""Mixout (Lee et al., ICLR 2020), one of the DPS paper's baselines, as docs/algorithms.md §3 specifies.

Each selected ``nn.Linear`` weight ``W`` is mixed, in training-mode forward passes, toward its
target ``W_tgt`` = the weight at the start of fine-tuning (the pretrained weight; a fresh head's
initial weight). With mix probability ``p`` (the config key ``schedule.mix_p``)::

    N ~ Bernoulli(1-p), one draw per INPUT column (shape (1, in), shared by all rows), redrawn
        for every forward pass of the model in training mode
    W_eff = ((1-N)·W_tgt + N·W - p·W_tgt) / (1-p);   y = x W_effᵀ + b
    dL/dW = dL/dW_eff ⊙ N          (the reference's custom backward: no 1/(1-p) factor)
    eval:  W_eff = W

and every dropout probability of the model is set to 0 (``schedule.disable_dropout``, default
true, as the reference's example does). The optimizer and LR schedule are the baseline's
(``schedule.optimizer``, ``schedule.impl``). Selected: the Linear weights whose names contain one
of ``schedule.mixout_patterns`` (null: the model's ``dps`` patterns, which the task supplies: for
BERT the encoder's linear sub-layers, the pooler and the classifier; the reference wraps every
``nn.Linear``).

Decisions marked **(choice)**:

- **(choice) Shared machinery with DPS-Mix.** The forward is DPS-Mix's parametrization
  (``adaptune.schedules.mixing``: ``attach_mix`` / ``MixoutWeight``, which calls
  ``adaptune.schedules.mixing.mix_weight``: ``W_tgt + N·(W - W_tgt)/(1-p)``, algebraically the formula
  above, with exactly the reference's backward). So every read of ``linear.weight`` is mixed
  (also code that reads the weight without calling ``Linear.forward``), eval mode reads ``W``,
  and ``state_dict()`` keys stay plain (``x.weight``); ``named_parameters()`` shows
  ``x.parametrizations.weight.original``.
- **(choice) One draw per model forward.** ``N`` is redrawn by a forward pre-hook on the model
  (the module the schedule prepared; under DDP the wrapped module, which DDP calls) whenever it
  runs in training mode: one fresh ``N`` per Linear per micro-batch. The reference draws in each
  ``MixLinear.forward``; the two differ only for a Linear called twice in one forward pass
  (weight sharing), which gets one ``N`` here. A training-mode forward of a submodule alone does
  not redraw (it reuses the last ``N``); before the first draw the weights are unmixed.
- **(choice) Randomness** as DPS-Mix's: ``N`` comes from a CPU ``torch.Generator`` owned by the
  schedule (one draw of ``sum(in_features)`` uniforms per forward, then one small copy per
  weight), seeded from the run seed without drawing from the global generator
  (``adaptune.schedules.sync.shared_seed``; rank 0's under DDP, so every rank mixes alike); the same seed
  gives the same ``N`` on CPU and GPU and the data order and any other randomness stay those of
  a baseline run. The generator's state and the targets are in ``state_dict()``: a resumed run
  continues exactly (one full copy of every selected weight, as the reference keeps).
- **(choice) Default ``p = 0.9``** (``schedule.mix_p``): the Mixout paper's choice for
  BERT-large on small GLUE tasks; the DPS paper grid-searches ``p`` in {0.1, ..., 0.8}.
"""

from .algorithm import STATE_VERSION, Mixout
from .schedule import MixoutSchedule

__all__ = ["STATE_VERSION", "Mixout", "MixoutSchedule"]
