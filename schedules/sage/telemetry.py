"""Telemetry of the SAGE optimizers: a fixed probe of entries and the summary logged for them.

:func:`sensitivity_summary` reports the sensitivity EMA and the per-entry learning-rate
multiplier on a fixed random subsample (:func:`probe_indices`), so that logging costs one small
gather per SAGE tensor and no full-size state.
"""

from __future__ import annotations

import torch
from torch import Tensor


def probe_indices(optimizer: torch.optim.Optimizer, k: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    """A fixed uniform random sample of ``k`` entries over all SAGE tensors: (param, flat indices)."""
    params = [p for g in optimizer.param_groups if g.get("sage", True) for p in g["params"]]
    if not params:
        return []
    sizes = torch.tensor([p.numel() for p in params], dtype=torch.int64)
    ends = torch.cumsum(sizes, 0)
    total = int(ends[-1])
    gen = torch.Generator().manual_seed(seed)
    pos = torch.randint(total, (min(k, total),), generator=gen).sort().values
    owner = torch.searchsorted(ends, pos, right=True)
    probe = []
    for i in owner.unique().tolist():
        local = pos[owner == i] - (ends[i] - sizes[i])
        probe.append((params[i], local.to(params[i].device)))
    return probe


def quantiles(x: Tensor, prefix: str, qs=(0.1, 0.5, 0.9)) -> dict[str, float]:
    """The mean and the quantiles ``qs`` of ``x``: ``{prefix}_mean``, ``{prefix}_p10``, ..."""
    out = {f"{prefix}_mean": float(x.mean())}
    vals = torch.quantile(x, torch.tensor(qs, dtype=x.dtype))
    out.update({f"{prefix}_p{round(q * 100)}": float(v) for q, v in zip(qs, vals)})
    return out


def sensitivity_summary(
    optimizer: torch.optim.Optimizer, probe: list[tuple[Tensor, Tensor]], last_sens: dict[int, Tensor] | None = None
) -> dict[str, float]:
    """Summary of Ī and of the per-entry learning-rate multiplier on a fixed subsample.

    ``sage/sens_*``: the (bias-corrected, where the optimizer bias-corrects) sensitivity EMA Î.
    ``sage/lr_mult_*``: ``|I - Î| / (Î + ε²)``, the factor SAGE applied to the entry's step in
    the last update, from ``last_sens`` (I of the probe entries recorded just before that update;
    keyed by ``id(param)``). Without it only the ``sens`` statistics are returned.
    """
    lookup = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    sens, mult = [], []
    for p, idx in probe:
        state = optimizer.state.get(p)
        if not state or "exp_avg_sens" not in state:
            continue
        group = lookup[id(p)]
        t = float(state["step"])
        c3 = 1 - group["beta3"] ** t if group.get("bias_correction", False) else 1.0
        s_hat = state["exp_avg_sens"].reshape(-1)[idx].double() / c3
        sens.append(s_hat)
        if last_sens is not None and id(p) in last_sens:
            mult.append((last_sens[id(p)] - s_hat).abs() / (s_hat + group["eps"] ** 2))
    out: dict[str, float] = {}
    if sens:
        out.update(quantiles(torch.cat(sens).cpu(), "sage/sens"))
    if mult:
        out.update(quantiles(torch.cat(mult).cpu(), "sage/lr_mult"))
    return out
