"""How the report shows a metric: fractions (accuracy, F1, correlations, top-k) x 100, the rest
(BLEU, losses) as they are."""

from __future__ import annotations

_FRACTIONS = ("accuracy", "f1", "matthews", "pearson", "spearman", "top1", "top5")


def scale(metric: str) -> float:
    """The factor the report multiplies ``metric`` by (100 for fractions, else 1)."""
    return 100.0 if metric.split("_")[0] in _FRACTIONS else 1.0
