"""Adamax-SAGE: the optimizer and its maths, written once per backend.

``AdamaxSAGE._reference`` is the readable per-tensor loop; :func:`adamax_fused_kernel` is the
same update as one expression per element, compiled by :mod:`.compiled`; its C++ twin for CPU is
``adamax_sage_`` in ``csrc/sage_cpu.cpp``. The shared parts (validation, state, dispatch, the
step loop) are in :mod:`.optimizer`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..defaults import SAGE_BETA3, SAGE_EPS, WEIGHT_DECAY
from .optimizer import FUSED_MIN_NUMEL, SAGEOptimizer


def adamax_fused_kernel(
    p: Tensor,
    g: Tensor,
    m: Tensor,
    u: Tensor,
    s: Tensor | None,
    beta1: Tensor,
    beta2: Tensor,
    beta3: Tensor,
    eps: Tensor,
    eps2: Tensor,
    weight_decay: Tensor,
    lr: Tensor,
) -> None:
    """The fused Adamax-SAGE update of one flat tensor (``s`` None: a plain group), in place.

    Hyper-parameters are 0-dim tensors (see :meth:`AdamaxSAGE._kernel_coefficients`), so that
    changing the learning rate never recompiles.
    """
    m_new = m * beta1 + g * (1 - beta1)
    u_new = torch.maximum(u * beta2, g.abs() + eps)
    u_eps = u_new + eps
    if s is not None:
        sens = (p * g).abs()
        num = (sens - s).abs() * beta3
        s_new = s * beta3 + sens * (1 - beta3)
        # mult·(m/(u+ε) + λθ) with one division
        d = num * (m_new + weight_decay * p * u_eps) / ((s_new + eps2) * u_eps)
        s.copy_(s_new)
    else:
        d = m_new / u_eps + weight_decay * p
    p.copy_(p - lr * d)
    m.copy_(m_new)
    u.copy_(u_new)


class AdamaxSAGE(SAGEOptimizer):
    r"""Adamax with SAGE (reference name ``UnstructAwareAdamax``; docs/algorithms.md §1).

    For each parameter of a ``sage=True`` group (no bias correction anywhere in this variant)::

        m = β1·m + (1-β1)·g
        u = max(β2·u, |g| + ε)
        d = m/(u + ε) + λ·θ                  (decay inside the update, so SAGE scales it too)
        I = |θ ⊙ g|,  Ī = β3·Ī + (1-β3)·I    (θ before this step's update)
        θ -= lr_t·|I - Ī|/(Ī + ε²)·d

    ``sage=False`` groups use the reference (MT-DNN) Adamax maths without the SAGE scaling:
    ``θ -= lr_t·d`` with the same ``m``, ``u`` and ``d``. Note this is not ``torch.optim.Adamax``
    (which bias-corrects m and adds ε only once).

    Args:
        params: parameters or groups; a group may set ``sage`` (default True) and ``weight_decay``.
        lr: learning rate. betas: (β1, β2) in [0, 1). beta3: in [0, 1), the paper uses 0.6–0.9
        (0.85 for MNLI). eps: ε >= 0. weight_decay: λ >= 0 (0.01 for weights in the reference;
        use 0 for biases and LayerNorm, as :func:`sage_param_groups` does).
        fused, backend, fused_min_numel: implementation choice, as :class:`~.adamw.AdamWSAGE`
            (see :mod:`adaptune.schedules.sage.optimizer`; fused None: automatic, False: the
            reference loop).
    """

    _base_keys = ("exp_avg", "exp_inf")
    _fused_kernel = staticmethod(adamax_fused_kernel)
    _cpu_kernel = "adamax_sage_"

    def __init__(
        self,
        params,
        lr: float = 2e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        beta3: float = SAGE_BETA3,
        eps: float = SAGE_EPS,
        weight_decay: float = WEIGHT_DECAY,
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
                "fused": fused,
                "backend": backend,
                "fused_min_numel": fused_min_numel,
            },
        )

    def _kernel_coefficients(self, group: dict, t: int) -> list[float]:
        """The fused kernels' hyper-parameters, in their argument order."""
        beta1, beta2 = group["betas"]
        eps = group["eps"]
        return [beta1, beta2, group["beta3"], eps, eps * eps, group["weight_decay"], group["lr"]]

    def _reference(self, group, t, params, grads, states) -> None:
        """The readable per-tensor loop."""
        beta1, beta2 = group["betas"]
        beta3, eps, lr, wd = group["beta3"], group["eps"], group["lr"], group["weight_decay"]
        for param, grad, state in zip(params, grads, states):
            exp_avg, exp_inf = state["exp_avg"], state["exp_inf"]
            exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)  # m
            torch.maximum(exp_inf.mul_(beta2), grad.abs().add_(eps), out=exp_inf)  # u
            update = exp_avg / (exp_inf + eps)  # d = m / (u + ε)
            if wd != 0:
                update.add_(param, alpha=wd)  # d += λ·θ
            if group["sage"]:
                exp_avg_sens = state["exp_avg_sens"]
                sens = torch.mul(param, grad).abs_()  # I = |θ ⊙ g|
                # |I - Ī_t| = β3·|I - Ī_{t-1}|  (schedules/sage/optimizer.py)
                num = torch.sub(sens, exp_avg_sens).abs_().mul_(beta3)
                exp_avg_sens.mul_(beta3).add_(sens, alpha=1 - beta3)  # Ī_t
                update.mul_(num.div_(exp_avg_sens + eps * eps))  # × |I - Ī| / (Ī + ε²)
            param.add_(update, alpha=-lr)


class MTDNNAdamax(AdamaxSAGE):
    r"""MT-DNN's Adamax, the baseline of the SAGE paper's GLUE table (``schedule.optimizer=adamax_mtdnn``).

    Exactly :class:`AdamaxSAGE`'s ``sage=False`` maths on every group (``m`` not bias-corrected,
    ``u = max(β2·u, |g| + ε)``, ``θ -= lr·(m/(u + ε) + λ·θ)``: weight decay added to the update,
    not to the gradient). ``torch.optim.Adamax`` differs on all three points, so it is not the
    paper's baseline. No sensitivity state is kept. Takes Adamax's arguments only (lr, betas, eps,
    weight_decay, fused, backend, fused_min_numel): there is no ``beta3``.
    """

    def __init__(
        self,
        params,
        lr: float = 5e-5,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = SAGE_EPS,
        weight_decay: float = WEIGHT_DECAY,
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
            fused=fused,
            backend=backend,
            fused_min_numel=fused_min_numel,
        )
        for group in self.param_groups:
            group["sage"] = False

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group({**param_group, "sage": False})
