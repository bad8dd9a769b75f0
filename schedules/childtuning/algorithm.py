"""ChildTuning's gradient masks (see ``adaptune.schedules.childtuning``), usable outside the runner::

f = ChildTuningF(optimizer_params, reserve_p=0.3, seed=1)
... loss.backward(); clip ...; f.apply(); optimizer.step()

d = ChildTuningD(model.named_parameters(), reserve_p=0.3, patterns=["layer"])
d.compute(model, [lambda: loss_of(batch) for batch in epoch], max_grad_norm=1.0)   # once
... loss.backward(); clip ...; d.apply(); optimizer.step()
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from adaptune.common.errors import ConfigError

from ..defaults import CHILDTUNING_RESERVE_P, check_range
from ..patterns import select_names
from ..sync import broadcast_from_rank0

STATE_VERSION = 1


def _check_reserve_p(reserve_p: Any) -> float:
    return check_range("reserve_p", reserve_p, 0, 1, low_open=True, high_open=False)


def _check_version(state: Mapping[str, Any], kind: str) -> None:
    if state.get("version") != STATE_VERSION or state.get("kind") != kind:
        raise ConfigError(
            f"the checkpoint's schedule state is not ChildTuning-{kind.upper()} state "
            f"(version {STATE_VERSION}); resume with the schedule it was written with"
        )


#: the runner's config key for each argument a checkpoint records (named in the errors)
CONFIG_KEYS = {"reserve_p": "schedule.keep_p"}


def _check_same(state: Mapping[str, Any], key: str, mine: Any) -> None:
    if state[key] != mine:
        raise ConfigError(
            f"the checkpoint was written with ChildTuning {key}={state[key]!r} ({CONFIG_KEYS[key]}), "
            f"this run has {mine!r}; resume with the same schedule settings"
        )


class ChildTuningF:
    """Task-free ChildTuning: ``g <- g * (B / reserve_p)``, ``B ~ Bernoulli(reserve_p)`` fresh
    every :meth:`apply`, for every tensor given (that has a gradient)."""

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        reserve_p: float = CHILDTUNING_RESERVE_P,
        seed: int = 0,
        device: torch.device | str | None = None,
    ):
        self.reserve_p = _check_reserve_p(reserve_p)
        self.params = list(params)
        if device is None:
            device = self.params[0].device if self.params else torch.device("cpu")
        self.seed = int(seed)
        self.generator = torch.Generator(device=torch.device(device))
        self.generator.manual_seed(self.seed)

    def masks(self, shapes: Sequence[torch.Size]) -> list[torch.Tensor]:
        """The next ``B`` (bool) for tensors of ``shapes``, in order (advances the generator)."""
        device = self.generator.device
        return [torch.rand(shape, generator=self.generator, device=device) < self.reserve_p for shape in shapes]

    def apply(self) -> None:
        """Mask and rescale the ``.grad`` of every tensor in place (one draw per tensor)."""
        if self.reserve_p == 1.0:
            return
        grads = [t.grad for t in self.params if t.grad is not None]
        for g, keep in zip(grads, self.masks([g.shape for g in grads])):
            g.mul_(keep.to(device=g.device, dtype=g.dtype).div_(self.reserve_p))

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "kind": "f",
            "reserve_p": self.reserve_p,
            "seed": self.seed,
            "device": self.generator.device.type,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        _check_version(state, "f")
        _check_same(state, "reserve_p", self.reserve_p)
        if state["device"] != self.generator.device.type:
            raise ConfigError(
                f"the checkpoint's ChildTuning-F generator ran on {state['device']}, this run "
                f"trains on {self.generator.device.type}; resume on the same kind of device"
            )
        self.seed = int(state["seed"])
        self.generator.set_state(state["generator"].to("cpu", torch.uint8))


def fisher_information(
    model: torch.nn.Module,
    params: Sequence[torch.Tensor],
    loss_batches: Sequence[Callable[[], torch.Tensor]],
    max_grad_norm: float | None,
    progress: Callable[[int, int], None] | None = None,
) -> list[torch.Tensor]:
    """``F = sum over the N batches of clip(g)**2 / N`` for each of ``params`` (fp32, or fp64 for
    fp64 tensors), ``clip`` the per-tensor clip to ``max_grad_norm`` (None / 0: none). Each
    callable runs one batch's forward and returns the loss; gradients of ``model`` are cleared
    before and after every batch. ``progress(done, n)`` is called after each batch."""
    n = len(loss_batches)
    fisher = [torch.zeros_like(t, dtype=torch.promote_types(t.dtype, torch.float32)) for t in params]
    model.zero_grad(set_to_none=True)
    for done, loss_of in enumerate(loss_batches, 1):
        loss_of().backward()
        for f, t in zip(fisher, params):
            if t.grad is None:
                continue
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(t, float(max_grad_norm))
            f.add_(t.grad.to(f.dtype) ** 2 / n)
        model.zero_grad(set_to_none=True)
        if progress is not None:
            progress(done, n)
    return fisher


def percentile_threshold(scores: Sequence[torch.Tensor], reserve_p: float) -> float:
    """``numpy.percentile`` (linear interpolation) of all ``scores`` entries together at
    ``(1 - reserve_p) * 100``, computed on their dtype as the reference does (fp32)."""
    flat = np.concatenate([s.detach().reshape(-1).cpu().numpy() for s in scores])
    return float(np.percentile(flat, (1 - reserve_p) * 100))


class ChildTuningD:
    """Task-driven ChildTuning: a fixed mask ``M = F >= percentile(F, (1-reserve_p)·100)`` over the
    tensors whose names contain one of ``patterns``; :meth:`apply` does ``g <- g * M``."""

    def __init__(
        self,
        named_parameters: Iterable[tuple[str, torch.Tensor]],
        reserve_p: float = CHILDTUNING_RESERVE_P,
        patterns: Sequence[str] = ("layer",),
        key: str = "schedule.childtuning_patterns",
    ):
        self.reserve_p = _check_reserve_p(reserve_p)
        named = [(n, t) for n, t in named_parameters if t.requires_grad]
        chosen = set(select_names([n for n, _ in named], list(patterns), key))
        self.names = [n for n, _ in named if n in chosen]
        self.params = [t for n, t in named if n in chosen]
        self.masks: list[torch.Tensor] | None = None
        self.threshold: float | None = None
        self.kept = 1.0

    def compute(
        self,
        model: torch.nn.Module,
        loss_batches: Sequence[Callable[[], torch.Tensor]],
        max_grad_norm: float | None,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        """The Fisher pass and the masks (``model`` as it is: put it in train mode first);
        ``progress(done, n)`` after each batch of the pass."""
        if len(loss_batches) == 0:
            raise ConfigError("ChildTuning-D needs at least one training batch for its Fisher pass")
        fisher = fisher_information(model, self.params, loss_batches, max_grad_norm, progress)
        threshold = percentile_threshold(fisher, self.reserve_p)
        masks = [f >= threshold for f in fisher]
        del fisher
        # every DDP rank trains with rank 0's masks (and reports its threshold)
        shared = torch.tensor([threshold], dtype=torch.float64)
        broadcast_from_rank0([*masks, shared])
        self.set_masks(masks, float(shared))

    def set_masks(self, masks: Sequence[torch.Tensor], threshold: float) -> None:
        """Install ``masks`` (bool, one per selected tensor, moved to its device) and ``threshold``."""
        self.masks = [m.to(device=t.device, dtype=torch.bool) for m, t in zip(masks, self.params)]
        self.threshold = float(threshold)
        total = sum(m.numel() for m in self.masks)
        self.kept = sum(int(m.sum()) for m in self.masks) / max(total, 1)

    def apply(self) -> None:
        """``g <- g * M`` on every selected tensor that has a gradient."""
        if self.masks is None:
            raise RuntimeError(
                "ChildTuning-D: no mask yet; compute() (Schedule.before_training) must run "
                "before the first step, or load_state_dict() on resume"
            )
        pairs = [(t.grad, m) for t, m in zip(self.params, self.masks) if t.grad is not None]
        if pairs:
            torch._foreach_mul_([g for g, _ in pairs], [m for _, m in pairs])

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "kind": "d",
            "reserve_p": self.reserve_p,
            "names": list(self.names),
            "threshold": self.threshold,
            "kept": self.kept,
            "masks": dict(zip(self.names, self.masks)) if self.masks is not None else {},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        _check_version(state, "d")
        _check_same(state, "reserve_p", self.reserve_p)
        if list(state["names"]) != self.names:
            raise ConfigError(
                "the checkpoint's ChildTuning-D masked a different set of tensors than this "
                "run's schedule.childtuning_patterns select"
            )
        if state["threshold"] is None:
            raise ConfigError(
                "the checkpoint holds no ChildTuning-D mask (its Fisher pass never finished); pass resume=false to start over"
            )
        masks = [state["masks"][n] for n in self.names]
        for n, m, t in zip(self.names, masks, self.params):
            if tuple(m.shape) != tuple(t.shape):
                raise ConfigError(f"ChildTuning-D checkpoint: {n} has shape {tuple(m.shape)}, model has {tuple(t.shape)}")
        self.set_masks(masks, state["threshold"])
