"""DPS in a plain ``accelerate`` loop, in the reference order (mask, then clip)::

    from adaptune.schedules.integrations.accelerate import AccelerateDPS

    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    dps = AccelerateDPS(accelerator, model, total_steps=T, p=0.3, update_ratio=0.05)
    for batch in loader:
        with accelerator.accumulate(model):
            dps.before_forward()                 # Mix draws its masks here; harmless for Dense
            loss = model(**batch).loss
            accelerator.backward(loss)
            dps.clip_grad_norm_(model.parameters(), 1.0)   # instead of accelerator.clip_grad_norm_
            optimizer.step(); scheduler.step(); optimizer.zero_grad()

Everything keys on the optimizer-step counter, which the helper counts itself: a step ends each
time the gradients are synchronised (``accelerator.sync_gradients``), so gradient accumulation
and DDP are handled as ``accelerate`` runs them (DPS sees the accumulated, all-reduced gradient,
the same on every rank). :meth:`AccelerateDPS.clip_grad_norm_` (or :meth:`mask_gradients` when
you do not clip) does nothing on accumulation micro-steps; on a sync step it unscales fp16
gradients (``accelerator.unscale_gradients``), skips DPS when they overflowed (the GradScaler skips
that step too), masks or scores them with :class:`adaptune.schedules.dps.DPS`, then clips the global norm
with ``torch.nn.utils.clip_grad_norm_``: **the DPS reference's order, masking before clipping**.
**(choice)** It replaces ``accelerator.clip_grad_norm_`` rather than following it, because that
would unscale a second time (a GradScaler error) and clip before masking.

**(choice)** Forgetting the hook cannot pass silently: a step pre-hook on the optimizer raises
when ``optimizer.step()`` updates the parameters for a step whose gradients DPS never saw.

``before_forward()`` may be called before every forward (it acts once per optimizer step); it
is required for ``variant="mix"`` (the forward is patched by :func:`adaptune.schedules.dps.attach_mix` when
the helper is built: build it after ``accelerator.prepare`` and before the first forward). **Mix
under DDP:** also call :meth:`AccelerateDPS.prepare_mix` on the model *before* ``accelerator.prepare``:
registering the parametrization gives each weight a new autograd accumulator that the hooks DDP
registered when it wrapped the model never see, so patched after the wrap those gradients would
not be all-reduced (a ConfigError says so). Mix's draws use rank 0's seed on every rank
(``seed=None``: :func:`adaptune.schedules.sync.shared_seed`), as ``set_seed(..., device_specific=True)``
seeds the ranks apart.
DeepSpeed / FSDP: a ConfigError (sharded gradients), as in :mod:`.hf`.

**Checkpoints.** The helper has ``state_dict`` / ``load_state_dict`` (DPS's scores, masks, phase,
generator, and the helper's step counters), so ``accelerator.register_for_checkpointing(dps)``
puts it in ``accelerator.save_state`` and ``load_state`` resumes DPS where it was; a resumed run
ends bit-identical to an uninterrupted one on CPU. ``T`` for a run of whole epochs::

    T = total_steps(train_loader, epochs=3, gradient_accumulation_steps=accelerator.gradient_accumulation_steps)
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import torch

from adaptune.common.errors import ConfigError

from ..dps import DPS, MixoutWeight, attach_mix, linear_weights, phase_length
from ..dps.helpers import check_dps_hparams
from ..sync import shared_seed
from .guards import grads_overflowed, refuse_sharded
from .patterns import dps_patterns

__all__ = ["AccelerateDPS"]


def total_steps(dataloader, epochs: int, gradient_accumulation_steps: int = 1) -> int:
    """Optimizer steps of ``epochs`` passes over ``dataloader`` (the prepared one: its length is
    this process's batches) with accumulation: ``ceil(len / accumulation)`` per epoch, as
    ``accelerator.accumulate`` also steps on an epoch's last, partial group of batches."""
    batches = dataloader if isinstance(dataloader, int) else len(dataloader)
    if batches < 1 or epochs < 1 or gradient_accumulation_steps < 1:
        raise ValueError(
            f"total_steps needs positive batches, epochs and accumulation; got {batches}, {epochs}, {gradient_accumulation_steps}"
        )
    return math.ceil(batches / gradient_accumulation_steps) * int(epochs)


class AccelerateDPS:
    """DPS driven from an ``accelerate`` loop (see the module docstring).

    Args:
        accelerator: the ``accelerate.Accelerator``.
        model: the prepared model (DDP-wrapped or not; DPS works on the unwrapped module).
        total_steps: ``T``, the number of optimizer steps of the run.
        p, update_ratio, variant, patterns, family, seed: as :class:`adaptune.schedules.integrations.hf.DPSCallback`.
        optimizer: the prepared optimizer; given, a step that DPS did not see raises.
    """

    KEY = "AccelerateDPS"

    def __init__(
        self,
        accelerator,
        model: torch.nn.Module,
        total_steps: int,
        p: float = 0.3,
        update_ratio: float = 0.05,
        variant: str = "dense",
        patterns: Sequence[str] | None = None,
        *,
        family: str | None = None,
        seed: int | None = None,
        optimizer=None,
    ):
        try:
            check_dps_hparams(p, update_ratio, variant)
        except ValueError as err:  # the class's own argument, named as its users call it
            raise ConfigError(f"{self.KEY}.{err}") from None
        phase_length(int(total_steps), float(update_ratio), prefix=self.KEY)
        self.accelerator = accelerator
        self.model = accelerator.unwrap_model(model)
        dist_type = str(getattr(accelerator, "distributed_type", ""))
        sharded = next((name for name in ("DEEPSPEED", "FSDP") if name in dist_type), None)
        refuse_sharded(self.model, None, self.KEY, reason=sharded and {"DEEPSPEED": "DeepSpeed"}.get(sharded, sharded))
        patterns = dps_patterns(self.model, patterns, family)
        key = f"{self.KEY}.patterns"
        mix = None
        if variant == "mix":
            before = {id(m) for m in self.model.modules() if isinstance(m, MixoutWeight)}
            mix = attach_mix(self.model, patterns, key=key)
            if isinstance(model, torch.nn.parallel.DistributedDataParallel) and any(id(w) not in before for w in mix.values()):
                raise ConfigError(
                    f"{self.KEY}: DPS-Mix under DDP must patch the forward before accelerator.prepare wraps the model "
                    "(else DDP never all-reduces the patched weights' gradients): call "
                    "AccelerateDPS.prepare_mix(model) before accelerator.prepare(model, ...)"
                )
        # (seed) rank 0's on every rank: accelerate's set_seed(..., device_specific=True) seeds ranks apart
        self.dps = DPS(
            linear_weights(self.model),
            int(total_steps),
            p,
            update_ratio,
            variant,
            patterns=patterns,
            mix=mix,
            seed=seed if seed is not None else shared_seed(),
            key=key,
        )
        self.step = 0  # optimizer steps whose gradients DPS processed
        self.skipped_steps = 0  # fp16 overflows
        self._begun = 0
        self._optimizer = optimizer
        if optimizer is not None:
            inner = optimizer
            while hasattr(inner, "optimizer") and isinstance(getattr(inner, "optimizer"), torch.optim.Optimizer):
                inner = inner.optimizer
            inner.register_step_pre_hook(self._check_seen)

    @classmethod
    def prepare_mix(cls, model: torch.nn.Module, patterns: Sequence[str] | None = None, *, family: str | None = None) -> None:
        """DPS-Mix under DDP: patch the forward of the *unprepared* ``model`` (before
        ``accelerator.prepare``); the helper built after ``prepare`` with the same patterns reuses it."""
        attach_mix(model, dps_patterns(model, patterns, family), key=f"{cls.KEY}.patterns")

    def before_forward(self) -> None:
        """Before a forward pass: the first call of each optimizer step enters it (Mix: draws ``N``)."""
        step = self.step + 1
        if self._begun != step:
            self.dps.on_step_begin(step)
            self._begun = step

    def mask_gradients(self) -> bool:
        """After ``accelerator.backward``: on a sync step, unscale (fp16), then score or mask the
        gradients. Returns whether this was a sync step."""
        if not self.accelerator.sync_gradients:
            return False
        step = self.step + 1
        if self.dps.mix is not None and self._begun != step:
            raise RuntimeError(f"{self.KEY}: DPS-Mix needs before_forward() before the forward of each step")
        self.accelerator.unscale_gradients()
        if grads_overflowed(self.model, getattr(self.accelerator, "scaler", None)):
            self.skipped_steps += 1
        else:
            self.dps.on_gradients(step)
        self.step = step
        return True

    def clip_grad_norm_(self, parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0):
        """:meth:`mask_gradients`, then ``torch.nn.utils.clip_grad_norm_`` (on a sync step; returns the
        total norm before clipping, or None on an accumulation micro-step)."""
        if not self.mask_gradients():
            return None
        return torch.nn.utils.clip_grad_norm_(list(parameters), max_norm, norm_type=norm_type)

    def state_dict(self) -> dict:
        """DPS's state and the helper's counters: plain containers of tensors
        (``accelerator.register_for_checkpointing(dps)`` saves it with the run)."""
        return {
            "dps": self.dps.state_dict(),
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "begun": self._begun,
            "updates": self._updates,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (checked against this helper's p, update ratio, variant and T)."""
        self.dps.load_state_dict(state["dps"])
        self.step, self.skipped_steps = int(state["step"]), int(state["skipped_steps"])
        self._begun, self._updates = int(state["begun"]), int(state["updates"])

    def _check_seen(self, optimizer, args, kwargs) -> None:
        if self.step == self._updates:  # (a step the GradScaler skipped never reaches here)
            raise RuntimeError(
                f"{self.KEY}: optimizer.step() updates the parameters for step {self.step + 1} but DPS never "
                "saw its gradients; call dps.clip_grad_norm_(...) or dps.mask_gradients() after accelerator.backward"
            )
        self._updates = self.step

    _updates = 0
