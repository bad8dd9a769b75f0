"""DPS: dynamic parameter selection (Zhang et al., NeurIPS 2022), as ALGORITHMS.md §2 specifies.

Training alternates between phases of ``U = int(T * update_ratio)`` optimizer steps (``T`` the
total number of optimizer steps): step ``s`` (1-based) is in phase ``k = ceil(s / U)``; odd phases
*explore* (train every entry and score it), even phases *select* (train only the top
``ceil(n * (1 - p))`` entries of each selected weight by score, ``n`` its number of entries).

Selected tensors: the weights (2-D) of the ``nn.Linear`` modules whose qualified parameter names
contain one of the model family's ``dps`` patterns (``schedules.patterns``; config key
``schedule.dps_patterns``). Biases and every other tensor are trained normally. A pattern list
that matches no Linear weight is a :class:`ConfigError`.

DPS-Dense, per selected weight ``W`` with gradient ``g`` (what the optimizer will use: after the
DDP all-reduce, unscaling and global clipping)::

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

Hooks, in the order the shared loop calls them (``schedules.base``): ``on_step_begin(step)``
before the first micro-batch's forward (Mix draws ``N`` here, and both variants enter a new phase
here: Mix needs ``M`` and ``W_tgt`` before the first forward of a selection phase), then
``on_gradients(step)`` once per optimizer step after all micro-batches were back-propagated.
Everything depends on the optimizer-step counter ``step``, never on micro-batches, so gradient
accumulation and DDP (every rank sees the same all-reduced gradient, hence the same mask) are
handled by the loop.

Decisions marked **(choice)** (ALGORITHMS.md asks for them to be recorded here):

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
- **(choice) Cheaper but equal Mix formula.** ``((1-N)·R + N·W - p·R)/(1-p)`` is computed as
  ``R + (N·(W - R)) / (1-p)`` (algebraically identical; two full-size ops instead of five), with
  ``R`` = ``W_pre`` or ``W_tgt``. The gradient reaching ``W`` is then ``N/(1-p)`` times the
  gradient of ``W_eff``; masking ``g`` by ``N`` in ``on_gradients`` is therefore a no-op kept for
  exactness (e.g. when a loss term reads ``W`` directly). The constant ``1/(1-p)`` factor in
  ``G`` does not change any ranking.
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
  masked entries (reference behaviour, ALGORITHMS.md §2).
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from .baseline import BaselineSchedule
from common.errors import ConfigError
from .patterns import select_names

VARIANTS = ("dense", "mix")
STATE_VERSION = 1
_PARAMETRIZED_SUFFIX = "parametrizations.weight.original"
_SEED_SALT = 0x5DEECE66D  # keeps the DPS stream distinct from the global generator's


# ---------------------------------------------------------------------------- small helpers
def check_dps_hparams(p: Any, update_ratio: Any, variant: Any, prefix: str = "schedule") -> None:
    """Range checks for DPS hyper-parameters; raises a one-line ConfigError naming the key."""
    def is_number(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    if not is_number(p) or not 0.0 <= float(p) < 1.0:
        raise ConfigError(
            f"{prefix}.p must be a number in [0, 1) (fraction of entries dropped in a selection phase), got {p!r}")
    if not is_number(update_ratio) or not 0.0 < float(update_ratio) <= 1.0:
        raise ConfigError(
            f"{prefix}.update_ratio must be a number in (0, 1] (phase length / total steps), got {update_ratio!r}")
    if variant not in VARIANTS:
        raise ConfigError(f"{prefix}.variant={variant!r} is unknown; allowed: {', '.join(VARIANTS)}")


def phase_length(total_steps: int, update_ratio: float, prefix: str = "schedule") -> int:
    """``U = int(T * update_ratio)``; ``U < 1`` is a ConfigError naming both values."""
    length = int(total_steps * update_ratio)
    if length < 1:
        raise ConfigError(
            f"DPS phase length int(total_steps * {prefix}.update_ratio) = int({total_steps} * {update_ratio}) "
            f"= {length} < 1; raise {prefix}.update_ratio or the number of training steps")
    return length


def keep_count(numel: int, p: float) -> int:
    """``ceil(numel * (1 - p))`` in exact arithmetic on p's decimal value (see module docstring)."""
    return math.ceil(numel * (1 - Fraction(repr(float(p)))))


