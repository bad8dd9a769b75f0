"""Mixed precision for the training loop: which dtype, the autocast context, and under fp16 the
GradScaler with its overflow check.

One optimizer step under :class:`Precision` (the loop in ``runner/loop.py``)::

    with amp.autocast():                 # every micro-batch
        loss_sum = task.loss(...)
    amp.backward(loss_sum)               # scaled under fp16
    amp.unscale_(optimizer)              # fp16: true gradients from here on
    ...                                  # normalise, clip (the loop's step maths)
    if not amp.overflowed(grads, norm):  # fp16 only: an inf/NaN gradient skips the step's
        schedule.on_gradients(step)      # gradient hook and LR step...
    amp.step(optimizer)                  # ...and GradScaler.step skips the update itself
    if not overflowed: lr_scheduler.step()

bf16 and fp32 have no scaler: ``backward``/``unscale_``/``step`` are the plain operations and
``overflowed`` is always False (a non-finite loss stops the run earlier, as ``TrainingDiverged``).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Iterable

import torch


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 where the hardware runs it fast (CUDA with bf16, CPU with AMX/AVX512-BF16
    through oneDNN), else fp32. On a CPU without them (AVX2 only) bf16 autocast is ~15x slower."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


def autocast_context(precision: str, device: torch.device):
    """Autocast to ``precision`` ("bf16" / "fp16") on ``device``; no-op for "fp32"."""
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


class Precision:
    """The resolved precision of one run and, under fp16, its GradScaler."""

    def __init__(self, precision: str, device: torch.device):
        self.name = resolve_precision(precision, device)
        self.device = device
        self.scaler = torch.amp.GradScaler(device.type) if self.name == "fp16" else None

    def autocast(self):
        return autocast_context(self.name, self.device)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the gradients by the loss scale (fp16; once per step, before clipping)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def overflowed(self, grads: Iterable[torch.Tensor]) -> bool:
        """Under fp16: whether this step's (unscaled) gradients hold inf/NaN (one host sync, on
        the per-tensor norms; an inf/NaN entry makes its tensor's norm non-finite). Always False
        without a scaler."""
        if self.scaler is None:
            return False
        grads = list(grads)
        if not grads:
            return False
        return not bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer.step()``; under fp16 through the scaler, which skips the update when the
        gradients overflowed and then adjusts the scale."""
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict | None:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: dict | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
