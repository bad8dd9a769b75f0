"""AdamW-SAGE: the optimizer and its maths, written once per backend.

``AdamWSAGE._reference`` is the readable per-tensor loop; :func:`adamw_fused_kernel` is the
same update as one expression per element, compiled by :mod:`.compiled`; its C++ twin for CPU is
``adamw_sage_`` in ``csrc/sage_cpu.cpp``. The shared parts (validation, state, dispatch, the
step loop) are in :mod:`.optimizer`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..defaults import SAGE_BETA3, SAGE_EPS
from .optimizer import FUSED_MIN_NUMEL, SAGEOptimizer


def adamw_fused_kernel(
    p: Tensor,
    g: Tensor,
    m: Tensor,
    v: Tensor,
    s: Tensor | None,
    beta1: Tensor,
    beta2: Tensor,
    beta3: Tensor,
    c_prev: Tensor,
    c_eps2: Tensor,
    step_size: Tensor,
    eps: Tensor,
    keep: Tensor,
) -> None:
    """The fused AdamW-SAGE update of one flat tensor (``s`` None: a plain group), in place.

    Hyper-parameters are 0-dim tensors (see :meth:`AdamWSAGE._kernel_coefficients`), so that
    changing the learning rate or the step never recompiles.
    """
    m_new = m * beta1 + g * (1 - beta1)
    v_new = v * beta2 + g * g * (1 - beta2)
    if s is not None:
        sens = (p * g).abs()
        num = (sens * c_prev - s).abs() * beta3
        s_new = s * beta3 + sens * (1 - beta3)
        # mult·m/(sqrt(v)+ε) with one division (measured ~5-10% faster than two at 1 thread)
        update = num * m_new / ((s_new + c_eps2) * (v_new.sqrt() + eps))
        s.copy_(s_new)
    else:
        update = m_new / (v_new.sqrt() + eps)
    p.copy_((p - step_size * update) * keep)
    m.copy_(m_new)
    v.copy_(v_new)


class AdamWSAGE(SAGEOptimizer):
    r"""AdamW with SAGE (reference name ``UnstructAwareAdamW``; docs/algorithms.md §1).

    For each parameter of a ``sage=True`` group, with ``t`` its step counter::

        m = β1·m + (1-β1)·g
        v = β2·v + (1-β2)·g²
        I = |θ ⊙ g|                           (θ before this step's update)
        Ī = β3·Ī + (1-β3)·I
        bias_correction: s = lr_t·|I - Î|/(Î + ε²)·sqrt(1-β2^t)/(1-β1^t),  Î = Ī/(1-β3^t)
        otherwise:       s = lr_t·|I - Ī|/(Ī + ε²)
        θ -= s·m/(sqrt(v) + ε)
        θ -= lr_t·λ·θ

    With bias correction the first step leaves SAGE parameters unchanged (``Î = I``), as in the
    reference.

    **(choice)** Decoupled decay uses the group's current (scheduled) ``lr``, as
    ``torch.optim.AdamW`` does; the reference used the base lr because it scheduled inside the
    optimizer.

    **(choice)** ``sage=False`` groups use the same maths without the SAGE factor (the original
    Hugging Face ``AdamW`` the reference derives from):
    ``θ -= lr_t·sqrt(1-β2^t)/(1-β1^t)·m/(sqrt(v)+ε)``
    (``lr_t`` alone without bias correction), then ``θ -= lr_t·λ·θ``. This differs from
    ``torch.optim.AdamW`` only in where ε sits and in applying decay after the update.

    Args:
        params: parameters or groups; a group may set ``sage`` (default True) and ``weight_decay``.
        lr: learning rate (the LR scheduler scales the group's ``lr``).
        betas: (β1, β2), each in [0, 1).
        beta3: EMA coefficient of the sensitivity, in [0, 1); the paper uses 0.6–0.9.
        eps: ε (the multiplier's denominator uses ε²), >= 0.
        weight_decay: λ, >= 0.
        bias_correction: bias-correct m, v and Ī (default True, the reference's default).
        fused: implementation choice, see :mod:`adaptune.schedules.sage.optimizer` (None: automatic;
            False: the reference loop).
        backend: the fused path's backend (None: automatic; ``cpu_kernel``, ``compiled``,
            ``compiled_grouped``), also per param group.
        fused_min_numel: ``fused=None`` picks the fused path from this many elements on.
    """

    _base_keys = ("exp_avg", "exp_avg_sq")
    _fused_kernel = staticmethod(adamw_fused_kernel)
    _cpu_kernel = "adamw_sage_"

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        beta3: float = SAGE_BETA3,
        eps: float = SAGE_EPS,
        weight_decay: float = 0.0,
        bias_correction: bool = True,
        *,
        fused: bool | None = None,
        backend: str | None = None,
        fused_min_numel: int = FUSED_MIN_NUMEL,
    ):
        super().__init__(
            params,
            {
                "lr": lr,
                "betas": betas,
                "beta3": beta3,
                "eps": eps,
                "weight_decay": weight_decay,
                "bias_correction": bool(bias_correction),
                "fused": fused,
                "backend": backend,
                "fused_min_numel": fused_min_numel,
            },
        )

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("bias_correction", True)

    @staticmethod
    def _coefficients(group: dict, t: int) -> tuple[float, float, float]:
        """(step size without the SAGE factor, c_{t-1}, c_t) for step ``t``; c_t = 1-β3^t or 1."""
        beta1, beta2 = group["betas"]
        if group["bias_correction"]:
            beta3 = group["beta3"]
            return (group["lr"] * math.sqrt(1 - beta2**t) / (1 - beta1**t), 1 - beta3 ** (t - 1), 1 - beta3**t)
        return group["lr"], 1.0, 1.0

    def _kernel_coefficients(self, group: dict, t: int) -> list[float]:
        """The fused kernels' hyper-parameters, in their argument order."""
        beta1, beta2 = group["betas"]
        eps, lr, wd = group["eps"], group["lr"], group["weight_decay"]
        step_size, c_prev, c = self._coefficients(group, t)
        return [beta1, beta2, group["beta3"], c_prev, c * eps * eps, step_size, eps, 1 - lr * wd]

    def _reference(self, group, t, params, grads, states) -> None:
        """The readable per-tensor loop."""
        beta1, beta2 = group["betas"]
        beta3, eps, lr, wd = group["beta3"], group["eps"], group["lr"], group["weight_decay"]
        step_size, c_prev, c = self._coefficients(group, t)
        for param, grad, state in zip(params, grads, states):
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)  # m
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)  # v
            update = exp_avg / exp_avg_sq.sqrt().add_(eps)  # m / (sqrt(v) + ε)
            if group["sage"]:
                exp_avg_sens = state["exp_avg_sens"]
                sens = torch.mul(param, grad).abs_()  # I = |θ ⊙ g|
                # c_t·|I - Î_t| = β3·|c_{t-1}·I - Ī_{t-1}|  (schedules/sage/optimizer.py)
                num = torch.mul(sens, c_prev).sub_(exp_avg_sens).abs_().mul_(beta3)
                exp_avg_sens.mul_(beta3).add_(sens, alpha=1 - beta3)  # Ī_t
                update.mul_(num.div_(exp_avg_sens + c * eps * eps))  # × |I - Î|/(Î + ε²)
            param.add_(update, alpha=-step_size)
            if wd != 0:
                param.mul_(1 - lr * wd)  # θ -= lr·λ·θ


class HFAdamW(AdamWSAGE):
    r"""Hugging Face transformers' original ``AdamW`` (v4.7, ``correct_bias=True``), the optimizer
    of every arm of the DPS paper's reference runs (``schedule.optimizer=adamw_hf``)::

        m = β1·m + (1-β1)·g;   v = β2·v + (1-β2)·g²
        θ ← θ - lr_t·√(1-β2^t)/(1-β1^t) · m/(√v + ε)     ε added to the *uncorrected* √v
        θ ← θ - lr_t·λ·θ                                  decay after the update

    Exactly :class:`AdamWSAGE`'s ``sage=False`` maths on every group (as :class:`MTDNNAdamax` is
    Adamax-SAGE's). ``torch.optim.AdamW`` differs: it adds ε to the bias-corrected √v̂ and decays
    before the update, which moves an entry with ``|g| ~ 1e-6`` by ~1.4% less/more per step. No
    sensitivity state is kept; ``beta3`` is not an argument.

    Args:
        params, lr, betas, eps, weight_decay: as ``transformers.AdamW`` (4.7 defaults: eps 1e-6,
            weight_decay 0).
        correct_bias: the ``√(1-β2^t)/(1-β1^t)`` step-size factor (transformers' default True).
        fused, backend, fused_min_numel: implementation choice, as :class:`AdamWSAGE`.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        *,
        fused: bool | None = None,
        backend: str | None = None,
        fused_min_numel: int = FUSED_MIN_NUMEL,
    ):
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            bias_correction=correct_bias,
            fused=fused,
            backend=backend,
            fused_min_numel=fused_min_numel,
        )
        for group in self.param_groups:
            group["sage"] = False

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group({**param_group, "sage": False})
