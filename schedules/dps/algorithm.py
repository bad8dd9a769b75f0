"""The DPS algorithm on a set of weights: phases, scores, masks, Mix snapshots, resumable state."""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import torch

from adaptune.common.errors import ConfigError

from ..defaults import DPS_P, DPS_UPDATE_RATIO, DPS_VARIANT
from ..mixing import MixoutWeight
from ..patterns import select_names
from .helpers import canonical_name, check_dps_hparams, default_seed, keep_count, phase_length, topk_threshold

STATE_VERSION = 1
#: the runner's config key for each argument a checkpoint records (named in the errors)
CONFIG_KEYS = {"variant": "schedule.variant", "p": "schedule.drop_p", "update_ratio": "schedule.update_ratio"}


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

    def __init__(
        self,
        named_parameters: Iterable[tuple[str, torch.Tensor]],
        total_steps: int,
        p: float = DPS_P,
        update_ratio: float = DPS_UPDATE_RATIO,
        variant: str = DPS_VARIANT,
        *,
        patterns: Sequence[str] | None = None,
        mix: Mapping[str, MixoutWeight] | None = None,
        seed: int | None = None,
        key: str = "schedule.dps_patterns",
    ):
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
        self.scores: list[torch.Tensor | None] = [None] * k  # G: exploration only
        self.counts: list[torch.Tensor | None] = [None] * k  # C (Mix), shape (in,): exploration only
        self.masks: list[torch.Tensor | None] = [None] * k  # M (bool): selection only
        self.w_tgt: list[torch.Tensor | None] = [None] * k  # Mix, selection only
        self.noise: list[torch.Tensor | None] = [None] * k  # N (bool, (1, in)) of the current step
        # Selection record for analysis (``adaptune analyze``), kept in the state dict: per entry
        # the number of selection phases it was kept in (uint8, int16 when more than 255 phases
        # can occur), the previous selection phase's mask (to measure the overlap of consecutive
        # masks) and one overlap per selection phase after the first: |M_k & M_prev| / |M_k|.
        # (choice) The previous mask stays alive through the exploration phase that follows it,
        # 1 byte per entry, instead of every mask being saved.
        n_phases = -(-self.total_steps // self.phase_len)
        self.count_dtype = torch.uint8 if (n_phases + 1) // 2 <= 255 else torch.int16
        self.selected: list[torch.Tensor | None] = [None] * k
        self.prev_masks: list[torch.Tensor | None] = [None] * k
        self.selections = 0  # selection phases whose masks were computed
        self.overlaps: list[float] = []
        self.score_phase = 0  # the exploration phase the scores were accumulated in (0: none)
        self.mask_phase = 0  # the selection phase the masks were computed for (0: none)
        self.begun_step = 0  # last step on_step_begin ran for
        self.kept = 1.0  # fraction of selected entries trainable in the current step
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
                f"DPS-Mix: on_step_begin({step}) must run before the forward of step {step} (last was {self.begun_step})"
            )
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
        if self.mask_phase != 0:  # leaving a selection phase: masks and W_tgt go
            self.prev_masks = self.masks
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
                score.div_(count)  # G / max(C, 1), C broadcast over rows
                if self.phase_len >= 50:
                    score.mul_(torch.exp(-self.counts[i] / self.phase_len))
            mask = score >= topk_threshold(score, self.keep[i])
            self.masks[i] = mask
            kept += int(mask.sum())
            if self.mix is not None:
                self.w_tgt[i] = t.detach().clone()
        if have_scores:
            self._record_selection()
        self.scores = [None] * len(self.params)
        self.counts = [None] * len(self.params)
        self.mask_phase = k
        self.kept = kept / self.numel

    def _record_selection(self) -> None:
        """Add the new masks to the per-entry selection counts; the overlap with the previous masks."""
        both = total = 0
        for i, mask in enumerate(self.masks):
            if self.selected[i] is None:
                self.selected[i] = torch.zeros(mask.shape, dtype=self.count_dtype, device=mask.device)
            self.selected[i].add_(mask.to(self.count_dtype))
            prev = self.prev_masks[i]
            if prev is not None:
                both += int((mask & prev).sum())
                total += int(mask.sum())
        if total:
            self.overlaps.append(both / total)
        self.prev_masks = [None] * len(self.params)
        self.selections += 1

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

        return {
            "scores": size(self.scores) + size(self.counts),
            "masks": size(self.masks) + size(self.noise),
            "snapshots": size(self.w_pre or []) + size(self.w_tgt),
        }

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        """Plain containers of tensors (loads with ``torch.load(weights_only=True)``)."""

        def named(ts):
            return {n: t for n, t in zip(self.names, ts) if t is not None}

        return {
            "version": STATE_VERSION,
            "variant": self.variant,
            "p": self.p,
            "update_ratio": self.update_ratio,
            "total_steps": self.total_steps,
            "phase_len": self.phase_len,
            "names": list(self.names),
            "score_phase": self.score_phase,
            "mask_phase": self.mask_phase,
            "begun_step": self.begun_step,
            "kept": self.kept,
            "seed": self.seed,
            "generator": self.generator.get_state(),
            "scores": named(self.scores),
            "counts": named(self.counts),
            "masks": named(self.masks),
            "noise": named(self.noise),
            "w_tgt": named(self.w_tgt),
            "w_pre": named(self.w_pre or []),
            "selected": named(self.selected),
            "prev_masks": named(self.prev_masks),
            "selections": self.selections,
            "overlaps": list(self.overlaps),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ConfigError(f"DPS checkpoint state has version {state.get('version')!r}; expected {STATE_VERSION}")
        for key, mine in (
            ("variant", self.variant),
            ("p", self.p),
            ("update_ratio", self.update_ratio),
            ("phase_len", self.phase_len),
        ):
            if state[key] != mine:
                where = f" ({CONFIG_KEYS[key]})" if key in CONFIG_KEYS else ""
                raise ConfigError(
                    f"the checkpoint was written with DPS {key}={state[key]!r}{where}, this run has "
                    f"{mine!r}; resume with the same schedule settings and step count"
                )
        if list(state["names"]) != self.names:
            raise ConfigError(
                "the checkpoint's DPS selected a different set of weights than this run's schedule.dps_patterns select"
            )

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
        # (choice) absent in checkpoints written before the selection record existed: it restarts
        # empty (same STATE_VERSION, so those runs still resume)
        self.selected = restore(state.get("selected", {}), self.count_dtype)
        self.prev_masks = restore(state.get("prev_masks", {}), torch.bool)
        self.selections = int(state.get("selections", 0))
        self.overlaps = [float(v) for v in state.get("overlaps", [])]
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
