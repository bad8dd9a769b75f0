"""The ``schedule`` config group's typed schemas, one per schedule: every key a schedule reads, its
only default and its check, and no other key.

``ScheduleConfig`` holds what every schedule reads (the LR schedule, Adam's betas and eps, weight
decay, the implementation); ``BaselineConfig`` adds the base optimizer, and DPS, ChildTuning and
Mixout extend it (they train with the baseline's optimizer); ``SAGEConfig`` extends
``ScheduleConfig`` (its optimizer is ``base``). :data:`SCHEDULE_SCHEMAS` maps each schedule name
to its schema; ``runner/config.py`` stores each in Hydra's ConfigStore as
``schema/schedule/<name>``, which ``conf/schedule/<name>.yaml`` extends, so composing
``schedule=sage schedule.drop_p=0.5`` is an error naming the key (:func:`unknown_key_message`).

**(choice)** One schema per schedule, not one for the group: a key the chosen schedule does not
read is an error, never a silent no-op. A comparison still sweeps one experiment preset over
several schedules (``experiment=dps_glue schedule=baseline,dps,dps_mix``): the preset sets only
keys every arm has, and passes a method's own setting through a free-form ``presets.<name>``
entry that the method's ``conf/schedule/<name>.yaml`` reads with ``${preset:<name>}``
(``common/schema.py``: the preset when the experiment sets it, else the key's default here), e.g.
``update_ratio: ${preset:dps_update_ratio}``; the other arms never see it.

Renamed keys (the algorithms keep their papers' argument names): DPS's ``p`` is ``drop_p``,
ChildTuning's ``reserve_p`` is ``keep_p``, Mixout's ``p`` is ``mix_p``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, List, Mapping, Optional

from adaptune.common.errors import ConfigError
from adaptune.common.schema import Check, at_least, build, field_of, in_range, one_of, optional, pair_in, setting

from . import defaults as algo  # the algorithms' defaults: one literal each, read here
from .lr import LR_SCHEDULES  # one list: the schedules lr.py implements

SAGE_BASES = ("adamax", "adamw")
DPS_VARIANTS = ("dense", "mix")
IMPLS = ("auto", "fused", "foreach", "loop")

#: config keys renamed when the schema was split per schedule: old -> new (named by the error)
RENAMED = {"p": "drop_p", "reserve_p": "keep_p", "mixout_p": "mix_p"}


def _named(name: str) -> Check:
    """``name`` is this schema's schedule; another one is chosen with ``schedule=<name>``."""

    def check(value: Any) -> str | None:
        if value == name:
            return None
        return f"={value!r} is not this schedule's name ({name}); choose a schedule with schedule=<name>"

    return check


@dataclass
class ScheduleConfig:
    """What every schedule reads. Not a schedule itself: each schedule's schema extends it."""

    name: str = setting()  # each schedule's schema sets its own (the names: SCHEDULE_SCHEMAS)
    label: Optional[str] = None  # a name for reports (schedule=dps_mix: "dps_mix"); null: name
    lr: float = setting(5e-5, check=at_least(0))  # peak learning rate (quickstart default for the pip MiniLM)
    betas: List[float] = setting(factory=lambda: [0.9, 0.999], check=pair_in(0, 1))
    eps: float = setting(algo.SAGE_EPS, check=at_least(0))  # SAGE: its multiplier's denominator uses eps²
    # AdamW: decoupled; Adamax (torch): added to the gradient; Adamax-SAGE: inside the
    # SAGE-scaled update; AdamW-SAGE: decoupled. Biases / norms (no_decay_patterns) get none.
    weight_decay: float = setting(algo.WEIGHT_DECAY, check=at_least(0))
    lr_schedule: str = setting("linear", check=one_of(*LR_SCHEDULES))
    warmup_ratio: float = setting(0.1, check=in_range(0, 1))  # fraction of the run's updates
    warmup_steps: Optional[int] = setting(None, check=optional(at_least(0)))  # absolute; wins over the ratio
    no_decay_patterns: Optional[List[str]] = None  # null: the model's own (biases, norms; the task supplies them)
    # the optimizer's implementation, same maths: auto (fused where the optimizer has a fused
    # kernel for the device, else foreach; SAGE: its own choice) | fused | foreach | loop
    impl: str = setting("auto", check=one_of(*IMPLS))


