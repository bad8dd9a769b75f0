"""The interface every task implements; the shared training loop only talks to this.

A task owns its data and model family; the loop owns optimisation, precision, checkpoints and
logging. Per run the loop does::

    task = build_task(cfg.task, run_dir=..., seed=cfg.seed)
    task.setup()                                   # read/download data, tokenizer; ConfigError on bad input
    model = task.build_model()                     # after seeding
    plans = task.train_batches(epoch)              # deterministic in (seed, epoch); a Sequence
    for plan in plans[skip:]:                      # skip: batches already done (resume)
        out = task.loss(model, task.make_batch(plan))   # StepLoss(loss_sum, sample_size, n_samples)
        out.loss_sum.backward()                    # the loop divides grads by the step's total sample_size
    metrics = task.evaluate(model, "dev")          # under model.eval() and torch.inference_mode()

Losses are *sums* over the batch's units (examples, or target tokens for translation) and
``sample_size`` says how many units: the loop normalises once per optimizer step, so gradient
accumulation over micro-batches of different sizes equals one large batch (fairseq's convention).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import torch


class StepLoss(NamedTuple):
    loss_sum: torch.Tensor   # scalar, summed over the batch's units
    sample_size: float       # number of units the sum runs over (normaliser)
    n_samples: int           # number of examples (for samples/s)


class Task:
    """Base class of tasks. Subclasses set the class attributes and implement the methods."""

    kind = "base"
    #: Key of :meth:`evaluate`'s result that selects the best checkpoint.
    main_metric = "loss"
    greater_is_better = True
    #: Whether ``evaluate(model, "test")`` works (labelled test split); reported at the end.
    has_test = False

    def __init__(self, cfg: Mapping[str, Any], run_dir: Path, seed: int):
        self.cfg = dict(cfg)
        self.run_dir = Path(run_dir)
        self.seed = int(seed)

    @property
    def family(self) -> str:
        """Model family for schedule name patterns (see ``schedules.patterns``)."""
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

    def evaluate(self, model: torch.nn.Module, split: str = "dev") -> dict[str, float]:
        """Metrics on ``split`` (``dev`` or ``test``), including ``main_metric``."""
        raise NotImplementedError

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
