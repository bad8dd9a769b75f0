"""Per-layer sensitivity quantiles during training, for every schedule (the baseline as a control).

:class:`SensitivityQuantiles` (``conf/callbacks/default.yaml``: ``callbacks.sensitivity``) logs,
every ``every`` optimizer steps, the quantiles of SAGE's sensitivity ``|θ ⊙ g|`` of each weight the
model's ``sage`` patterns match (the encoder's linear weights; ``g``: the step's final gradient,
after normalisation and clipping) as ``sens/<layer>.<sub-layer>/q10|q50|q90`` and over all those
weights as ``sens/all/q*``, to W&B (``trainer.logger``).

(choice) Cheap enough to stay on (its cost: docs/benchmarks.md): the quantiles are computed on a
fixed random subsample of ``sample`` entries per tensor (drawn with replacement once, at the start
of ``fit``, from a private generator, so the global RNG and thus training are untouched), gathered
with one index per tensor and reduced with one ``torch.quantile`` over all tensors; numbers leave
the device once per log point. (choice) The callback comes after the
schedule's hooks: under DPS, a selection phase's unselected entries have masked (zero) gradients
and count as zero sensitivity, which is what that step trains.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from .callbacks import Callback, _every

if TYPE_CHECKING:  # pragma: no cover
    from .context import RunContext as Trainer

log = logging.getLogger("adaptune")


class SensitivityQuantiles(Callback):
    """Every ``every`` steps (in ``on_gradients``): quantiles ``quantiles`` of ``|θ ⊙ g|`` per analysed
    weight on ``sample`` entries each, logged under ``sens/``."""

    def __init__(self, every: int = 20, sample: int = 1024, quantiles: tuple = (0.1, 0.5, 0.9), seed: int = 0):
        self.every = _every(every)
        self.sample = _every(sample)
        self.quantiles = tuple(float(q) for q in quantiles)
        if not self.quantiles or any(not 0 <= q <= 1 for q in self.quantiles):
            from adaptune.common.errors import ConfigError

            raise ConfigError(f"quantiles must be numbers in [0, 1], got {list(quantiles)!r}")
        self.seed = int(seed)
        self.weights: list[torch.Tensor] = []
        self.labels: list[str] = []
        self.index: list[torch.Tensor] = []
        self._q: torch.Tensor | None = None

    def on_fit_start(self, trainer: Trainer) -> None:
        from .analyze.scores import analysed_weights, layer_of

        patterns = trainer.patterns.get("sage") if hasattr(trainer.patterns, "get") else None
        if not patterns:
            log.warning("sensitivity quantiles: this model declares no 'sage' patterns; not logged")
            self.weights = []
            return
        chosen = analysed_weights(trainer.model, patterns)
        labels = [".".join(layer_of(n)).lstrip("-.") for n in chosen]
        if len(set(labels)) < len(labels):  # names outside the known families: the full names
            labels = [n.removesuffix(".weight") for n in chosen]
        generator = torch.Generator().manual_seed(self.seed)
        self.weights, self.labels = list(chosen.values()), labels
        self.index = [torch.randint(t.numel(), (self.sample,), generator=generator).to(t.device) for t in self.weights]
        device = self.weights[0].device if self.weights else "cpu"
        self._q = torch.tensor(self.quantiles, dtype=torch.float32, device=device)

    def values(self) -> torch.Tensor | None:
        """``(tensors, sample)`` sensitivities of the sampled entries, from the current ``.grad``."""
        rows = []
        for t, idx in zip(self.weights, self.index):
            if t.grad is None:
                rows.append(torch.zeros(idx.numel(), dtype=torch.float32, device=idx.device))
                continue
            flat_t, flat_g = t.detach().reshape(-1), t.grad.reshape(-1)
            rows.append((flat_t.index_select(0, idx).float() * flat_g.index_select(0, idx).float()).abs())
        return torch.stack(rows) if rows else None

    @torch.no_grad()
    def on_gradients(self, trainer: Trainer, step: int) -> None:
        if step % self.every or not self.weights or not trainer.dist.is_main:
            return
        vals = self.values()
        per_layer = torch.quantile(vals, self._q, dim=1)  # (quantiles, tensors)
        overall = torch.quantile(vals.reshape(-1), self._q)  # (quantiles,)
        per_layer, overall = per_layer.tolist(), overall.tolist()
        names = [f"q{round(q * 100):d}" for q in self.quantiles]
        metrics = {f"sens/all/{n}": v for n, v in zip(names, overall)}
        for j, label in enumerate(self.labels):
            metrics.update({f"sens/{label}/{n}": per_layer[i][j] for i, n in enumerate(names)})
        trainer.logger.log(metrics, step=step)
