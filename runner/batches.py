"""Batches from batch plans, made in DataLoader workers or in this process: the training batches
of one epoch (``Task.train_batches(epoch)``, a pure function of seed and epoch, from a position
on, this rank's shard of each) and the evaluation batches (``runner/evaluation.py``).

Batches depend only on their plan, so workers and the main process give the same batches; the
loader draws its worker seeds from a generator of its own, leaving the global RNG (dropout)
untouched, which keeps resume bit-identical.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import torch

from .distributed import DistInfo


class _PlannedBatches(torch.utils.data.Dataset):
    """Batch plans as a dataset, so DataLoader workers can run ``make(plan)`` ahead."""

    def __init__(self, make: Callable[[Any], Any], plans: Sequence[Any]):
        self.make, self.plans = make, plans

    def __len__(self) -> int:
        return len(self.plans)

    def __getitem__(self, i):
        return self.make(self.plans[i])


def _identity(batch):
    return batch


def batch_source(
    make: Callable[[Any], Any], plans: Sequence[Any], num_workers: int = 0, pin_memory: bool = False
) -> Iterator[Any]:
    """``make(plan)`` for each plan in order, by ``num_workers`` DataLoader workers (``make`` must
    pickle: a bound method of the task does) or in this process when it is 0."""
    if num_workers <= 0 or not plans:
        return (make(p) for p in plans)
    loader = torch.utils.data.DataLoader(
        _PlannedBatches(make, plans),
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_identity,
        generator=torch.Generator().manual_seed(0),
        pin_memory=pin_memory,
    )
    return iter(loader)


def train_batch_source(
    task, plans: Sequence[Any], start: int, dist: DistInfo, num_workers: int = 0, pin_memory: bool = False
) -> Iterator[Any]:
    """Batches of ``plans[start:]`` (this rank's shard of each)."""
    local = list(plans[start:])
    if dist.enabled:
        local = [task.shard_plan(p, dist.rank, dist.world) for p in local]
    return batch_source(task.make_batch, local, num_workers, pin_memory)