def topk_threshold(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """The value of rank ``keep`` in ``scores`` sorted descending (a 0-d tensor).

    ``scores >= result`` keeps at least ``keep`` entries (exactly ``keep`` without ties at the
    threshold; ties are all kept).
    """
    flat = scores.reshape(-1)
    dropped = flat.numel() - keep + 1          # the threshold is also the max of the lowest `dropped`
    if keep <= dropped:
        return torch.topk(flat, keep, sorted=False).values.min()
    return torch.topk(flat, dropped, largest=False, sorted=False).values.max()


def canonical_name(name: str) -> str:
    """``a.b.parametrizations.weight.original`` -> ``a.b.weight`` (other names unchanged)."""
    if name == _PARAMETRIZED_SUFFIX:
        return "weight"
    if name.endswith("." + _PARAMETRIZED_SUFFIX):
        return name[: -len(_PARAMETRIZED_SUFFIX)] + "weight"
    return name


def linear_weights(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, weight)`` of every ``nn.Linear`` in ``model`` (plain names, also when parametrized)."""
    out = []
    for mod_name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if parametrize.is_parametrized(module, "weight"):
            weight = module.parametrizations.weight.original
        else:
            weight = module.weight
        out.append((f"{mod_name}.weight" if mod_name else "weight", weight))
    return out


def default_seed() -> int:
    """A seed that follows the run seed (``torch.initial_seed()``) without drawing from it."""
    return (torch.initial_seed() ^ _SEED_SALT) % (2**63 - 1)


def disable_dropout(model: nn.Module) -> int:
    """Set every dropout probability in ``model`` to 0 (the DPS preset); returns how many were set.

    Covers ``nn.Dropout*`` modules, any module whose class name contains ``Dropout`` with a float
    ``p`` (fairseq's ``FairseqDropout``, ...), float attributes whose name contains ``dropout``
    (e.g. ``attention_dropout`` read at forward time by some Hugging Face attention classes), and
    the float ``*dropout*`` entries of a Hugging Face ``model.config`` (for code that reads the
    config at forward time). Transformers 5's BERT self-attention reads ``self.dropout.p`` at
    every forward, so zeroing the module is enough there; tests/test_dps.py checks that two
    training-mode forwards agree. Stochastic depth (timm ``DropPath``) is not dropout and is left.
    """
    changed = 0
    for module in model.modules():
        is_dropout = isinstance(module, nn.modules.dropout._DropoutNd) or (
            "Dropout" in type(module).__name__ and isinstance(getattr(module, "p", None), float))
        if is_dropout and module.p != 0.0:
            module.p = 0.0
            changed += 1
        for attr, value in list(vars(module).items()):
            if "dropout" in attr.lower() and isinstance(value, float) and value != 0.0:
                setattr(module, attr, 0.0)
                changed += 1
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        for key, value in config.to_dict().items():
            if "dropout" in key.lower() and isinstance(value, float) and value != 0.0:
                setattr(config, key, 0.0)
                changed += 1
    return changed


# ---------------------------------------------------------------------------- DPS-Mix forward
class MixoutWeight(nn.Module):
    """Parametrization of one Linear's ``weight`` under DPS-Mix (see module docstring).

    Holds no parameters or buffers (nothing enters the model's state dict): ``reference``
    (``W_pre`` or ``W_tgt``), ``mask`` (bool, ``(1, in)`` or ``(out, in)``) and ``scale``
    (``1/(1-p)``) are plain attributes that :class:`DPS` sets before every optimizer step.
    Unbound (``reference is None``) or in eval mode it returns the raw weight.
    """

    def __init__(self):
        super().__init__()
        self.reference: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        self.scale: float = 1.0

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.training or self.reference is None:
            return weight
        ref = self.reference
        return torch.add(ref, (weight - ref) * self.mask, alpha=self.scale)


def _state_dict_post_hook(module, state_dict, prefix, local_metadata):
    key = prefix + _PARAMETRIZED_SUFFIX
    if key in state_dict:
        state_dict[prefix + "weight"] = state_dict.pop(key)


def _load_pre_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                   error_msgs):
    plain, wrapped = prefix + "weight", prefix + _PARAMETRIZED_SUFFIX
    if plain in state_dict and wrapped not in state_dict:
        state_dict[wrapped] = state_dict.pop(plain)


def attach_mix(model: nn.Module, patterns: Sequence[str] | None = None,
               key: str = "schedule.dps_patterns") -> dict[str, MixoutWeight]:
    """Wrap the weight of every selected ``nn.Linear`` of ``model`` for DPS-Mix (idempotent).

    Returns ``{plain weight name: MixoutWeight}``, to pass as ``DPS(..., mix=...)``. ``patterns``
    None selects every Linear. Until a :class:`DPS` binds them the wrappers are the identity.
    """
    names = [n for n, w in linear_weights(model) if w.requires_grad]
    chosen = select_names(names, list(patterns), key) if patterns is not None else names
    if not chosen:
        raise ConfigError(f"{key}: this model has no trainable nn.Linear weight for DPS-Mix")
    wrappers: dict[str, MixoutWeight] = {}
    for name in chosen:
        module = model.get_submodule(name[: -len(".weight")] if name != "weight" else "")
        if parametrize.is_parametrized(module, "weight"):
            existing = [m for m in module.parametrizations.weight if isinstance(m, MixoutWeight)]
            if not existing:
                raise ConfigError(f"{name} already carries another parametrization; DPS-Mix cannot wrap it")
            wrappers[name] = existing[0]
            continue
        wrapper = MixoutWeight()
        wrapper.train(module.training)
        parametrize.register_parametrization(module, "weight", wrapper)
        module.register_state_dict_post_hook(_state_dict_post_hook)
        module.register_load_state_dict_pre_hook(_load_pre_hook)
        wrappers[name] = wrapper
    return wrappers


# ---------------------------------------------------------------------------- the algorithm
class DPS:
    """Dynamic parameter selection over a set of weight tensors.

    Args:
        named_parameters: ``(name, tensor)`` pairs; the trainable 2-D ones matched by ``patterns``
            are selected (:func:`linear_weights` gives exactly the Linear weights).
            Parametrized names are reported by their plain ``x.weight`` form.
        total_steps: ``T``, the number of optimizer steps of the run.
        p: fraction of entries dropped in a selection phase, in [0, 1).
        update_ratio: phase length ``U = int(T * update_ratio)``, in (0, 1]; ``U < 1`` is an error.
        variant: ``"dense"`` or ``"mix"``.
        patterns: name substrings; None selects every 2-D tensor given. Matching nothing raises
            :class:`ConfigError` naming ``key``.
        mix: for ``variant="mix"``, the wrappers returned by :func:`attach_mix` (by weight name).
        seed: seed of the generator drawing Mix's ``N``; default :func:`default_seed`.
    """

    def __init__(self, named_parameters: Iterable[tuple[str, torch.Tensor]], total_steps: int,
                 p: float = 0.3, update_ratio: float = 0.05, variant: str = "dense", *,
                 patterns: Sequence[str] | None = None, mix: Mapping[str, MixoutWeight] | None = None,
                 seed: int | None = None, key: str = "schedule.dps_patterns"):
        check_dps_hparams(p, update_ratio, variant)
        self.p = float(p)
        self.update_ratio = float(update_ratio)
        self.variant = variant
        self.total_steps = int(total_steps)
        self.phase_len = phase_length(self.total_steps, self.update_ratio)

        candidates = [(canonical_name(n), t) for n, t in named_parameters if t.requires_grad and t.dim() == 2]
        if not candidates:
            raise ConfigError(f"{key}: no trainable 2-D weight was given to DPS")
        if patterns is not None:
            chosen = set(select_names([n for n, _ in candidates], list(patterns), key))
            candidates = [(n, t) for n, t in candidates if n in chosen]
        self.names = [n for n, _ in candidates]
        self.params = [t for _, t in candidates]
        self.keep = [keep_count(t.numel(), self.p) for t in self.params]
        self.numel = sum(t.numel() for t in self.params)
        # fp32 scores (fp64 for fp64 weights): bf16/fp16 weights would lose the ranking.
        self.score_dtypes = [torch.promote_types(t.dtype, torch.float32) for t in self.params]

        self.mix: list[MixoutWeight] | None = None
        self.w_pre: list[torch.Tensor] | None = None
        if variant == "mix":
            if mix is None:
                raise ValueError("DPS variant 'mix' needs the forward wrappers: DPS(..., mix=attach_mix(model, patterns))")
            missing = [n for n in self.names if n not in mix]
            if missing:
                raise ValueError(f"DPS-Mix: no wrapper for {missing[:3]}; attach_mix(model) with the same patterns")
            self.mix = [mix[n] for n in self.names]
            for w in self.mix:
                w.scale = 1.0 / (1.0 - self.p)
            self.w_pre = [t.detach().clone() for t in self.params]

        k = len(self.params)
        self.scores: list[torch.Tensor | None] = [None] * k   # G: exploration only
        self.counts: list[torch.Tensor | None] = [None] * k   # C (Mix), shape (in,): exploration only
        self.masks: list[torch.Tensor | None] = [None] * k    # M (bool): selection only
        self.w_tgt: list[torch.Tensor | None] = [None] * k    # Mix, selection only
        self.noise: list[torch.Tensor | None] = [None] * k    # N (bool, (1, in)) of the current step
        self.score_phase = 0      # the exploration phase the scores were accumulated in (0: none)
        self.mask_phase = 0       # the selection phase the masks were computed for (0: none)
        self.begun_step = 0       # last step on_step_begin ran for
        self.kept = 1.0           # fraction of selected entries trainable in the current step
        self.seed = int(seed) if seed is not None else default_seed()
        self.generator = torch.Generator()
        self.generator.manual_seed(self.seed)

    # ------------------------------------------------------------------ phase arithmetic
    def phase(self, step: int) -> int:
        """Phase index ``ceil(step / U)`` of optimizer step ``step`` (1-based)."""
        return (int(step) - 1) // self.phase_len + 1

    def is_selection(self, step: int) -> bool:
        return self.phase(step) % 2 == 0

    # ------------------------------------------------------------------ hooks
    def on_step_begin(self, step: int) -> None:
        """Before the first forward of optimizer step ``step``: enter its phase; Mix draws ``N``."""
        self._enter(step)
        if self.mix is not None:
            if self.is_selection(step):
                for wrapper, mask, tgt in zip(self.mix, self.masks, self.w_tgt):
                    wrapper.reference, wrapper.mask = (tgt, mask) if mask is not None else (None, None)
            else:
                self._draw_noise()
                for wrapper, ref, noise in zip(self.mix, self.w_pre, self.noise):
                    wrapper.reference, wrapper.mask = ref, noise
        self.begun_step = int(step)

    def on_gradients(self, step: int) -> None:
        """Once per optimizer step, on the final gradients: accumulate scores or mask ``.grad``."""
        if self.mix is not None and self.begun_step != step:
            raise RuntimeError(
                f"DPS-Mix: on_step_begin({step}) must run before the forward of step {step} (last was {self.begun_step})")
        self._enter(step)
        k = self.phase(step)
        if k % 2 == 0:
            if self.mask_phase == k:
                pairs = [(t.grad, m) for t, m in zip(self.params, self.masks) if t.grad is not None and m is not None]
                if pairs:
                    torch._foreach_mul_([g for g, _ in pairs], [m for _, m in pairs])
            return
        reset = self.score_phase != k
        self.score_phase = k
        fast = []
        for i, t in enumerate(self.params):
            g = t.grad
            noise = self.noise[i] if self.mix is not None else None
            if g is not None and noise is not None:
                g.mul_(noise)
            dtype = self.score_dtypes[i]
            if g is None:
                g = torch.zeros_like(t, dtype=dtype)
            elif g.dtype != dtype:
                g = g.to(dtype)
            if reset or self.scores[i] is None:
                self.scores[i] = g * g
                if noise is not None:
                    self.counts[i] = noise.reshape(-1).to(dtype)
            else:
                fast.append((self.scores[i], g))
                if noise is not None:
                    self.counts[i].add_(noise.reshape(-1))
        if fast:
            grads = [g for _, g in fast]
            torch._foreach_addcmul_([s for s, _ in fast], grads, grads)

    # ------------------------------------------------------------------ phase transitions
    def _enter(self, step: int) -> None:
        k = self.phase(step)
        if k % 2 == 0:
            if self.mask_phase != k:
                self._select(k)
            return
        if self.mask_phase != 0:            # leaving a selection phase: masks and W_tgt go
            self.masks = [None] * len(self.params)
            self.w_tgt = [None] * len(self.params)
            self.mask_phase = 0
        if self.mix is None:
            self.kept = 1.0

    @torch.no_grad()
    def _select(self, k: int) -> None:
        """First step of selection phase ``k``: masks from the scores of phase ``k - 1``."""
        have_scores = self.score_phase == k - 1 and all(s is not None for s in self.scores)
        kept = 0
        for i, t in enumerate(self.params):
            if not have_scores:
                self.masks[i] = None
                kept += t.numel()
                continue
            score = self.scores[i]
            if self.mix is not None:
                count = self.counts[i].clamp(min=1.0)
                score.div_(count)                       # G / max(C, 1), C broadcast over rows
                if self.phase_len >= 50:
                    score.mul_(torch.exp(-self.counts[i] / self.phase_len))
            mask = score >= topk_threshold(score, self.keep[i])
            self.masks[i] = mask
            kept += int(mask.sum())
            if self.mix is not None:
                self.w_tgt[i] = t.detach().clone()
        self.scores = [None] * len(self.params)
        self.counts = [None] * len(self.params)
        self.mask_phase = k
        self.kept = kept / self.numel

    def _draw_noise(self) -> None:
        """Bernoulli(1-p) per input column of every selected weight, one CPU draw, one copy each."""
        widths = [t.shape[1] for t in self.params]
        draw = torch.rand(sum(widths), generator=self.generator) < (1.0 - self.p)
        kept = 0
        for i, (t, piece) in enumerate(zip(self.params, torch.split(draw, widths))):
            kept += int(piece.sum()) * t.shape[0]
            self.noise[i] = piece.reshape(1, -1).to(t.device, non_blocking=True)
        self.kept = kept / self.numel

    # ------------------------------------------------------------------ reporting
    def kept_fraction(self) -> float:
        """Fraction of the selected entries trainable in the current step (1.0 in Dense exploration)."""
        return float(self.kept)

    def memory_bytes(self) -> dict[str, int]:
        """Bytes DPS holds now, by kind."""
        def size(ts):
            return sum(t.numel() * t.element_size() for t in ts if t is not None)

        return {"scores": size(self.scores) + size(self.counts), "masks": size(self.masks) + size(self.noise),
                "snapshots": size(self.w_pre or []) + size(self.w_tgt)}

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        """Plain containers of tensors (loads with ``torch.load(weights_only=True)``)."""
        def named(ts):
            return {n: t for n, t in zip(self.names, ts) if t is not None}

        return {
            "version": STATE_VERSION, "variant": self.variant, "p": self.p,
            "update_ratio": self.update_ratio, "total_steps": self.total_steps, "phase_len": self.phase_len,
            "names": list(self.names), "score_phase": self.score_phase, "mask_phase": self.mask_phase,
            "begun_step": self.begun_step, "kept": self.kept, "seed": self.seed,
            "generator": self.generator.get_state(),
            "scores": named(self.scores), "counts": named(self.counts), "masks": named(self.masks),
            "noise": named(self.noise), "w_tgt": named(self.w_tgt), "w_pre": named(self.w_pre or []),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ConfigError(f"DPS checkpoint state has version {state.get('version')!r}; expected {STATE_VERSION}")
        for key, mine in (("variant", self.variant), ("p", self.p), ("update_ratio", self.update_ratio),
                          ("phase_len", self.phase_len)):
            if state[key] != mine:
                raise ConfigError(f"the checkpoint was written with DPS {key}={state[key]!r}, this run has {mine!r}; "
                                  "resume with the same schedule settings and step count")
        if list(state["names"]) != self.names:
            raise ConfigError("the checkpoint's DPS selected a different set of weights than this run's "
                              "schedule.dps_patterns select")

        def restore(entries: Mapping[str, torch.Tensor], dtype=None, like_param=False):
            out: list[torch.Tensor | None] = [None] * len(self.names)
            for i, (name, t) in enumerate(zip(self.names, self.params)):
                dtype_i = self.score_dtypes[i] if dtype == "score" else dtype
                if name in entries:
                    value = entries[name]
                    if like_param and tuple(value.shape) != tuple(t.shape):
                        raise ConfigError(f"DPS checkpoint: {name} has shape {tuple(value.shape)}, model has {tuple(t.shape)}")
                    out[i] = value.to(device=t.device, dtype=t.dtype if like_param else dtype_i, copy=True)
            return out

        self.scores = restore(state["scores"], "score")
        self.counts = restore(state["counts"], "score")
        self.masks = restore(state["masks"], torch.bool)
        self.noise = restore(state["noise"], torch.bool)
        self.w_tgt = restore(state["w_tgt"], like_param=True)
        if self.mix is not None:
            pre = restore(state["w_pre"], like_param=True)
            if any(t is None for t in pre):
                raise ConfigError("DPS-Mix checkpoint lacks the W_pre snapshots")
            self.w_pre = pre
        self.score_phase = int(state["score_phase"])
        self.mask_phase = int(state["mask_phase"])
        self.begun_step = int(state["begun_step"])
        self.kept = float(state["kept"])
        self.seed = int(state["seed"])
        self.generator.set_state(state["generator"].to("cpu", torch.uint8))


# ---------------------------------------------------------------------------- the schedule
class DPSSchedule(BaselineSchedule):
    """``schedule=dps``: the baseline optimizer and LR schedule, plus :class:`DPS`.

    Config keys (``conf/schedule/dps.yaml``): the baseline's, plus ``variant`` (dense | mix),
    ``p``, ``update_ratio``, ``dps_patterns`` (null: the model family's default) and
    ``disable_dropout`` (the DPS preset: true).
    """

    name = "dps"
    config_keys = BaselineSchedule.config_keys | {"variant", "p", "update_ratio", "dps_patterns",
                                                  "disable_dropout"}

    def __init__(self, cfg: Mapping[str, Any]):
        super().__init__(cfg)
        self.p = self.cfg.get("p", 0.3)
        self.update_ratio = self.cfg.get("update_ratio", 0.05)
        self.variant = self.cfg.get("variant", "dense")
        check_dps_hparams(self.p, self.update_ratio, self.variant)
        self.dps: DPS | None = None
        self._mix: dict[str, MixoutWeight] | None = None
        self._pending_state: dict | None = None

    def prepare_model(self, model: nn.Module, family: str) -> None:
        if self.cfg.get("disable_dropout", True):
            disable_dropout(model)
        if self.variant == "mix":
            self._mix = attach_mix(model, self.patterns(family, "dps"))

    def setup(self, model: nn.Module, family: str, total_steps: int) -> None:
        if self.variant == "mix" and self._mix is None:
            self._mix = attach_mix(model, self.patterns(family, "dps"))
        # U >= 1 is checked before building anything else.
        phase_length(int(total_steps), float(self.update_ratio))
        super().setup(model, family, total_steps)
        self.dps = DPS(linear_weights(model), total_steps, self.p, self.update_ratio, self.variant,
                       patterns=self.patterns(family, "dps"), mix=self._mix, seed=self._shared_seed(model))
        if self._pending_state is not None:
            self.dps.load_state_dict(self._pending_state)
            self._pending_state = None

    @staticmethod
    def _shared_seed(model: nn.Module) -> int:
        seed = default_seed()
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            device = torch.device("cpu")
            if dist.get_backend() == "nccl":
                device = torch.device("cuda", torch.cuda.current_device())
            value = torch.tensor([seed], dtype=torch.int64, device=device)
            dist.broadcast(value, src=0)
            seed = int(value.item())
        return seed

    def on_step_begin(self, step: int) -> None:
        self.dps.on_step_begin(step)

    def on_gradients(self, step: int) -> None:
        self.dps.on_gradients(step)

    def log_metrics(self, step: int) -> dict[str, float]:
        metrics = super().log_metrics(step)
        metrics.update({
            "dps/phase": float(self.dps.phase(step)),
            "dps/selection": 1.0 if self.dps.is_selection(step) else 0.0,
            "dps/kept_fraction": self.dps.kept_fraction(),
        })
        return metrics

    def state_dict(self) -> dict:
        return self.dps.state_dict() if self.dps is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        if self.dps is None:
            self._pending_state = dict(state)
        else:
            self.dps.load_state_dict(state)
