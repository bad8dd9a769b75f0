"""A fairseq ``--user-dir`` plug-in: ``--optimizer adam_sage`` (AdamW-SAGE) and ``adamax_sage``
(Adamax-SAGE), fairseq 0.12::

    fairseq-train data-bin/iwslt14.tokenized.de-en --arch transformer_iwslt_de_en \\
        --user-dir "$(adaptune plugin-path fairseq)" \\
        --optimizer adam_sage --adam-betas '(0.9, 0.98)' --beta3 0.75 --weight-decay 0.0001 \\
        --lr 5e-4 --lr-scheduler inverse_sqrt --warmup-updates 4000 ...

Options: ``--adam-betas`` / ``--adam-eps`` (``adam_sage``) or ``--adamax-betas`` / ``--adamax-eps``
(``adamax_sage``), ``--weight-decay``, ``--beta3``, ``--sage-bias-correction`` (``adam_sage``:
bias-corrected sensitivity EMA, default true), ``--sage-patterns`` (comma-separated name
substrings; default the fairseq Transformer's from ``common/families.py``: ``self_attn.``,
``encoder_attn.``, ``fc1``, ``fc2``).

**(choice) Naming the tensors.** fairseq hands an optimizer one flat list of parameters, without
names. On import the plug-in wraps ``fairseq.models.build_model`` so that every parameter of a
model fairseq builds carries its qualified name as ``p.sage_name`` (as fairseq's own
``p.param_group`` / ``p.optim_overrides`` attributes do); the optimizer splits the flat list by
those names into SAGE / plain and decay / no-decay groups (the family's ``no_decay``: biases and
layer norms get no weight decay, as in the runner). A parameter without a name is an error:
``--fp16`` (non-memory-efficient) flattens the parameters into fp32 copies that have no names,
use fp32 or ``--amp``. The first group layout is logged (``adam_sage: N of M tensors in SAGE
groups``).

``--eps`` defaults to 1e-6 (the project's SAGE default, whose multiplier divides by eps²), not
fairseq Adam's 1e-8. **Never import this package from the runner**: importing fairseq registers
its dataclasses in Hydra's ConfigStore.
"""

# (no ``from __future__ import annotations``: fairseq reads the config dataclasses' field types)
import logging
from dataclasses import dataclass, field
from typing import Any, List

import fairseq.models
from fairseq.dataclass import FairseqDataclass
from fairseq.optim import FairseqOptimizer, register_optimizer
from omegaconf import II

from adaptune.common.families import family_patterns
from adaptune.schedules.defaults import SAGE_BETA3, SAGE_EPS
from adaptune.schedules.sage import AdamaxSAGE, AdamWSAGE, sage_param_groups

logger = logging.getLogger("adaptune_fairseq.sage")
FAMILY = "fairseq_transformer"

# ------------------------------------------------------------------ tag parameter names
_build_model = fairseq.models.build_model


def _build_model_with_names(*args, **kwargs):
    model = _build_model(*args, **kwargs)
    tag_parameter_names(model)
    return model


def tag_parameter_names(module, prefix: str = "") -> None:
    """Set ``p.sage_name`` on every parameter of ``module`` (for models fairseq did not build)."""
    for name, p in module.named_parameters():
        p.sage_name = prefix + name


if not getattr(fairseq.models.build_model, "_sage_tags", False):
    _build_model_with_names._sage_tags = True
    fairseq.models.build_model = _build_model_with_names


def _first(lr: Any) -> float:
    """fairseq's ``--lr`` is a list (one per epoch); the optimizer starts from the first."""
    return float(lr if isinstance(lr, (int, float)) else lr[0])


def _betas(value: Any) -> tuple[float, float]:
    return tuple(float(b) for b in (eval(value) if isinstance(value, str) else value))  # noqa: S307 (fairseq's convention)


