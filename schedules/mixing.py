"""The Mixout-style weight mix shared by DPS-Mix and Mixout, with the reference backward.

Both references (DPS's ``MixLinear`` op and ``bloodwass/mixout``) compute, in the forward pass::

    W_eff = ((1-N)·R + N·W - p·R) / (1-p)   ==   R + N·(W - R) / (1-p)

(``R`` the reference weight, ``N`` a 0/1 mask, ``p`` the mix probability) and return, from a
custom backward, ``dL/dW = dL/dW_eff ⊙ N`` **without** the ``1/(1-p)`` factor that true autograd
would give (docs/algorithms.md §2 and §3). :func:`mix_weight` reproduces exactly that: the selected
entries get the gradient of ``W_eff`` unscaled, so a global-norm clip sees what the references'
clip saw. No gradient flows to ``R`` or ``N`` (constants).
"""
from __future__ import annotations

import torch


class _MixWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor, scale: float):
        ctx.save_for_backward(mask)
        return torch.add(reference, (weight - reference) * mask, alpha=scale)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (mask,) = ctx.saved_tensors
        return grad_out * mask, None, None, None


def mix_weight(weight: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """``reference + mask·(weight - reference)·scale`` whose gradient to ``weight`` is
    ``grad ⊙ mask`` (the references' backward; ``scale`` is ``1/(1-p)``). ``mask`` broadcasts
    against ``weight`` (``(1, in)`` per input column, or ``(out, in)``) and may be bool (used as it
    is: multiplying by a bool tensor promotes on the fly, no float copy of the mask is made)."""
    return _MixWeight.apply(weight, reference, mask, float(scale))
