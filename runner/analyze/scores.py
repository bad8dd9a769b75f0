"""The numbers behind ``adaptune analyze``: which weights, their sensitivity, histograms, pruning.

Weights analysed: the 2-D tensors that the model's ``sage`` patterns match (the encoder's linear
weights, ``Task.param_patterns`` / :mod:`adaptune.common.families`), by their plain names (a DPS-Mix
parametrization's ``...parametrizations.weight.original`` is reported as ``...weight``).

Sensitivity of an entry (SAGE's importance score): ``I = |θ ⊙ ∇L|`` with ``∇L`` the gradient of a
batch's *mean* loss. (choice) It is accumulated as the mean over ``K`` batches of the per-batch
``|θ ⊙ g_b|`` (the sum divided by ``K``), not as ``|θ ⊙ mean g|``: gradients of different batches
cancel in the mean, which would call an entry redundant that matters to every batch in a different
direction; dividing by ``K`` keeps the numbers comparable between ``--max-batches`` values. The
model is in eval mode (no dropout, DPS-Mix unbound), so the scores are deterministic.
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable, Mapping, Sequence

import torch

from adaptune.schedules.linear import canonical_name
from adaptune.schedules.patterns import select_names
from adaptune.tasks.base import Task, move_to

#: histogram of log10(sensitivity): fixed edges, so histograms of runs computed apart can be pooled
LOG_LO, LOG_HI, LOG_STEP = -16.0, 4.0, 0.05
N_BINS = round((LOG_HI - LOG_LO) / LOG_STEP)


def bin_edges() -> list[float]:
    """Edges of the log10 bins: bin ``i`` (1..N_BINS) is ``[edges[i-1], edges[i])``; bin 0 holds zeros
    and values below ``10**LOG_LO``, bin N_BINS+1 values from ``10**LOG_HI``."""
    return [LOG_LO + i * LOG_STEP for i in range(N_BINS + 1)]


def analysed_weights(model: torch.nn.Module, patterns: Sequence[str]) -> dict[str, torch.Tensor]:
    """``{plain name: parameter}`` of the trainable 2-D parameters matched by ``patterns`` (ConfigError
    when none is), in the model's order. (choice) Frozen tensors (e.g. the base weights under LoRA)
    are left out: they have no gradient and no schedule touches them."""
    params = {canonical_name(n): p for n, p in model.named_parameters() if p.dim() == 2 and p.requires_grad}
    chosen = select_names(list(params), list(patterns), "the model's sage patterns")
    return {n: params[n] for n in chosen}


def loss_batch(task: Task, split: str, plan: Any) -> Any | None:
    """A batch of ``split`` that ``task.loss`` accepts, or None for a plan without one.

    (choice) ``train`` uses the training batches of epoch 0 (with their augmentation); ``dev`` and
    ``test`` use the evaluation batches, whose training-format part is the batch itself (ViT), its
    ``inputs`` (GLUE) or its ``sample`` (NMT; BLEU-only plans are skipped).
    """
    if split == "train":
        return task.make_batch(plan)
    batch = task.make_eval_batch(split, plan)
    if isinstance(batch, Mapping):
        if batch.get("loss") is False:
            return None
        for key in ("inputs", "sample"):
            if key in batch:
                return batch[key]
    return batch


def sensitivity(
    task: Task, model: torch.nn.Module, weights: Mapping[str, torch.Tensor], split: str, max_batches: int, autocast=None
) -> tuple[dict[str, torch.Tensor], int]:
    """(``{name: mean over batches of |θ ⊙ ∇L_b|}`` in fp32, number of batches used)."""
    from contextlib import nullcontext

    autocast = autocast or nullcontext
    device = next(iter(weights.values())).device
    plans = task.train_batches(0) if split == "train" else task.eval_batches(split)
    names, tensors = list(weights), list(weights.values())
    acc = [torch.zeros_like(t, dtype=torch.float32) for t in tensors]
    used = 0
    was_training = model.training
    model.eval()
    try:
        for plan in plans:
            if used >= max_batches:
                break
            batch = loss_batch(task, split, plan)
            if batch is None:
                continue
            batch = move_to(batch, device)
            with torch.enable_grad(), autocast():
                out = task.loss(model, batch)
            loss = out.loss_sum.float() / max(float(out.sample_size), 1.0)
            grads = torch.autograd.grad(loss, tensors, allow_unused=True)
            for a, t, g in zip(acc, tensors, grads):
                if g is not None:
                    a.add_((t.detach().float() * g.float()).abs_())
            used += 1
    finally:
        model.train(was_training)
    if used:
        for a in acc:
            a.div_(used)
    return dict(zip(names, acc)), used


def magnitude(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: t.detach().float().abs() for n, t in weights.items()}


# ------------------------------------------------------------------------------ histograms
def histogram(values: torch.Tensor) -> list[int]:
    """Counts of ``values`` in the fixed log10 bins (:func:`bin_edges`), N_BINS + 2 of them; they
    add up to ``values.numel()``."""
    flat = values.detach().reshape(-1).float()
    logs = torch.log10(flat.clamp(min=0))  # 0 -> -inf -> bin 0
    index = torch.floor((logs - LOG_LO) / LOG_STEP) + 1
    index = torch.nan_to_num(index, nan=0.0, neginf=0.0, posinf=float(N_BINS + 1))
    index = index.clamp(0, N_BINS + 1).long()
    return torch.bincount(index.cpu(), minlength=N_BINS + 2).tolist()


def hist_quantile(counts: Sequence[int], q: float) -> float:
    """The ``q`` quantile of a histogram of :func:`histogram` (the upper edge of its bin; 0 in bin 0)."""
    total = sum(counts)
    if not total:
        return float("nan")
    target, run = q * total, 0
    for i, c in enumerate(counts):
        run += c
        if run >= target and c:
            return 0.0 if i == 0 else 10 ** (LOG_LO + min(i, N_BINS) * LOG_STEP)
    return 10**LOG_HI


def fraction_below(counts: Sequence[int], threshold: float) -> float:
    """Fraction of a histogram's entries in bins that lie below ``threshold`` (to bin resolution,
    0.05 decades: a bin counts when its upper edge is at most the threshold; bin 0 always counts)."""
    total = sum(counts)
    if not total or threshold <= 0:
        return 0.0 if total else float("nan")
    upto = math.floor((math.log10(threshold) - LOG_LO) / LOG_STEP + 1e-9)
    upto = max(0, min(upto, N_BINS + 1))
    return sum(counts[: upto + 1]) / total


def summarize(scores: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Per tensor: entries, mean and histogram counts (what the cache keeps of the sensitivity)."""
    return {n: {"numel": s.numel(), "mean": float(s.double().mean()), "hist": histogram(s)} for n, s in scores.items()}


