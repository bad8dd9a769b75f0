"""The one evaluation loop every task goes through (fairseq's ``valid_step`` + ``reduce_metrics``).

:func:`evaluate` asks the task for the plans of a split's evaluation batches, takes this rank's
share (``plans[rank::world]``), builds the batches (in DataLoader workers when ``num_workers``
> 0), moves them to the device, runs ``task.eval_step`` under ``model.eval()``,
``torch.inference_mode()`` and autocast, reduces the partial results of all batches of all ranks
(:func:`reduce_partials`) and lets ``task.finalize`` turn them into metrics. Every rank returns
the same metrics.

Determinism: the partial results are reduced in plan order whatever the number of ranks or
workers (each rank gathers every rank's ``(plan index, partial)`` pairs), so numbers are summed
in the same order as in one process and the metrics are identical (not merely close) as long as
each batch's own results are. Batches depend only on their plan; the loader draws its worker
seeds from a generator of its own, leaving the global RNG untouched.

Outside the runner::

    from adaptune.runner.evaluation import evaluate
    metrics = evaluate(task, model, "dev")          # device: the model's; one process; fp32
"""

from __future__ import annotations

import numbers
from contextlib import nullcontext
from functools import partial
from typing import Any, Callable, ContextManager, Iterable, Iterator, Mapping, Sequence

import torch

from adaptune.tasks.base import Task, move_to

from .batches import batch_source
from .distributed import DistInfo


def eval_batch_source(
    task: Task, split: str, plans: Sequence[Any], num_workers: int = 0, pin_memory: bool = False
) -> Iterator[Any]:
    """The batches of ``plans`` in order, made by ``num_workers`` DataLoader workers or, when it
    is 0, in this process."""
    return batch_source(partial(task.make_eval_batch, split), plans, num_workers, pin_memory)


def _settle(value: Any, where: str) -> Any:
    """A partial result as plain Python data (tensors to numbers / lists), checked for its type."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise TypeError(f"{where}: a tensor partial result must be 0-dim (it is summed), got shape {tuple(value.shape)}")
        return value.item()
    if isinstance(value, numbers.Number):
        return value.item() if hasattr(value, "item") else value  # NumPy scalars -> Python
    if isinstance(value, Mapping):
        return {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in value.items()}
    raise TypeError(
        f"{where}: partial results must be numbers, 0-dim tensors or "
        f"{{example_index: value}} mappings, got {type(value).__name__}"
    )


def reduce_partials(partials: Iterable[tuple[int, Mapping[str, Any]]]) -> dict[str, Any]:
    """Reduce ``(plan index, partial result)`` pairs in plan order: numbers are summed, mappings
    merged (an example index may come from one batch only)."""
    out: dict[str, Any] = {}
    for index, part in sorted(partials, key=lambda p: p[0]):
        for key, value in part.items():
            if isinstance(value, Mapping):
                merged = out.setdefault(key, {})
                if not isinstance(merged, Mapping):
                    raise TypeError(f"partial result '{key}' is a number in one batch, a mapping in another")
                twice = merged.keys() & value.keys()
                if twice:
                    raise ValueError(
                        f"partial result '{key}': example {sorted(twice)[0]!r} occurs in two "
                        f"evaluation batches (the second is plan {index})"
                    )
                merged.update(value)
            else:
                if isinstance(out.get(key), Mapping):
                    raise TypeError(f"partial result '{key}' is a mapping in one batch, a number in another")
                out[key] = out[key] + value if key in out else value
    return out


def evaluate(
    task: Task,
    model: torch.nn.Module,
    split: str = "dev",
    *,
    device: torch.device | None = None,
    autocast: Callable[[], ContextManager] = nullcontext,
    dist: DistInfo | None = None,
    num_workers: int = 0,
) -> dict[str, float]:
    """Metrics of ``model`` on ``split``: this rank evaluates ``plans[rank::world]``, the partial
    results of all ranks are reduced, and every rank returns ``task.finalize``'s metrics.

    ``device``: where batches go (default: the model's first parameter's device);
    ``autocast``: a factory of the context each ``eval_step`` runs in (e.g. bf16 autocast);
    ``dist``: the process group (default: one process); ``num_workers``: DataLoader workers
    building batches ahead (0: in this process). The model's train/eval mode is restored.
    """
    dist = dist or DistInfo()
    if device is None:
        device = next(model.parameters()).device
    plans = task.eval_batches(split)
    mine = range(dist.rank, len(plans), dist.world)
    batches = eval_batch_source(task, split, [plans[i] for i in mine], int(num_workers or 0), pin_memory=device.type == "cuda")
    raw: list[tuple[int, Mapping[str, Any]]] = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for index, batch in zip(mine, batches):
                batch = move_to(batch, device)
                with autocast():
                    raw.append((index, task.eval_step(model, batch)))
    finally:
        model.train(was_training)
    # numbers leave the device only now: no synchronisation per batch
    partials = [
        (index, {k: _settle(v, f"{type(task).__name__}.eval_step()['{k}']") for k, v in part.items()}) for index, part in raw
    ]
    gathered = [pair for rank_pairs in dist.all_gather(partials, device) for pair in rank_pairs]
    metrics = task.finalize(split, reduce_partials(gathered))
    return {k: float(v) for k, v in metrics.items()}
