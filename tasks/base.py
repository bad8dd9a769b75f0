"""The interface every task implements; the shared training loop only talks to this.

A task owns its data and its model (and which of its parameters are which: ``param_patterns``);
the loop owns optimisation, precision, checkpoints and logging. Per run the loop does::

    task = build_task(cfg.task, run_dir=..., seed=cfg.seed)
    task.setup()                                   # read/download data, tokenizer; ConfigError on bad input
    model = task.build_model()                     # after seeding
    plans = task.train_batches(epoch)              # deterministic in (seed, epoch); a Sequence
    for plan in plans[skip:]:                      # skip: batches already done (resume)
        out = task.loss(model, task.make_batch(plan))   # StepLoss(loss_sum, sample_size, n_samples)
        out.loss_sum.backward()                    # the loop divides grads by the step's total sample_size

    # evaluation (runner/evaluation.py), under model.eval() and torch.inference_mode():
    plans = task.eval_batches("dev")               # a Sequence, the same on every rank
    for plan in plans[rank::world]:                # this rank's share; DataLoader workers build batches
        batch = move_to(task.make_eval_batch("dev", plan), device)
        partials.append(task.eval_step(model, batch))   # under autocast
    reduced = reduce(partials of every rank, in plan order)
    metrics = task.finalize("dev", reduced)        # {name: float}, including main_metric

Losses are *sums* over the batch's units (examples, or target tokens for translation) and
``sample_size`` says how many units: the loop normalises once per optimizer step, so gradient
accumulation over micro-batches of different sizes equals one large batch (fairseq's convention).

Evaluation follows fairseq's ``valid_step`` + ``reduce_metrics``: ``eval_step`` returns a dict
of *partial results* of one batch, the evaluator reduces them over all batches of all ranks, and
``finalize`` turns the reduced dict into metrics. The reduction, by the type of each value:

- a number (int, float, or 0-dim tensor): **summed** (in plan order, so the sum does not depend
  on how many ranks or workers ran the batches);
- a mapping ``{example_index: value}`` (predictions, hypotheses): **merged**; an index may occur
  in one batch only. For metrics that need every prediction (Matthews, F1, Pearson, corpus
  BLEU), ``finalize`` reads the merged mapping in sorted key order.

Keys a batch does not return are simply absent from that batch's contribution; ``finalize`` sees
only keys that some batch returned (``reduced.get(key, 0)`` for an empty split).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import torch

from adaptune.common.families import ParamPatterns
from adaptune.common.schema import build


class StepLoss(NamedTuple):
    loss_sum: torch.Tensor  # scalar, summed over the batch's units
    sample_size: float  # number of units the sum runs over (normaliser)
    n_samples: int  # number of examples (for samples/s)


class Task:
    """Base class of tasks. Subclasses set the class attributes and implement the methods."""

    kind = "base"
    #: Key of :meth:`finalize`'s result that selects the best checkpoint.
    main_metric = "loss"
    greater_is_better = True
    #: Whether split ``"test"`` can be evaluated (labelled test split); reported at the end.
    has_test = False
    #: The task's typed config class (``tasks/config.py``); None (a task defined outside this
    #: package without one) keeps ``cfg`` as given.
    schema: type | None = None

    def __init__(self, cfg: Mapping[str, Any], run_dir: Path, seed: int):
        #: the task's typed config, validated; read without fallbacks
        self.cfg = build(self.schema, cfg, "task") if self.schema is not None else cfg
        self.run_dir = Path(run_dir)
        self.seed = int(seed)

    def param_patterns(self, model: torch.nn.Module) -> ParamPatterns:
        """The parameter-name patterns of ``model`` (the one :meth:`build_model` returned) per
        kind, ``sage``, ``dps`` and ``no_decay``, as timm models supply ``no_weight_decay()``:
        the task owns its model, so it says which tensors are its encoder's linear layers.
        Tasks draw on :mod:`adaptune.common.families`; ``schedule.<kind>_patterns`` overrides them."""
        raise NotImplementedError

    def setup(self) -> None:
        """Load data (and tokenizers); raise ``ConfigError`` for user mistakes."""

    def build_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def train_batches(self, epoch: int) -> Sequence[Any]:
        """The epoch's batch plans (e.g. index lists), a pure function of (seed, epoch)."""
        raise NotImplementedError

    def shard_plan(self, plan: Any, rank: int, world: int) -> Any:
        """This rank's part of a global batch plan under data parallelism (default: every
        ``world``-th item of a list-like plan)."""
        return plan[rank::world]

    def make_batch(self, plan: Any) -> Any:
        """Materialise one planned batch (tensors on CPU; the loop moves them)."""
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch: Any) -> StepLoss:
        raise NotImplementedError

    # ------------------------------------------------------------------ evaluation
    # Driven by adaptune.runner.evaluation.evaluate(task, model, split, ...); see the module docstring.
    def eval_batches(self, split: str) -> Sequence[Any]:
        """Plans of the evaluation batches of ``split`` (``dev`` or ``test``), identical on every
        rank; raise ``ConfigError`` for a split the task cannot evaluate."""
        raise NotImplementedError

    def make_eval_batch(self, split: str, plan: Any) -> Any:
        """Materialise one evaluation batch (tensors on CPU; the evaluator moves them). May run in
        a DataLoader worker process: depend only on ``split``, ``plan`` and data loaded in setup."""
        raise NotImplementedError

    def eval_step(self, model: torch.nn.Module, batch: Any) -> dict[str, Any]:
        """Partial results of one batch: numbers (summed) and ``{example_index: value}`` mappings
        (merged); called under ``model.eval()``, ``torch.inference_mode()`` and autocast."""
        raise NotImplementedError

    def finalize(self, split: str, reduced: Mapping[str, Any]) -> dict[str, float]:
        """Metrics of ``split`` from the partial results reduced over all batches and ranks,
        including ``main_metric``."""
        raise NotImplementedError

    def degenerate(self, metrics: Mapping[str, float]) -> str | None:
        """Why the final dev ``metrics`` show a degenerate model (e.g. one class predicted for
        every example), or None. The loop marks such a run in results.json and warns."""
        return None

    def summary(self) -> dict[str, Any]:
        """A few facts for logs and results.json (sizes of splits, labels, ...)."""
        return {}


def move_to(batch: Any, device: torch.device) -> Any:
    """Move tensors in nested dicts/lists/tuples to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch
