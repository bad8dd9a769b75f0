"""One value for every DDP rank: a schedule's seed and its one-off decisions (masks) come from rank 0.

Without ``torch.distributed`` initialised both are the identity. NCCL needs CUDA tensors, gloo CPU
ones; the tensors are moved for the collective and copied back.
"""

from __future__ import annotations

from typing import Sequence

import torch

_SEED_SALT = 0x5DEECE66D  # keeps a schedule's stream distinct from the global generator's


def default_seed() -> int:
    """A seed that follows the run seed (``torch.initial_seed()``) without drawing from it."""
    return (torch.initial_seed() ^ _SEED_SALT) % (2**63 - 1)


def _initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _collective_device() -> torch.device:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shared_seed() -> int:
    """:func:`default_seed` (follows the run seed without drawing from the
    global generator), rank 0's value on every rank."""
    seed = default_seed()
    if _initialized():
        import torch.distributed as dist

        value = torch.tensor([seed], dtype=torch.int64, device=_collective_device())
        dist.broadcast(value, src=0)
        seed = int(value.item())
    return seed


def broadcast_from_rank0(tensors: Sequence[torch.Tensor]) -> None:
    """Overwrite ``tensors`` in place with rank 0's values (bool tensors travel as uint8)."""
    if not _initialized():
        return
    import torch.distributed as dist

    device = _collective_device()
    for t in tensors:
        buf = t.to(device=device, dtype=torch.uint8 if t.dtype == torch.bool else t.dtype, copy=True)
        dist.broadcast(buf, src=0)
        t.copy_(buf.to(device=t.device, dtype=t.dtype))