def sage_groups(params, weight_decay: float, patterns: str) -> list[dict]:
    params = list(params)
    unnamed = [p for p in params if getattr(p, "sage_name", None) is None]
    if unnamed:
        raise ValueError(
            f"adam_sage/adamax_sage: {len(unnamed)} of {len(params)} parameters have no name (shape "
            f"{tuple(unnamed[0].shape)}): the optimizer needs the model's parameter names to find the SAGE "
            "tensors. --fp16 flattens the parameters into nameless fp32 copies; train in fp32 or with --amp. "
            "A model built outside fairseq.models.build_model: call adaptune_fairseq.tag_parameter_names(model)"
        )
    sage = [s.strip() for s in patterns.split(",") if s.strip()] or list(family_patterns(FAMILY, "sage"))
    groups = sage_param_groups(
        [(p.sage_name, p) for p in params],
        sage_patterns=sage,
        no_decay=family_patterns(FAMILY, "no_decay"),
        weight_decay=weight_decay,
    )
    in_sage = sum(len(g["params"]) for g in groups if g["sage"])
    logger.info(
        "SAGE groups: %d of %d tensors in SAGE groups (patterns %s); %d groups", in_sage, len(params), ",".join(sage), len(groups)
    )
    return groups


# ------------------------------------------------------------------ the optimizers
@dataclass
class AdamSAGEConfig(FairseqDataclass):
    adam_betas: Any = field(default=(0.9, 0.999), metadata={"help": "betas for AdamW-SAGE"})
    adam_eps: float = field(default=SAGE_EPS, metadata={"help": "epsilon (SAGE divides by eps^2)"})
    weight_decay: float = field(default=0.0, metadata={"help": "decoupled weight decay (not biases / layer norms)"})
    beta3: float = field(default=SAGE_BETA3, metadata={"help": "SAGE sensitivity EMA, in [0, 1)"})
    sage_bias_correction: bool = field(default=True, metadata={"help": "bias-correct the sensitivity EMA"})
    sage_patterns: str = field(default="", metadata={"help": "comma-separated name substrings of the SAGE tensors"})
    lr: List[float] = II("optimization.lr")


@dataclass
class AdamaxSAGEConfig(FairseqDataclass):
    adamax_betas: Any = field(default=(0.9, 0.999), metadata={"help": "betas for Adamax-SAGE"})
    adamax_eps: float = field(default=SAGE_EPS, metadata={"help": "epsilon (SAGE divides by eps^2)"})
    weight_decay: float = field(default=0.0, metadata={"help": "weight decay (not biases / layer norms)"})
    beta3: float = field(default=SAGE_BETA3, metadata={"help": "SAGE sensitivity EMA, in [0, 1)"})
    sage_patterns: str = field(default="", metadata={"help": "comma-separated name substrings of the SAGE tensors"})
    lr: List[float] = II("optimization.lr")


@register_optimizer("adam_sage", dataclass=AdamSAGEConfig)
class FairseqAdamSAGE(FairseqOptimizer):
    """AdamW-SAGE (``adaptune.schedules.sage.AdamWSAGE``) as a fairseq optimizer."""

    def __init__(self, cfg: AdamSAGEConfig, params):
        super().__init__(cfg)
        logger.info("adam_sage: AdamW-SAGE")
        self._optimizer = AdamWSAGE(sage_groups(params, cfg.weight_decay, cfg.sage_patterns), **self.optimizer_config)

    @property
    def optimizer_config(self):
        return {
            "lr": _first(self.cfg.lr),
            "betas": _betas(self.cfg.adam_betas),
            "eps": self.cfg.adam_eps,
            "weight_decay": self.cfg.weight_decay,
            "beta3": self.cfg.beta3,
            "bias_correction": self.cfg.sage_bias_correction,
        }


@register_optimizer("adamax_sage", dataclass=AdamaxSAGEConfig)
class FairseqAdamaxSAGE(FairseqOptimizer):
    """Adamax-SAGE (``adaptune.schedules.sage.AdamaxSAGE``) as a fairseq optimizer."""

    def __init__(self, cfg: AdamaxSAGEConfig, params):
        super().__init__(cfg)
        logger.info("adamax_sage: Adamax-SAGE")
        self._optimizer = AdamaxSAGE(sage_groups(params, cfg.weight_decay, cfg.sage_patterns), **self.optimizer_config)

    @property
    def optimizer_config(self):
        return {
            "lr": _first(self.cfg.lr),
            "betas": _betas(self.cfg.adamax_betas),
            "eps": self.cfg.adamax_eps,
            "weight_decay": self.cfg.weight_decay,
            "beta3": self.cfg.beta3,
        }
