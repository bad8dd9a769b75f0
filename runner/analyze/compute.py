"""What ``adaptune analyze`` computes per run, cached so that a re-run computes only what is missing.

Cache: ``<dir>/analysis/cache/<run>/`` holds one JSON file per result, written atomically
(:func:`adaptune.runner.checkpoint.atomic_save_json`): ``sensitivity.json`` (per weight: entries, mean
sensitivity, log10 histogram), ``dense.json`` (the unpruned dev metrics) and
``prune_<criterion>_<sparsity>.json``. Each file holds the key it was computed for: the checkpoint's
name, size and modification time and the options that change it (split and batches for sensitivity
scores, the pruning scope, NMT's BLEU cap); a file whose key differs is recomputed.
(choice) The score tensors themselves are not cached (tens of MB per run): when a
sensitivity-pruned point is missing, the scores are recomputed (K backward passes, cheap next to
the evaluations).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .. import checkpoint as ckpt
from . import scores as S
from .load import AnalysedRun, rebuild

CRITERIA = ("sensitivity", "magnitude")


@dataclass
class Options:
    split: str = "dev"
    max_batches: int = 8
    sparsities: tuple[float, ...] = tuple(i / 10 for i in range(10))
    criteria: tuple[str, ...] = CRITERIA
    scope: str = "layer"
    max_sentences: int | None = None
    device: str | None = None


def _read(path: Path, key: dict) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if data.get("key") == key else None


def _sparsity_name(s: float) -> str:
    return f"{s * 100:g}".replace(".", "p")


class RunAnalysis:
    """The cached results of one run; :meth:`missing` lists what is not cached yet, :meth:`compute`
    computes it (building the model only when something is missing)."""

    def __init__(self, run: AnalysedRun, cache_root: Path, opts: Options):
        self.run, self.opts = run, opts
        self.dir = cache_root / run.key
        stamp = run.stamp()
        self.keys = {
            "sensitivity": {**stamp, "split": opts.split, "max_batches": opts.max_batches},
            "dense": {**stamp, "max_sentences": opts.max_sentences},
        }
        for criterion in opts.criteria:
            extra = {"split": opts.split, "max_batches": opts.max_batches} if criterion == "sensitivity" else {}
            for s in opts.sparsities:
                if s > 0:
                    self.keys[f"prune_{criterion}_{_sparsity_name(s)}"] = {
                        **stamp,
                        "criterion": criterion,
                        "sparsity": s,
                        "scope": opts.scope,
                        "max_sentences": opts.max_sentences,
                        **extra,
                    }
        self.results: dict[str, dict] = {}
        for name, key in self.keys.items():
            data = _read(self.dir / f"{name}.json", key)
            if data is not None:
                self.results[name] = data

    def missing(self) -> list[str]:
        return [name for name in self.keys if name not in self.results]

    def evaluations_missing(self) -> int:
        return sum(1 for name in self.missing() if name != "sensitivity")

    def _save(self, name: str, value: dict) -> None:
        data = {"key": self.keys[name], **value}
        ckpt.atomic_save_json(data, self.dir / f"{name}.json")
        self.results[name] = data

    def compute(self, advance: Callable[[], None] = lambda: None) -> None:
        """Compute and cache what is missing; ``advance()`` after each evaluation (progress bar)."""
        todo = self.missing()
        if not todo:
            return
        trainer = rebuild(self.run, self.opts.device, self.opts.max_sentences)
        try:
            self._compute(trainer, todo, advance)
        finally:
            del trainer

    def _compute(self, trainer, todo: list[str], advance) -> None:
        import torch

        from ..precision import autocast_context

        model, task = trainer.model, trainer.task
        weights = S.analysed_weights(model, trainer.patterns["sage"])
        need_sens = "sensitivity" in todo or any(n.startswith("prune_sensitivity_") for n in todo)
        sens = None
        if need_sens:
            sens, used = S.sensitivity(
                task,
                model,
                weights,
                self.opts.split,
                self.opts.max_batches,
                autocast=lambda: autocast_context(trainer.precision, trainer.device),
            )
            if "sensitivity" in todo:
                self._save("sensitivity", {"batches": used, "weights": S.summarize(sens)})
        if "dense" in todo:
            self._save("dense", {"metrics": trainer.evaluate("dev"), "main_metric": task.main_metric})
            advance()
        original = {n: t.detach().clone() for n, t in weights.items()}
        for criterion in self.opts.criteria:
            names = [n for n in todo if n.startswith(f"prune_{criterion}_")]
            if not names:
                continue
            scored = sens if criterion == "sensitivity" else S.magnitude(original)
            orders = S.prune_orders(scored, self.opts.scope)
            for name in names:
                sparsity = self.keys[name]["sparsity"]
                zeroed = S.apply_pruning(weights, orders, sparsity)
                metrics = trainer.evaluate("dev")
                with torch.no_grad():
                    for n, t in weights.items():
                        t.copy_(original[n])
                self._save(name, {"criterion": criterion, "sparsity": sparsity, "zeroed": zeroed, "metrics": metrics})
                advance()

    # ------------------------------------------------------------------ reading results
    def sensitivity(self) -> dict[str, Any] | None:
        return (self.results.get("sensitivity") or {}).get("weights")

    def curve(self, criterion: str) -> list[tuple[float, dict]]:
        """[(sparsity, dev metrics)] of one criterion, 0 (the unpruned model) first."""
        out = []
        if "dense" in self.results:
            out.append((0.0, self.results["dense"]["metrics"]))
        for s in self.opts.sparsities:
            data = self.results.get(f"prune_{criterion}_{_sparsity_name(s)}") if s > 0 else None
            if data is not None:
                out.append((s, data["metrics"]))
        return out
