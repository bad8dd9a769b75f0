"""The training batches of one epoch: batch plans (``Task.train_batches(epoch)``, a pure function
of seed and epoch) from a position on, this rank's shard of each, made into batches in
DataLoader workers or in this process."""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch

from .distributed import DistInfo


class _PlannedBatches(torch.utils.data.Dataset):
    """Batch plans as a dataset, so DataLoader workers can run ``task.make_batch`` ahead."""

    def __init__(self, task, plans):
        self.task, self.plans = task, plans

    def __len__(self) -> int:
        return len(self.plans)

    def __getitem__(self, i):
        return self.task.make_batch(self.plans[i])


def _identity(batch):
    return batch


def train_batch_source(task, plans: Sequence[Any], start: int, dist: DistInfo, num_workers: int = 0,
                       pin_memory: bool = False) -> Iterator[Any]:
    """Batches of ``plans[start:]`` (this rank's shard), made ahead by ``num_workers`` DataLoader
    workers, or in this process when it is 0. Batches depend only on their plan, so both give
    the same batches; the loader draws its worker seeds from a generator of its own, leaving the
    global RNG (dropout) untouched, which keeps resume bit-identical."""
    local = list(plans[start:])
    if dist.enabled:
        local = [task.shard_plan(p, dist.rank, dist.world) for p in local]
    if num_workers == 0:
        return (task.make_batch(p) for p in local)
    loader = torch.utils.data.DataLoader(
        _PlannedBatches(task, local), batch_size=None, shuffle=False, num_workers=num_workers,
        collate_fn=_identity, generator=torch.Generator().manual_seed(0), pin_memory=pin_memory)
    return iter(loader)
