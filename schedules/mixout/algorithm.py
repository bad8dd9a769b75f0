"""Mixout on a model's Linear weights (see ``adaptune.schedules.mixout``), usable outside the runner::

mixout = Mixout(model, p=0.9, patterns=family_patterns("bert", "dps"))   # after model.to(device)
... train as usual: every training-mode forward of ``model`` draws a fresh mask
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from adaptune.common.errors import ConfigError

from ..defaults import MIXOUT_P, check_range
from ..linear import linear_weights
from ..mixing import MixoutWeight, attach_mix
from ..sync import default_seed

STATE_VERSION = 1


class Mixout:
    """Mixes the selected Linear weights of ``model`` toward their values at construction.

    Args:
        model: the module whose training-mode forward passes draw a new mask (a forward
            pre-hook; :meth:`remove` takes it off).
        p: mix probability in [0, 1).
        patterns: name substrings selecting Linear weights (None: every trainable Linear).
        wrappers: the parametrizations from :func:`~adaptune.schedules.mixing.attach_mix` when the model
            was prepared earlier (before building the optimizer); None attaches them now.
        seed: the mask generator's seed (default :func:`~adaptune.schedules.sync.default_seed`).
    """

    def __init__(
        self,
        model: nn.Module,
        p: float = MIXOUT_P,
        patterns: Sequence[str] | None = None,
        *,
        wrappers: Mapping[str, MixoutWeight] | None = None,
        seed: int | None = None,
        key: str = "schedule.mixout_patterns",
    ):
        self.p = check_range("p", p, 0, 1)
        if wrappers is None:
            wrappers = attach_mix(model, patterns, key)
        weights = dict(linear_weights(model))
        self.names = list(wrappers)
        self.wrappers = [wrappers[n] for n in self.names]
        self.params = [weights[n] for n in self.names]
        self.targets = [t.detach().clone() for t in self.params]
        self.seed = int(seed) if seed is not None else default_seed()
        self.generator = torch.Generator()
        self.generator.manual_seed(self.seed)
        self.kept = 1.0  # fraction of input columns with N = 1 in the latest draw
        self._hook = model.register_forward_pre_hook(self._before_forward)

    def _before_forward(self, module: nn.Module, args) -> None:
        if module.training:
            self.draw()

    def draw(self) -> list[torch.Tensor]:
        """A fresh ``N`` (bool, ``(1, in)``) for every selected weight, installed in its wrapper."""
        widths = [t.shape[1] for t in self.params]
        keep = torch.rand(sum(widths), generator=self.generator) < (1.0 - self.p)
        masks = []
        for wrapper, target, t, piece in zip(self.wrappers, self.targets, self.params, torch.split(keep, widths)):
            mask = piece.reshape(1, -1).to(t.device, non_blocking=True)
            wrapper.reference, wrapper.mask, wrapper.scale = target, mask, 1.0 / (1.0 - self.p)
            masks.append(mask)
        self.kept = float(keep.sum()) / max(keep.numel(), 1)
        return masks

    def remove(self) -> None:
        """Stop drawing and unbind the wrappers (the weights read as ``W`` again)."""
        self._hook.remove()
        for wrapper in self.wrappers:
            wrapper.reference, wrapper.mask, wrapper.scale = None, None, 1.0

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "p": self.p,
            "names": list(self.names),
            "seed": self.seed,
            "generator": self.generator.get_state(),
            "targets": dict(zip(self.names, self.targets)),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != STATE_VERSION or "targets" not in state:
            raise ConfigError(
                f"the checkpoint's schedule state is not Mixout state (version {STATE_VERSION}); "
                "resume with the schedule it was written with"
            )
        if state["p"] != self.p:
            raise ConfigError(
                f"the checkpoint was written with Mixout p={state['p']!r} (schedule.mix_p), this run "
                f"has {self.p!r}; resume with the same schedule settings"
            )
        if list(state["names"]) != self.names:
            raise ConfigError(
                "the checkpoint's Mixout wrapped a different set of weights than this run's schedule.mixout_patterns select"
            )
        for name, target in zip(self.names, self.targets):
            saved = state["targets"][name]
            if tuple(saved.shape) != tuple(target.shape):
                raise ConfigError(f"Mixout checkpoint: {name} has shape {tuple(saved.shape)}, model has {tuple(target.shape)}")
            target.copy_(saved)
        self.seed = int(state["seed"])
        self.generator.set_state(state["generator"].to("cpu", torch.uint8))
