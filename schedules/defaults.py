"""The algorithms' default hyper-parameters, one literal each.

The algorithms (``AdamWSAGE(beta3=...)``, ``DPS(p=...)``, ``ChildTuningF(reserve_p=...)``,
``Mixout(p=...)``) take them as their signatures' defaults and check their own arguments
(``ValueError`` naming the argument); the config schema (``schedules/config.py``) takes its
defaults from here too, so the two cannot drift, and no algorithm imports the schema.
(choice) A module of constants rather than the schema reading the signatures: the schema is
imported by ``adaptune.schedules`` itself, and importing an algorithm's package from it would be
an import cycle.
"""

from __future__ import annotations

SAGE_BETA3 = 0.75  # EMA of the sensitivity; the paper uses 0.6-0.9
SAGE_EPS = 1e-6  # the multiplier's denominator uses eps**2
WEIGHT_DECAY = 0.01  # Adamax-SAGE / MT-DNN Adamax; the runner's default for every optimizer
DPS_P = 0.3  # fraction of entries DROPPED in a selection phase (reference scripts)
DPS_UPDATE_RATIO = 0.05  # phase length U = int(T * update_ratio) (reference scripts)
DPS_VARIANT = "dense"
CHILDTUNING_RESERVE_P = 0.3  # fraction of gradient entries KEPT (AliceMind run.sh)
MIXOUT_P = 0.9  # the Mixout paper's choice for BERT-large on small GLUE tasks


def check_range(name: str, value, low: float, high: float, low_open: bool = False, high_open: bool = True) -> float:
    """``float(value)`` if it lies in the interval, else ValueError naming the argument."""
    bad = isinstance(value, bool) or not isinstance(value, (int, float))
    if not bad:
        bad = (value <= low if low_open else value < low) or (value >= high if high_open else value > high)
    if bad:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return float(value)