# ------------------------------------------------------------------------------ pruning
def prune_orders(scores: Mapping[str, torch.Tensor], scope: str) -> dict[str, torch.Tensor] | torch.Tensor:
    """The entries ordered from the lowest score up (stable: ties by position): per tensor
    (``scope="layer"``) or over all tensors concatenated (``"global"``)."""
    if scope == "layer":
        return {n: torch.argsort(s.reshape(-1), stable=True) for n, s in scores.items()}
    return torch.argsort(torch.cat([s.reshape(-1) for s in scores.values()]), stable=True)


@torch.no_grad()
def apply_pruning(weights: Mapping[str, torch.Tensor], orders, sparsity: float) -> int:
    """Zero the ``round(sparsity * n)`` lowest-ordered entries (``n`` per tensor, or over all of them
    for a global order); returns how many entries were zeroed."""
    if isinstance(orders, Mapping):
        zeroed = 0
        for name, t in weights.items():
            k = round(sparsity * t.numel())
            t.view(-1)[orders[name][:k].to(t.device)] = 0
            zeroed += k
        return zeroed
    k = round(sparsity * orders.numel())
    chosen = orders[:k]
    offset = 0
    for t in weights.values():
        n = t.numel()
        mine = chosen[(chosen >= offset) & (chosen < offset + n)] - offset
        t.view(-1)[mine.to(t.device)] = 0
        offset += n
    return k


# ------------------------------------------------------------------------------ names
_LAYER = re.compile(r"(?:^|\.)(encoder|decoder)?\.?(?:layers?|blocks|h)\.(\d+)\.")
_SUBLAYERS = (  # (name substring, label), first match wins
    ("attention.self.query", "query"),
    ("attention.self.key", "key"),
    ("attention.self.value", "value"),
    ("query_proj", "query"),
    ("key_proj", "key"),
    ("value_proj", "value"),
    ("attention.output.dense", "attn-out"),
    ("intermediate.dense", "ffn-in"),
    ("output.dense", "ffn-out"),
    ("encoder_attn.q_proj", "x-query"),
    ("encoder_attn.k_proj", "x-key"),
    ("encoder_attn.v_proj", "x-value"),
    ("encoder_attn.out_proj", "x-attn-out"),
    ("q_proj", "query"),
    ("k_proj", "key"),
    ("v_proj", "value"),
    ("out_proj", "attn-out"),
    ("attn.qkv", "qkv"),
    ("attn.proj", "attn-out"),
    ("fc1", "ffn-in"),
    ("fc2", "ffn-out"),
)
SUBLAYER_ORDER = (
    "query",
    "key",
    "value",
    "qkv",
    "attn-out",
    "x-query",
    "x-key",
    "x-value",
    "x-qkv",
    "x-attn-out",
    "ffn-in",
    "ffn-out",
)


def layer_of(name: str) -> tuple[str, str]:
    """(layer, sub-layer) of a weight name: ``bert.encoder.layer.3.attention.self.query.weight`` ->
    ("3", "query"); fairseq's ``decoder.layers.1.encoder_attn.k_proj.weight`` -> ("dec 1", "x-key");
    timm's ``blocks.2.mlp.fc1.weight`` -> ("2", "ffn-in"). (choice) Names that fit none of the known
    families keep their module path: layer "-" and the name without ``.weight``."""
    match = _LAYER.search(name)
    layer = "-"
    if match:
        side = {"encoder": "enc ", "decoder": "dec "}.get(match.group(1) or "", "")
        layer = f"{side}{match.group(2)}"
    sub = next((label for key, label in _SUBLAYERS if key in name), None)
    if sub is None:
        rest = name[match.end() :] if match else name
        sub = rest.removesuffix(".weight")
    return layer, sub


def layer_sort_key(layer: str) -> tuple:
    side, _, index = layer.rpartition(" ")
    return (side, int(index)) if index.isdigit() else (side or layer, 10**9)


def sublayer_sort_key(sub: str) -> tuple:
    return (SUBLAYER_ORDER.index(sub), "") if sub in SUBLAYER_ORDER else (len(SUBLAYER_ORDER), sub)


def pool(hists: Iterable[Sequence[int]]) -> list[int]:
    out = [0] * (N_BINS + 2)
    for h in hists:
        for i, c in enumerate(h):
            out[i] += c
    return out
