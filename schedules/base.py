"""The interface every schedule implements, and the pieces schedules share.

The training loop (``runner/loop.py``) drives a schedule like this, once per optimizer step
``step`` (1-based), after all micro-batches of the step have been back-propagated::

    schedule.prepare_model(model, family)        # once, before setup (dropout, forward wrappers)
    schedule.setup(model, family, total_steps)   # once: builds .optimizer and .lr_scheduler
    ...
    schedule.on_step_begin(step)                 # before the first micro-batch of the step
    loss.backward()                              # every micro-batch
    scaler.unscale_(schedule.optimizer)          # fp16 only
    clip_grad_norm_(params, max_norm)            # global clipping
    schedule.on_gradients(step)                  # DPS masks .grad here (skipped on fp16 overflow)
    schedule.optimizer.step()                    # via GradScaler under fp16
    schedule.lr_scheduler.step()
    schedule.after_step(step)
    schedule.log_metrics(step)                   # every log interval: dict of floats for W&B

The optimizer's and LR scheduler's state dicts are checkpointed by the loop;
``Schedule.state_dict()`` holds only what a schedule keeps besides them (DPS scores and masks).
"""
from __future__ import annotations

import importlib
import logging
from typing import Any, Callable, Mapping

import torch

from common.errors import ConfigError
from .lr import build_lr_scheduler, warmup_steps
from .param_groups import build_param_groups, strip_names
from .patterns import family_patterns

log = logging.getLogger(__name__)

OptimizerFactory = Callable[..., torch.optim.Optimizer]

#: ``schedule.optimizer`` / SAGE base name -> "module:Class". Resolved on use, so the registry is
#: complete in a fresh process whatever was imported before (no registration side effects).
OPTIMIZERS: dict[str, str] = {
    "adamw": "torch.optim:AdamW",
    "adamax": "torch.optim:Adamax",
    "adamw_sage": "schedules.sage:AdamWSAGE",
    "adamax_sage": "schedules.sage:AdamaxSAGE",
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


def check_hparams(cfg: Mapping[str, Any], prefix: str = "schedule") -> None:
    """Range checks shared by every schedule; raises ConfigError naming the key."""
    lr = cfg.get("lr")
    if not isinstance(lr, (int, float)) or lr < 0:
        raise ConfigError(f"{prefix}.lr must be a number >= 0, got {lr!r}")
    betas = cfg.get("betas")
    if betas is not None:
        if len(betas) != 2 or any(not (0.0 <= float(b) < 1.0) for b in betas):
            raise ConfigError(f"{prefix}.betas must be two numbers in [0, 1), got {list(betas)}")
    for key in ("eps", "weight_decay"):
        value = cfg.get(key)
        if value is not None and (not isinstance(value, (int, float)) or value < 0):
            raise ConfigError(f"{prefix}.{key} must be a number >= 0, got {value!r}")
    clip = cfg.get("max_grad_norm")
    if clip is not None and clip <= 0:
        raise ConfigError(f"{prefix}.max_grad_norm must be > 0 or null, got {clip!r}")


class Schedule:
    """Base class: owns the optimizer and LR scheduler of one run."""

    name = "base"
    #: the ``schedule.*`` keys this schedule reads; subclasses add theirs. Other keys are reported
    #: once and ignored: an experiment preset made for one schedule (``experiment=dps_glue``) sets
    #: that schedule's keys, and a sweep over ``schedule=baseline,dps`` carries them to all.
    config_keys: frozenset[str] = frozenset({
        "name", "label", "lr", "betas", "eps", "weight_decay", "max_grad_norm", "lr_schedule",
        "warmup_ratio", "warmup_steps", "no_decay_patterns"})

    def __init__(self, cfg: Mapping[str, Any]):
        self.cfg = dict(cfg)
        check_hparams(self.cfg)
        self.ignored_keys = sorted(set(self.cfg) - self.config_keys)
        if self.ignored_keys:
            log.warning("schedule=%s ignores %s: not among its settings (e.g. set by a preset "
                        "written for another schedule)", self.cfg.get("label") or self.cfg.get("name"),
                        ", ".join(f"schedule.{k}" for k in self.ignored_keys))
        self.optimizer: torch.optim.Optimizer | None = None
        self.lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self.groups: list[dict] = []

    # ----------------------------------------------------------------- hooks (override)
    def prepare_model(self, model: torch.nn.Module, family: str) -> None:
        """Change the model before the optimizer exists (default: nothing)."""

    def setup(self, model: torch.nn.Module, family: str, total_steps: int) -> None:
        raise NotImplementedError

    def on_step_begin(self, step: int) -> None:
        """Before the forward pass of the first micro-batch of optimizer step ``step``."""

    def on_gradients(self, step: int) -> None:
        """After backward, unscaling and clipping; before ``optimizer.step()``."""

    def after_step(self, step: int) -> None:
        """After ``optimizer.step()`` and ``lr_scheduler.step()``."""

    def log_metrics(self, step: int) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    # ----------------------------------------------------------------- shared helpers
    def patterns(self, family: str, kind: str) -> tuple[str, ...]:
        """``schedule.<kind>_patterns`` from config, or the model family's default."""
        explicit = self.cfg.get(f"{kind}_patterns")
        return tuple(explicit) if explicit else family_patterns(family, kind)

    def param_groups(self, model: torch.nn.Module, family: str, flag: str | None = None) -> list[dict]:
        self.groups = build_param_groups(
            model.named_parameters(),
            weight_decay=float(self.cfg.get("weight_decay") or 0.0),
            no_decay=self.patterns(family, "no_decay"),
            flag=flag,
            flag_patterns=self.patterns(family, flag) if flag else None,
            flag_key=f"schedule.{flag}_patterns",
        )
        return self.groups

    def make_optimizer(self, name: str, groups: list[dict], **extra) -> torch.optim.Optimizer:
        cls = optimizer_class(name)
        kwargs = {"lr": float(self.cfg["lr"])}
        if self.cfg.get("betas") is not None:
            kwargs["betas"] = tuple(float(b) for b in self.cfg["betas"])
        if self.cfg.get("eps") is not None:
            kwargs["eps"] = float(self.cfg["eps"])
        kwargs.update(extra)
        return cls(strip_names(groups), **kwargs)

    def make_lr_scheduler(self, total_steps: int):
        warm = warmup_steps(total_steps, self.cfg.get("warmup_ratio"), self.cfg.get("warmup_steps"))
        return build_lr_scheduler(self.optimizer, self.cfg.get("lr_schedule", "linear"), warm, total_steps)
