"""Data-parallel training with ``torchrun`` or a multi-task SLURM job (``torch.distributed``); a
no-op in one process.

``torchrun --nproc_per_node=N -m adaptune ...`` starts N copies of the app; each takes its share of
every global batch plan (``Task.shard_plan``), gradients are all-reduced by
DistributedDataParallel, and the loop rescales them so that every rank holds the same
``sum of losses / global sample_size`` gradient a single process would compute for the global
batch. Schedules therefore see identical gradients on every rank: SAGE's sensitivity state and
DPS's scores and masks stay identical without extra communication. Rank 0 alone writes
checkpoints, results and W&B logs.
"""

from __future__ import annotations

import atexit
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


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list (``node[01-03,07],gpu5``) as host names, in order (what
    ``scontrol show hostnames`` prints, for the forms SLURM writes into ``SLURM_JOB_NODELIST``)."""
    hosts, i = [], 0
    while i < len(nodelist):
        j, depth = i, 0
        while j < len(nodelist) and (nodelist[j] != "," or depth):
            depth += {"[": 1, "]": -1}.get(nodelist[j], 0)
            j += 1
        item = nodelist[i:j]
        i = j + 1
        if "[" not in item:
            hosts.append(item)
            continue
        prefix, _, rest = item.partition("[")
        ranges, _, suffix = rest.partition("]")
        for part in ranges.split(","):
            low, _, high = part.partition("-")
            for n in range(int(low), int(high or low) + 1):
                hosts.append(f"{prefix}{str(n).zfill(len(low))}{suffix}")
    return [h for h in hosts if h]


def slurm_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """The ``torch.distributed`` variables a multi-task SLURM job step implies, or ``{}``.

    The tasks of one ``srun`` step (``SLURM_STEP_NUM_TASKS`` > 1; ``srun python -m adaptune ...``,
    or Hydra's submitit launcher with ``tasks_per_node`` > 1) not started by ``torchrun`` (no
    ``WORLD_SIZE``) are one DDP run: ``RANK`` = ``SLURM_PROCID``, ``WORLD_SIZE`` =
    ``SLURM_STEP_NUM_TASKS``, ``LOCAL_RANK`` = ``SLURM_LOCALID``, ``MASTER_ADDR`` = the first host
    of ``SLURM_STEP_NODELIST`` (else ``SLURM_JOB_NODELIST``), ``MASTER_PORT`` = 15000 + job id mod
    20000 unless set.

    (choice) A batch script's own process (``sbatch --ntasks=N`` running ``python`` without
    ``srun``) carries ``SLURM_NTASKS=N`` and ``SLURM_PROCID=0`` but no step variables: it is one
    process and trains alone (forming an N-rank group would wait forever for ranks that never
    start). A task with a non-zero ``SLURM_PROCID`` and no step variables cannot be placed: a
    one-line ConfigError before training, never a second copy of the run.
    """
    from adaptune.common.errors import ConfigError

    env = os.environ if env is None else env
    if "WORLD_SIZE" in env:
        return {}
    step_tasks = int(env.get("SLURM_STEP_NUM_TASKS", "0") or 0)
    if step_tasks <= 1:
        ntasks = int(env.get("SLURM_NTASKS", "1") or 1)
        if ntasks > 1 and env.get("SLURM_PROCID", "0") != "0":
            raise ConfigError(
                f"SLURM_PROCID={env['SLURM_PROCID']} of SLURM_NTASKS={ntasks} but no SLURM_STEP_NUM_TASKS: "
                "cannot form one DDP run from this job's tasks; start them with srun"
            )
        return {}
    missing = [k for k in ("SLURM_PROCID", "SLURM_LOCALID") if k not in env]
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if missing or not nodelist:
        raise ConfigError(
            f"SLURM_STEP_NUM_TASKS={step_tasks} but {', '.join(missing) or 'SLURM_JOB_NODELIST'} is not "
            "set: cannot form one DDP run from this step's tasks"
        )
    hosts = expand_nodelist(nodelist)
    if not hosts:
        raise ConfigError(f"SLURM_JOB_NODELIST={nodelist!r} names no host")
    port = env.get("MASTER_PORT") or str(15000 + int(env.get("SLURM_JOB_ID", "0") or 0) % 20000)
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": str(step_tasks),
        "LOCAL_RANK": env["SLURM_LOCALID"],
        "MASTER_ADDR": env.get("MASTER_ADDR") or hosts[0],
        "MASTER_PORT": port,
    }


def adopt_slurm_environment() -> None:
    """Export :func:`slurm_environment` (before the run directory is locked and the process group formed)."""
    os.environ.update(slurm_environment())


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group that ``torchrun`` (or a multi-task SLURM job, :func:`slurm_environment`)
    describes in the environment, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        # (choice) one process group per process, kept across the runs of a multirun under torchrun
        # (``adaptune compare --nproc-per-node``): re-forming it after destroy_process_group() reuses
        # the agent store's keys of the first group and hangs; it is destroyed at exit.
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        atexit.register(_destroy)
    return DistInfo(rank=dist.get_rank(), world=dist.get_world_size())
