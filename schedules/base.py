"""The interface every schedule implements, and the pieces schedules share.

The training loop (``runner/loop.py``) drives a schedule like this, once per optimizer step
``step`` (1-based), after all micro-batches of the step have been back-propagated::

    schedule.prepare_model(model, patterns)      # once, before setup (dropout, forward wrappers)
    schedule.setup(model, patterns, total_steps) # once: builds .optimizer and .lr_scheduler
    schedule.before_training(model, loss_batches, max_grad_norm)   # once, before step 1; not
                                                 # on resume (ChildTuning-D's Fisher pass)

    ...
    schedule.on_step_begin(step)                 # before the first micro-batch of the step
    loss.backward()                              # every micro-batch
    scaler.unscale_(schedule.optimizer)          # fp16 only
    schedule.on_before_clip(step)                # DPS masks .grad here (skipped on fp16 overflow)
    clip_grad_norm_(params, max_norm)            # global clipping
    schedule.on_gradients(step)                  # ChildTuning masks .grad here (skipped on overflow)
    schedule.optimizer.step()                    # via GradScaler under fp16
    schedule.lr_scheduler.step()
    schedule.after_step(step)
    schedule.log_metrics(step)                   # every log interval: dict of floats for W&B

The optimizer's and LR scheduler's state dicts are checkpointed by the loop;
``Schedule.state_dict()`` holds only what a schedule keeps besides them (DPS scores and masks).

``patterns`` are the model's parameter-name patterns per kind (``sage``, ``dps``, ``no_decay``),
which the task supplies for the model it built (``Task.param_patterns``); ``schedule.<kind>_patterns``
overrides them.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable, Mapping, Sequence

import torch

from adaptune.common.errors import ConfigError
from adaptune.common.families import ParamPatterns

from .config import ScheduleConfig, build_schedule_config
from .lr import build_lr_scheduler, warmup_steps
from .param_groups import build_param_groups, strip_names
from .patterns import resolve_patterns

OptimizerFactory = Callable[..., torch.optim.Optimizer]

#: ``schedule.optimizer`` / SAGE base name -> "module:Class". Resolved on use, so the registry is
#: complete in a fresh process whatever was imported before (no registration side effects).
OPTIMIZERS: dict[str, str] = {
    "adamw": "torch.optim:AdamW",
    "adamax": "torch.optim:Adamax",
    "adamw_sage": "adaptune.schedules.sage:AdamWSAGE",
    "adamax_sage": "adaptune.schedules.sage:AdamaxSAGE",
    "adamax_mtdnn": "adaptune.schedules.sage:MTDNNAdamax",  # the SAGE paper's GLUE baseline (MT-DNN's Adamax)
    "adamw_hf": "adaptune.schedules.sage:HFAdamW",  # transformers 4.7's AdamW: the DPS reference's arms
}


def register_optimizer(name: str, target: str | OptimizerFactory) -> None:
    """Make an optimizer buildable by name: ``target`` is a class or a "module:Class" string."""
    OPTIMIZERS[name] = target if isinstance(target, str) else f"{target.__module__}:{target.__qualname__}"


def optimizer_class(name: str) -> OptimizerFactory:
    """The optimizer class registered as ``name``; ConfigError naming the allowed names."""
    if name not in OPTIMIZERS:
        raise ConfigError(f"schedule.optimizer='{name}' is unknown; allowed: {', '.join(sorted(OPTIMIZERS))}")
    module, attr = OPTIMIZERS[name].split(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def implementation(cls: type, impl: str, groups: list[dict]) -> dict[str, bool]:
    """The ``fused`` / ``foreach`` arguments that select ``schedule.impl`` for optimizer ``cls``.

    **(choice)** ``auto``: torch's fused kernel where ``cls`` has one for the parameters' device
    (AdamW on CPU and CUDA), else its multi-tensor ``foreach`` path; an optimizer with its own
    automatic choice and no foreach path (the SAGE optimizers) keeps that choice. Torch's own
    default on CPU is the single-tensor loop, which a profile showed taking ~60% of a MiniLM
    step. All paths compute the same maths (to rounding; ``tests/test_schedules_impl.py``).
    """
    params = inspect.signature(cls).parameters
    has_fused, has_foreach = "fused" in params, "foreach" in params
    if impl == "loop":
        return {**({"fused": False} if has_fused else {}), **({"foreach": False} if has_foreach else {})}
    if impl in ("fused", "foreach") and not (has_fused if impl == "fused" else has_foreach):
        allowed = ["auto"] + [k for k, ok in (("fused", has_fused), ("foreach", has_foreach)) if ok] + ["loop"]
        raise ConfigError(f"schedule.impl={impl}: {cls.__name__} has no {impl} implementation; allowed: {', '.join(allowed)}")
    if impl == "fused":
        return {"fused": True}
    if impl == "foreach":
        return {"foreach": True, **({"fused": False} if has_fused else {})}
    if has_fused and has_foreach:  # auto, a torch optimizer
        from torch.optim.optimizer import _get_fused_kernels_supported_devices

        devices = _get_fused_kernels_supported_devices()
        first = next((p for g in groups for p in g["params"]), None)
        if first is not None and first.device.type in devices and first.is_floating_point():
            return {"fused": True}
        return {"foreach": True}
    return {"foreach": True} if has_foreach else {}


class Schedule:
    """Base class: owns the optimizer and LR scheduler of one run."""

    name = "base"
    #: the schedule's config schema (``schedules/config.py``): exactly the ``schedule.*`` keys it
    #: reads; subclasses set their own (``SCHEDULE_SCHEMAS[name]``)
    schema: type[ScheduleConfig] = ScheduleConfig

    def __init__(self, cfg: ScheduleConfig | Mapping[str, Any]):
        self.cfg = build_schedule_config(cfg, self.schema)
        self._pending_state: dict | None = None  # state loaded before setup() (load_state_dict)
        self.optimizer: torch.optim.Optimizer | None = None
        self.lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self.groups: list[dict] = []

    # ----------------------------------------------------------------- hooks (override)
    def prepare_model(self, model: torch.nn.Module, patterns: ParamPatterns) -> None:
        """Change the model before the optimizer exists (default: nothing)."""

    def setup(self, model: torch.nn.Module, patterns: ParamPatterns, total_steps: int) -> None:
        raise NotImplementedError

    def before_training(
        self, model: torch.nn.Module, loss_batches: Sequence[Callable[[], torch.Tensor]], max_grad_norm: float | None
    ) -> None:
        """Once, after :meth:`setup` and before the first step of a fresh run (default: nothing).

        ``loss_batches``: one zero-argument callable per training batch (one epoch, the task's
        shuffled order for epoch 0, the training batch size; under DDP this rank's shard), each
        running the forward pass on its batch (the model in train mode, the run's autocast) and
        returning the mean loss to back-propagate. ``max_grad_norm``: ``trainer.max_grad_norm``
        (None or 0: no clipping). A resumed run skips this hook: what it computes must be in
        :meth:`state_dict`.
        """

    def on_step_begin(self, step: int) -> None:
        """Before the forward pass of the first micro-batch of optimizer step ``step``."""

    def on_before_clip(self, step: int) -> None:
        """After backward and unscaling, before global clipping (DPS masks here)."""

    def on_gradients(self, step: int) -> None:
        """After backward, unscaling and clipping; before ``optimizer.step()``."""

    def after_step(self, step: int) -> None:
        """After ``optimizer.step()`` and ``lr_scheduler.step()``."""

    def log_metrics(self, step: int) -> dict[str, float]:
        return {}

    def state_owner(self) -> Any:
        """The object holding what this schedule keeps besides the optimizer and LR scheduler (DPS,
        ChildTuning's masks, Mixout's targets), or None (none, or not built yet: :meth:`setup`
        builds it). Subclasses with state override this; the state dict methods below use it."""
        return None

    def state_dict(self) -> dict:
        owner = self.state_owner()
        return owner.state_dict() if owner is not None else {}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state`` into :meth:`state_owner`; state loaded before :meth:`setup` built the
        owner is kept until then (:meth:`restore_pending_state`)."""
        if not state:
            return
        owner = self.state_owner()
        if owner is None:
            self._pending_state = dict(state)
        else:
            owner.load_state_dict(state)

    def restore_pending_state(self) -> None:
        """Called by subclasses at the end of :meth:`setup`, once :meth:`state_owner` exists."""
        pending, self._pending_state = self._pending_state, None
        if pending is not None:
            self.state_owner().load_state_dict(pending)

    # ----------------------------------------------------------------- shared helpers
    def patterns(self, patterns: ParamPatterns, kind: str) -> tuple[str, ...]:
        """``schedule.<kind>_patterns`` from config, or the model's own (``patterns[kind]``, which
        the task supplies for the model it built)."""
        return resolve_patterns(getattr(self.cfg, f"{kind}_patterns"), patterns, kind, f"schedule.{kind}_patterns")

    def param_groups(self, model: torch.nn.Module, patterns: ParamPatterns, flag: str | None = None) -> list[dict]:
        self.groups = build_param_groups(
            model.named_parameters(),
            weight_decay=float(self.cfg.weight_decay),
            no_decay=self.patterns(patterns, "no_decay"),
            flag=flag,
            flag_patterns=self.patterns(patterns, flag) if flag else None,
            flag_key=f"schedule.{flag}_patterns",
        )
        return self.groups

    def make_optimizer(self, name: str, groups: list[dict], **extra) -> torch.optim.Optimizer:
        cls = optimizer_class(name)
        kwargs = {
            "lr": float(self.cfg.lr),
            "betas": tuple(float(b) for b in self.cfg.betas),
            "eps": float(self.cfg.eps),
            **implementation(cls, self.cfg.impl, groups),
            **extra,
        }
        return cls(strip_names(groups), **kwargs)

    def make_lr_scheduler(self, total_steps: int):
        warm = warmup_steps(total_steps, self.cfg.warmup_ratio, self.cfg.warmup_steps)
        return build_lr_scheduler(self.optimizer, self.cfg.lr_schedule, warm, total_steps)
