"""One GPU per parallel job: local parallel sweeps (``hydra/launcher=joblib``, ``submitit_local``)
start several jobs on one machine, and each job's ``trainer.device=auto`` would otherwise be
``cuda`` = GPU 0 for all of them.

In a Hydra multirun, a single-process job whose device resolves to CUDA without an index takes
a GPU lock (``flock`` on ``<lock dir>/gpu<k>.lock``, released by the kernel when the job ends in
any way): first GPU ``job_num mod n_gpus`` if it is free, else any free one, else it waits for
``job_num mod n_gpus``. So job ``k`` runs on its own GPU, and jobs beyond the number of GPUs
queue instead of piling onto one. (choice) Explicit devices (``trainer.device=cuda:1``),
``CUDA_VISIBLE_DEVICES`` set by a cluster launcher to one GPU, DDP ranks (``LOCAL_RANK``) and
single runs are left alone. The lock directory is ``$ADAPTUNE_GPU_LOCK_DIR`` or
``<tempdir>/adaptune-gpu-locks-<uid>`` (one machine's jobs share it).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

log = logging.getLogger("adaptune")

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX
    fcntl = None


def lock_dir() -> Path:
    return Path(os.environ.get("ADAPTUNE_GPU_LOCK_DIR") or Path(tempfile.gettempdir()) / f"adaptune-gpu-locks-{os.getuid()}")


def acquire_gpu(n_gpus: int, preferred: int, directory: Path | None = None, poll: float = 1.0) -> tuple[int, int]:
    """(GPU index, open lock fd): ``preferred`` if free, else any free GPU, else wait for ``preferred``."""
    directory = directory or lock_dir()
    directory.mkdir(parents=True, exist_ok=True)
    order = [preferred % n_gpus] + [i for i in range(n_gpus) if i != preferred % n_gpus]
    waited = False
    while True:
        for index in order:
            fd = os.open(directory / f"gpu{index}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
            return index, fd
        if not waited:
            log.info("all %d GPUs are taken by other jobs of this machine; waiting for one", n_gpus)
            waited = True
        time.sleep(poll)


def job_device(device, job_num: int | None):
    """``device`` for this job: a free GPU of its own when it is an index-less CUDA device of a
    multirun job (``job_num`` not None) in one process; also the lock fd to keep (or None)."""
    import torch

    if (
        fcntl is None
        or job_num is None
        or device.type != "cuda"
        or device.index is not None
        or "LOCAL_RANK" in os.environ
        or int(os.environ.get("WORLD_SIZE", "1")) > 1
    ):
        return device, None
    n_gpus = torch.cuda.device_count()
    if n_gpus < 1:
        return device, None
    index, fd = acquire_gpu(n_gpus, job_num)
    return torch.device(f"cuda:{index}"), fd


def multirun_job_num() -> int | None:
    """The Hydra multirun job number of this process, or None (a single run, or no Hydra)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
            return None
        return int(HydraConfig.get().job.num)
    except Exception:  # noqa: BLE001 - outside a Hydra app (a library call, a test)
        return None
