"""Official GLUE metrics, computed with scikit-learn and SciPy."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def accuracy(labels: Sequence[int], preds: Sequence[int]) -> float:
    labels, preds = np.asarray(labels), np.asarray(preds)
    return float((labels == preds).mean()) if len(labels) else 0.0


def f1(labels: Sequence[int], preds: Sequence[int]) -> float:
    """Binary F1 of the positive class (label 1), as GLUE scores MRPC and QQP."""
    from sklearn.metrics import f1_score

    return float(f1_score(labels, preds, pos_label=1, average="binary", zero_division=0))


def matthews(labels: Sequence[int], preds: Sequence[int]) -> float:
    from sklearn.metrics import matthews_corrcoef

    return float(matthews_corrcoef(labels, preds))


def pearson(labels: Sequence[float], preds: Sequence[float]) -> float:
    from scipy.stats import pearsonr

    if np.std(preds) == 0 or np.std(labels) == 0:
        return 0.0
    return float(pearsonr(preds, labels)[0])


def spearman(labels: Sequence[float], preds: Sequence[float]) -> float:
    from scipy.stats import spearmanr

    if np.std(preds) == 0 or np.std(labels) == 0:
        return 0.0
    return float(spearmanr(preds, labels)[0])


METRICS = {"accuracy": accuracy, "f1": f1, "matthews": matthews, "pearson": pearson, "spearman": spearman}


def compute(names: Sequence[str], labels, preds) -> dict[str, float]:
    return {name: METRICS[name](labels, preds) for name in names}