@dataclass
class BaselineConfig(ScheduleConfig):
    """``schedule=baseline``; DPS, ChildTuning and Mixout train with its optimizer too."""

    name: str = setting("baseline", check=_named("baseline"))
    # adamw (torch) | adamax (torch) | adamax_mtdnn (MT-DNN's, the SAGE paper's GLUE baseline) |
    # adamw_hf (transformers 4.7's, the DPS reference's arms) | any name registered in OPTIMIZERS
    optimizer: str = "adamw"


@dataclass
class SAGEConfig(ScheduleConfig):
    """``schedule=sage`` (docs/algorithms.md §1): AdamW-SAGE or Adamax-SAGE, chosen by ``base``."""

    name: str = setting("sage", check=_named("sage"))
    base: str = setting("adamax", check=one_of(*SAGE_BASES))  # Adamax-SAGE (paper's GLUE) | AdamW-SAGE
    beta3: float = setting(algo.SAGE_BETA3, check=in_range(0, 1))  # EMA of the sensitivity; the paper uses 0.6-0.9
    bias_correction: bool = True  # AdamW-SAGE only (its first step leaves SAGE tensors unchanged)
    sage_patterns: Optional[List[str]] = None  # null: the model's encoder linear layers (from the task)


@dataclass
class DPSConfig(BaselineConfig):
    """``schedule=dps`` / ``dps_mix`` (docs/algorithms.md §2): the baseline plus DPS."""

    name: str = setting("dps", check=_named("dps"))
    variant: str = setting(algo.DPS_VARIANT, check=one_of(*DPS_VARIANTS))  # mix: masked entries mixed toward a snapshot
    # DPS's p (``DPS(p=...)``; the reference script's flag reserve_p): the fraction of entries
    # DROPPED in a selection phase, unlike ChildTuning's keep_p
    drop_p: float = setting(algo.DPS_P, check=in_range(0, 1))
    # U = int(T * update_ratio)
    update_ratio: float = setting(algo.DPS_UPDATE_RATIO, check=in_range(0, 1, low_open=True, high_open=False))
    # DPS's T, which sets the phase length U = int(T * update_ratio): null = the run's optimizer
    # steps (the GLUE protocol); the low-resource protocol sets one epoch's steps (ceil(n / batch)).
    T: Optional[int] = setting(None, check=optional(at_least(1)))
    dps_patterns: Optional[List[str]] = None  # null: the model's DPS linear layers (from the task)
    # The paper's script sets hidden and attention dropout to 0 with DPS (it keeps 0.1 for Dense
    # runs of 2000+ steps: set false there).
    disable_dropout: bool = True


@dataclass
class _ChildTuningConfig(BaselineConfig):
    # ChildTuning's reserve_p (``ChildTuningD/F(reserve_p=...)``, the reference's flag): the
    # fraction of gradient entries KEPT, unlike DPS's drop_p. AliceMind ChildTuning run.sh: 0.3
    # (D and F); the paper tunes 0.1-0.3 (D) and 0.2-0.4 (F) per task.
    keep_p: float = setting(algo.CHILDTUNING_RESERVE_P, check=in_range(0, 1, low_open=True, high_open=False))


@dataclass
class ChildTuningFConfig(_ChildTuningConfig):
    """``schedule=childtuning_f`` (docs/algorithms.md §3): a fresh Bernoulli(keep_p) gradient mask every step."""

    name: str = setting("childtuning_f", check=_named("childtuning_f"))


