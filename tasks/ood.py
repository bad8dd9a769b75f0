"""The DPS paper's out-of-domain protocol: a 3-way NLI model (trained on MNLI or SNLI) evaluated
at the end of the run on several named test sets (``task.ood``; see ``tasks/nli_data.py``).

The reference (github.com/ZhangHaojie077/DPS, ``script/run_out_of_domain.sh`` + ``metric.py``):
train on an 8,000-example stratified subset of MNLI or SNLI for 1,500 steps, then evaluate the
3-way model on MNLI, SNLI, SICK, SciTail and RTE:

- 3-way sets (MNLI, SNLI, SICK): plain accuracy; SICK's ENTAILMENT / NEUTRAL / CONTRADICTION are
  MNLI's three classes (``script/sick.py`` lower-cases them onto MNLI's label order, ``metric.py``
  scores SICK with plain accuracy);
- 2-way sets (SciTail: entails / neutral; RTE: entailment / not_entailment): a prediction of
  contradiction counts as not entailment (``metric.py``'s ``simple_map_accuracy``: predicted 2
  becomes 1), so neutral or contradiction -> not entailment, then accuracy.

Metrics go into results.json's ``test`` block named ``<set>/<metric>`` (``snli/accuracy``, logged
as ``test/snli/accuracy``), with ``<set>/loss`` and the predicted-class fractions of the 3-way
predictions (``scitail/pred_frac_contradiction``).

**(choice)** The loss on a 2-way set is the negative log-likelihood of the collapsed distribution
(p(entailment) vs p(neutral) + p(contradiction)); the reference reports none.

**(choice)** ``task.ood.split=dev`` (the default) evaluates each set's dev split, as the reference
script does (it runs ``--do_eval``, which reads ``validation``: SNLI dev, SICK TRIAL, SciTail
dev); ``test`` reads SNLI / SICK / SciTail test. MNLI (matched) and RTE are always the GLUE dev
sets (GLUE's test labels are not public).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from adaptune.common.errors import ConfigError

from .glue_data import Example
from .nli_data import DIRECTORY_OF, NLI_LABELS, SETS, load_set

#: names of the OOD sets' eval entries end with this: ``"snli/"`` (see :func:`metric_key`)
SEPARATOR = "/"


def metric_key(metric: str, suffix: str) -> str:
    """The result name of ``metric`` on an eval set: ``accuracy_m`` (MNLI's dev suffix) or, for a
    named OOD set (suffix ``"snli/"``), ``snli/accuracy``."""
    return f"{suffix}{metric}" if suffix.endswith(SEPARATOR) else f"{metric}{suffix}"


def check_training_labels(labels: Sequence[str] | None, task_name: str) -> None:
    """OOD sets need a model with MNLI's three classes in MNLI's order."""
    if tuple(labels or ()) != NLI_LABELS:
        raise ConfigError(f"task.ood.sets needs a 3-way NLI training set (task.name=mnli or snli), not task.name={task_name}")


def load_sets(ood_cfg: Any, task_name: str, data_dir: str | None) -> list[tuple[list[Example], str, bool]]:
    """``[(examples, suffix, two_way)]`` of ``task.ood.sets`` in order. A set's directory is
    ``task.ood.data_dirs.<name>``; for the training set's own dataset, ``task.data_dir`` when that
    is null; else the hub."""
    out = []
    for name in ood_cfg.sets:
        home = DIRECTORY_OF.get(name, name)  # mnli_mm: MNLI's directory
        directory = getattr(ood_cfg.data_dirs, home)
        key = f"task.ood.data_dirs.{home}"
        if directory is None and home == task_name and data_dir:
            directory, key = data_dir, "task.data_dir"
        examples = load_set(name, directory, ood_cfg.split, key)
        out.append((examples, f"{name}{SEPARATOR}", SETS[name].two_way))
    return out


def to_two_way(predictions: Sequence[int]) -> list[int]:
    """3-way predictions scored on a 2-way set: entailment stays 0, neutral and contradiction
    become 1 (not entailment)."""
    return [0 if int(p) == 0 else 1 for p in predictions]


def two_way_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed NLL of 2-way labels (0 entailment, 1 not) under the 3-way model's collapsed
    distribution: log p(not) = logsumexp(neutral, contradiction) - logsumexp(all)."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    collapsed = torch.stack([log_p[:, 0], torch.logsumexp(log_p[:, 1:], dim=-1)], dim=-1)
    return -collapsed.gather(1, labels.long().view(-1, 1)).sum()
