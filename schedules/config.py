"""The ``schedule`` config group's one typed schema: every key of every schedule, its only default
and its check. ``conf/schedule/*.yaml`` are presets on top of it (``sage.yaml`` sets ``name: sage``
and SAGE's quickstart lr).

**(choice)** One schema for the whole group, not one per schedule: a comparison sweeps one
experiment preset over several schedules (``experiment=dps_glue schedule=baseline,dps,dps_mix``),
so a preset may set DPS's keys while the baseline runs; each schedule reads its own keys
(``Schedule.config_keys``) and names, in one warning, the keys set away from their defaults that it
ignores. Keys still have to exist and have the right type: ``schedule.bogus=1`` or
``schedule.p=abc`` is an error whatever the schedule.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from adaptune.common.schema import at_least, in_range, one_of, optional, pair_in, setting

from . import defaults as algo   # the algorithms' defaults: one literal each, read here
from .lr import LR_SCHEDULES  # one list: the schedules lr.py implements
SAGE_BASES = ("adamax", "adamw")
DPS_VARIANTS = ("dense", "mix")
IMPLS = ("auto", "fused", "foreach", "loop")


def _known_schedule(name) -> str | None:
    from . import SCHEDULES  # the registry; imported late (schedules/__init__ imports this module)

    return one_of(*SCHEDULES)(name)


@dataclass
class ScheduleConfig:
    # ---------------------------------------------------------------- every schedule
    name: str = setting(check=_known_schedule)   # set by each conf/schedule/ preset; allowed: SCHEDULES
    label: Optional[str] = None         # a name for reports (schedule=dps_mix: "dps_mix"); null: name
    # baseline / DPS base optimizer: adamw | adamax | adamax_mtdnn | adamw_hf (any registered name)
    optimizer: str = "adamw"
    lr: float = setting(5e-5, check=at_least(0))   # peak learning rate (quickstart default for the pip MiniLM)
    betas: List[float] = setting(factory=lambda: [0.9, 0.999], check=pair_in(0, 1))
    eps: float = setting(algo.SAGE_EPS, check=at_least(0))  # SAGE: its multiplier's denominator uses eps²
    # AdamW: decoupled; Adamax (torch): added to the gradient; Adamax-SAGE: inside the
    # SAGE-scaled update; AdamW-SAGE: decoupled. Biases / norms (no_decay_patterns) get none.
    weight_decay: float = setting(algo.WEIGHT_DECAY, check=at_least(0))
    lr_schedule: str = setting("linear", check=one_of(*LR_SCHEDULES))
    warmup_ratio: float = setting(0.1, check=in_range(0, 1))      # fraction of the run's updates
    warmup_steps: Optional[int] = setting(None, check=optional(at_least(0)))   # absolute; wins over the ratio
    no_decay_patterns: Optional[List[str]] = None   # null: the model's own (biases, norms; the task supplies them)
    # the optimizer's implementation, same maths: auto (fused where the optimizer has a fused
    # kernel for the device, else foreach; SAGE: its own choice) | fused | foreach | loop
    impl: str = setting("auto", check=one_of(*IMPLS))

    # ---------------------------------------------------------------- sage (docs/algorithms.md §1)
    base: str = setting("adamax", check=one_of(*SAGE_BASES))   # Adamax-SAGE (paper's GLUE) | AdamW-SAGE
    beta3: float = setting(algo.SAGE_BETA3, check=in_range(0, 1))   # EMA of the sensitivity; the paper uses 0.6-0.9
    bias_correction: bool = True        # AdamW-SAGE only (its first step leaves SAGE tensors unchanged)
    sage_patterns: Optional[List[str]] = None   # null: the model's encoder linear layers (from the task)

    # ---------------------------------------------------------------- dps (docs/algorithms.md §2)
    variant: str = setting(algo.DPS_VARIANT, check=one_of(*DPS_VARIANTS))   # mix: masked entries mixed toward a snapshot
    p: float = setting(algo.DPS_P, check=in_range(0, 1))   # fraction of entries DROPPED in a selection phase
    # U = int(T * update_ratio)
    update_ratio: float = setting(algo.DPS_UPDATE_RATIO, check=in_range(0, 1, low_open=True, high_open=False))
    # DPS's T, which sets the phase length U = int(T * update_ratio): null = the run's optimizer
    # steps (the GLUE protocol); the low-resource protocol sets one epoch's steps (ceil(n / batch)).
    T: Optional[int] = setting(None, check=optional(at_least(1)))
    dps_patterns: Optional[List[str]] = None    # null: the model's DPS linear layers (from the task)
    # The paper's script sets hidden and attention dropout to 0 with DPS (it keeps 0.1 for Dense
    # runs of 2000+ steps: set false there). Mixout reads it too (its reference sets dropout to 0).
    disable_dropout: bool = True

    # ---------------------------------------------------------------- childtuning_d / _f, mixout (docs/algorithms.md §3)
    # ChildTuning: fraction of gradient entries KEPT (unlike DPS's p). AliceMind ChildTuning run.sh: 0.3 (D and
    # F); the paper tunes 0.1-0.3 (D) and 0.2-0.4 (F) per task.
    reserve_p: float = setting(algo.CHILDTUNING_RESERVE_P, check=in_range(0, 1, low_open=True, high_open=False))
    # ChildTuning-D: the tensors whose Fisher is scored and masked; the reference's criterion is
    # the name substring "layer" (BERT's encoder.layer.N; fairseq's layers.N); timm ViT: [blocks]
    childtuning_patterns: List[str] = setting(factory=lambda: ["layer"])
    # Mixout: mix probability p (W_eff mixes each input column back to the target with prob. p).
    # 0.9: the Mixout paper's choice for BERT-large on small GLUE tasks; the DPS paper tunes it
    # over 0.1-0.8.
    mixout_p: float = setting(algo.MIXOUT_P, check=in_range(0, 1))
    mixout_patterns: Optional[List[str]] = None   # null: the model's DPS linear layers (from the task)