@dataclass
class ChildTuningDConfig(_ChildTuningConfig):
    """``schedule=childtuning_d`` (docs/algorithms.md §3): a Fisher mask fixed before training."""

    name: str = setting("childtuning_d", check=_named("childtuning_d"))
    # the tensors whose Fisher is scored and masked; the reference's criterion is the name
    # substring "layer" (BERT's encoder.layer.N; fairseq's layers.N); timm ViT: [blocks]
    childtuning_patterns: List[str] = setting(factory=lambda: ["layer"])


@dataclass
class MixoutConfig(BaselineConfig):
    """``schedule=mixout`` (docs/algorithms.md §3): the baseline with Linear weights mixed toward their start."""

    name: str = setting("mixout", check=_named("mixout"))
    # Mixout's p (``Mixout(p=...)``): the probability that each input column of W_eff is mixed
    # back to its target. 0.9: the Mixout paper's choice for BERT-large on small GLUE tasks; the
    # DPS paper tunes it over 0.1-0.8.
    mix_p: float = setting(algo.MIXOUT_P, check=in_range(0, 1))
    mixout_patterns: Optional[List[str]] = None  # null: the model's DPS linear layers (from the task)
    disable_dropout: bool = True  # the Mixout reference sets dropout to 0


#: schedule name -> its schema (``schema/schedule/<name>`` in Hydra's ConfigStore)
SCHEDULE_SCHEMAS: dict[str, type] = {
    "baseline": BaselineConfig,
    "sage": SAGEConfig,
    "dps": DPSConfig,
    "childtuning_d": ChildTuningDConfig,
    "childtuning_f": ChildTuningFConfig,
    "mixout": MixoutConfig,
}


def schema_keys(schema: type) -> list[str]:
    return [f.name for f in dataclasses.fields(schema)]


def unknown_key_message(schema: type, key: str, label: str | None = None) -> str:
    """One line for ``schedule.<key>`` set on a schedule whose schema lacks it: the schedule, where
    the key does belong (or its new name), and the schedule's keys."""
    name = label or schema().name
    owners = [n for n, s in SCHEDULE_SCHEMAS.items() if key in schema_keys(s)]
    if key in RENAMED:
        hint = f" (renamed: schedule.{RENAMED[key]})"
    elif owners:
        hint = f" (a key of schedule={', '.join(owners)})"
    else:
        hint = ""
    return f"schedule.{key}: not a key of schedule={name}{hint}; its keys: {', '.join(schema_keys(schema))}"


def schedule_schema(cfg: Any) -> type:
    """The schema of the schedule ``cfg`` configures: a composed node's own schema, else the one
    its ``name`` selects (ConfigError listing the names when it selects none)."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(cfg) and OmegaConf.get_type(cfg) in SCHEDULE_SCHEMAS.values():
        return OmegaConf.get_type(cfg)
    if dataclasses.is_dataclass(cfg) and type(cfg) in SCHEDULE_SCHEMAS.values():
        return type(cfg)
    name = field_of(cfg, "name")
    if name not in SCHEDULE_SCHEMAS:
        raise ConfigError(f"schedule.name={name!r} is unknown; allowed: {', '.join(SCHEDULE_SCHEMAS)}")
    return SCHEDULE_SCHEMAS[name]


def build_schedule_config(cfg: Any, schema: type | None = None) -> ScheduleConfig:
    """A validated instance of ``schema`` (default: :func:`schedule_schema`) from a mapping, a
    DictConfig or an instance; a key the schema lacks is a ConfigError (:func:`unknown_key_message`)."""
    schema = schema or schedule_schema(cfg)
    if isinstance(cfg, Mapping):
        for key in cfg:
            if key not in schema_keys(schema):
                raise ConfigError(unknown_key_message(schema, str(key), field_of(cfg, "label") or field_of(cfg, "name")))
    elif dataclasses.is_dataclass(cfg) and not isinstance(cfg, schema):
        raise ConfigError(f"a {type(cfg).__name__} does not configure schedule={schema().name}")
    return build(schema, cfg, "schedule")
