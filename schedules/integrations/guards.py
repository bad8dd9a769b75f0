"""Checks shared by the DPS integrations (no framework imports)."""

from __future__ import annotations

from typing import Any

import torch

from adaptune.common.errors import ConfigError


def refuse_sharded(model: torch.nn.Module, args: Any = None, where: str = "DPSCallback", reason: str | None = None) -> None:
    """ConfigError when DeepSpeed / FSDP shard or flatten the parameters DPS must see whole
    (``args``: Trainer arguments with ``deepspeed`` / ``fsdp``; ``reason``: already known)."""
    if reason is None and args is not None and getattr(args, "deepspeed", None):
        reason = "DeepSpeed"
    elif reason is None and args is not None and getattr(args, "fsdp", None):
        reason = "FSDP"
    if reason is None:
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # pragma: no cover
            DTensor = ()
        for p in model.parameters():
            if isinstance(p, DTensor) or getattr(p, "_fsdp_flattened", False) or hasattr(p, "ds_id"):
                reason = "sharded (DTensor / FSDP / DeepSpeed ZeRO) parameters"
                break
    if reason:
        raise ConfigError(
            f"{where}: {reason} shard or flatten weights and gradients, so DPS cannot score and "
            "mask whole weight matrices; train with DDP or on one device"
        )


def grads_overflowed(model: torch.nn.Module, scaler: Any) -> bool:
    """Whether an fp16 GradScaler is active and this step's (unscaled) gradients are not finite,
    so the scaler will skip the step. Costs one norm over the gradients, under fp16 only."""
    if scaler is None or not scaler.is_enabled():
        return False
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return bool(grads) and not bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))
