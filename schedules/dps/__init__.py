"""DPS: dynamic parameter selection (Zhang et al., NeurIPS 2022), as docs/algorithms.md §2 specifies.

Training alternates between phases of ``U = int(T * update_ratio)`` optimizer steps (``T`` the
total number of optimizer steps, or ``schedule.T`` when set: the low-resource protocol's one epoch):
step ``s`` (1-based) is in phase ``k = ceil(s / U)``; odd phases
*explore* (train every entry and score it), even phases *select* (train only the top
``ceil(n * (1 - p))`` entries of each selected weight by score, ``n`` its number of entries;
``p``, the fraction dropped, is the config key ``schedule.drop_p``).

Selected tensors: the weights (2-D) of the ``nn.Linear`` modules whose qualified parameter names
contain one of the model's ``dps`` patterns (the task supplies them, ``adaptune.common.families``; config key
``schedule.dps_patterns``). Biases and every other tensor are trained normally. A pattern list
that matches no Linear weight is a :class:`ConfigError`.

DPS-Dense, per selected weight ``W`` with gradient ``g`` (after the DDP all-reduce and unscaling,
*before* global clipping: the reference masks inside backward, so its clip sees the masked
gradient)::

    exploration step:  G = g*g at the phase's first step, else G += g*g; g unchanged
    selection phase:   first step: tau = value of rank ceil(n(1-p)) of G in descending order,
                       M = (G >= tau)  (ties at tau are all kept); then every step: g *= M

DPS-Mix (Mixout-style): snapshots ``W_pre`` (weights when DPS is built, i.e. the start of
training) and ``W_tgt`` (weights at the first step of each selection phase), and in training mode
replaces the Linear's weight by::

    exploration:  W_eff = ((1-N)·W_pre + N·W - p·W_pre) / (1-p),  N ~ Bernoulli(1-p) per input
                  column (shared by all rows), redrawn every optimizer step; g *= N;
                  G += g²·N; C += N   (G = g²·N, C = N at the phase's first step)
    selection:    score = G / max(C, 1), times exp(-C/U) when U >= 50; M = top ceil(n(1-p)) by
                  score as in Dense; W_eff = ((1-M)·W_tgt + M·W - p·W_tgt) / (1-p); g *= M

Evaluation (``module.eval()``) uses ``W`` itself.

Hooks, in the order the shared loop calls them (``adaptune.schedules.base``): ``on_step_begin(step)``
before the first micro-batch's forward (Mix draws ``N`` here, and both variants enter a new phase
here: Mix needs ``M`` and ``W_tgt`` before the first forward of a selection phase), then
``DPS.on_gradients(step)`` once per optimizer step after all micro-batches were back-propagated
and before global clipping (the runner's ``on_before_clip`` event).
Everything depends on the optimizer-step counter ``step``, never on micro-batches, so gradient
accumulation and DDP (every rank sees the same all-reduced gradient, hence the same mask) are
handled by the loop.

Decisions marked **(choice)** (docs/algorithms.md asks for them to be recorded here):

- **(choice) Forward wrapping for Mix: ``torch.nn.utils.parametrize``.** A parametrization
  replaces every *read* of ``linear.weight``, so it also reaches code that reads the weight
  without calling ``Linear.forward`` (``nn.MultiheadAttention``'s ``out_proj``, fairseq's fused
  attention path calling ``F.multi_head_attention_forward`` with ``q_proj.weight``); replacing
  ``forward`` per instance would miss those silently. The parametrization module returns the raw
  weight when it is in eval mode (``model.eval()`` reaches it: it is a submodule) or before DPS is
  bound to it. Parameter *names* change: ``x.weight`` becomes
  ``x.parametrizations.weight.original`` in ``named_parameters()`` (same ``Parameter`` object, so
  an optimizer built before or after attaching sees the same tensor). ``state_dict()`` keys do
  *not* change: each wrapped Linear carries a state-dict post-hook that writes ``x.weight`` and a
  load pre-hook that accepts ``x.weight`` (and the parametrized key), so checkpoints move freely
  between attached and plain models. DPS itself keys its own state by the plain ``x.weight``
  names. A parametrized model cannot be pickled whole (``torch.save(model)``); save
  ``state_dict()`` (the loop does).
- **Mix's backward is the reference's, not autograd's.** ``((1-N)·R + N·W - p·R)/(1-p)`` is
  computed as ``R + (N·(W - R)) / (1-p)`` (algebraically identical; two full-size ops instead of
  five), with ``R`` = ``W_pre`` or ``W_tgt``, by ``adaptune.schedules.mixing.mix_weight``, whose backward
  returns ``grad(W_eff) ⊙ N`` with no ``1/(1-p)`` factor, as the reference's custom op does
  (true autograd would give selected weights ``1/(1-p)`` = 1.43× larger gradients at p=0.3, and
  global clipping would bite harder). Masking ``g`` by ``N`` in ``on_gradients`` is then a no-op
  kept for exactness (e.g. when a loss term reads ``W`` directly).
- **(choice) Exact keep count.** ``ceil(n·(1-p))`` is computed in rational arithmetic on ``p``'s
  decimal value (``p=0.3`` is 3/10), so that ``n·(1-p)`` landing on an integer is not pushed up
  by binary rounding (``100 * (1 - 0.3)`` would not). ``U`` is ``int(T * update_ratio)`` in
  Python floats, as the reference computes it.
- **(choice) Threshold by ``torch.topk`` of the smaller side** (with p=0.3: the lowest
  ``n - keep + 1`` scores, whose max is ``tau``), unsorted; never a full sort.
  ``bench/bench_dps.py`` times the options on MiniLM's 10.8M selected entries. On this project's
  shared 2-core CPU: 1 thread, kthvalue 163 ms, topk of the dropped side 160 ms, of the kept side
  223 ms; 2 threads, kthvalue 460-690 ms (it gains nothing from threads), dropped-side topk
  150-240 ms; a full sort 2.3-5 s. It runs once per selection phase (every 2U steps).
- **(choice) Memory.** Scores ``G`` are fp32 (fp64 for fp64 weights) and exist only during exploration (freed once the
  selection mask is computed); masks are ``bool`` (1 byte per entry) and exist only during
  selection; Mix counts ``C`` are per input column (``N`` is per column, so ``C`` is the same for
  every row); ``W_tgt`` exists only during selection. The reference keeps two fp32 full copies
  per weight all the time.
- **(choice) Randomness.** Mix draws ``N`` from a CPU ``torch.Generator`` owned by DPS (its
  state is in ``state_dict()``), then moves it to the weights' device: the same seed gives the
  same masks on CPU and GPU and the draws never disturb the global RNG (data order and dropout
  stay identical to a baseline run with the same seed). The default seed is derived from
  ``torch.initial_seed()`` (the run seed after ``torch.manual_seed``) without consuming the
  global generator. :class:`DPSSchedule` broadcasts rank 0's seed under DDP so every rank draws
  the same ``N``.
- **(choice) Robust phase entry.** Phase changes are keyed on the phase index, not on "step is the
  first of its phase": if the first step of a phase is skipped (fp16 overflow: the loop then skips
  ``on_gradients`` and the update, and DPS need not handle inf gradients), the scores are still
  reset at the next processed exploration step. A selection phase whose preceding exploration
  produced no scores at all (every step overflowed) keeps every entry.
- The mask only touches the gradient: the base optimizer's momentum and weight decay still move
  masked entries (reference behaviour, docs/algorithms.md §2).
"""

from .algorithm import DPS, STATE_VERSION
from .helpers import (
    canonical_name,
    check_dps_hparams,
    default_seed,
    disable_dropout,
    keep_count,
    linear_weights,
    phase_length,
    topk_threshold,
)
from ..mixing import MixoutWeight, attach_mix
from .schedule import DPSSchedule

__all__ = [
    "DPS",
    "DPSSchedule",
    "MixoutWeight",
    "STATE_VERSION",
    "attach_mix",
    "canonical_name",
    "check_dps_hparams",
    "default_seed",
    "disable_dropout",
    "keep_count",
    "linear_weights",
    "phase_length",
    "topk_threshold",
]
