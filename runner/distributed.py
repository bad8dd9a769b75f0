"""Data-parallel training with ``torchrun`` (``torch.distributed``); a no-op in one process.

``torchrun --nproc_per_node=N -m adaptune ...`` starts N copies of the app; each takes its share of
every global batch plan (``Task.shard_plan``), gradients are all-reduced by
DistributedDataParallel, and the loop rescales them so that every rank holds the same
``sum of losses / global sample_size`` gradient a single process would compute for the global
batch. Schedules therefore see identical gradients on every rank: SAGE's sensitivity state and
DPS's scores and masks stay identical without extra communication. Rank 0 alone writes
checkpoints, results and W&B logs.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, value: float) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item())

    def any(self, flag: bool) -> bool:
        return self.all_sum(1.0 if flag else 0.0) > 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_gather(self, obj, device: torch.device | None = None) -> list:
        """Every rank's (picklable) ``obj``, in rank order; ``[obj]`` in one process. Under NCCL
        the objects travel through ``device`` (this rank's GPU; else the current CUDA device)."""
        if not self.enabled:
            return [obj]
        gathered: list = [None] * self.world
        on_gpu = device is not None and device.type == "cuda"
        with torch.cuda.device(device) if on_gpu else nullcontext():
            dist.all_gather_object(gathered, obj)
        return gathered


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for key in sorted(obj, key=str):
            yield from _tensors(obj[key])
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)


def fingerprint(*states) -> list[float]:
    """Two float64 sums per tensor (plain and position-weighted) of nested state dicts."""
    out = []
    for t in (t for state in states for t in _tensors(state)):
        flat = t.detach().reshape(-1).to(torch.float64)
        out.append(float(flat.sum()))
        out.append(float((flat * torch.arange(1, flat.numel() + 1, dtype=torch.float64)).sum()))
    return out


def ranks_in_sync(info: DistInfo, *states) -> bool:
    """True when every rank holds bit-identical tensors (compared by fingerprint)."""
    if not info.enabled:
        return True
    mine = fingerprint(*states)
    gathered: list = [None] * info.world
    dist.all_gather_object(gathered, mine)
    return all(g == gathered[0] for g in gathered)


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank=dist.get_rank(), world=dist.get_world_size())
