"""SAGE and DPS in the Hugging Face ``Trainer`` (transformers 5; needs ``accelerate``)::

    from adaptune.schedules.integrations.hf import DPSCallback, SageTrainer

    args = TrainingArguments(..., learning_rate=2e-4, optim_args="beta3=0.75")   # base=adamw for AdamW-SAGE
    trainer = SageTrainer(model, args, train_dataset=ds)       # or model_init=..., hyperparameter_search
    trainer = Trainer(model, args, train_dataset=ds, callbacks=[DPSCallback(p=0.3, update_ratio=0.05)])

**SAGE, the Trainer's way.** :class:`SageTrainer` (a ``Trainer`` subclass) builds the SAGE optimizer
in ``create_optimizer`` from ``TrainingArguments`` (``learning_rate``, ``weight_decay``, betas,
``adam_epsilon``) and ``optim_args`` (SAGE's own settings), over the groups of the model the
Trainer actually trains, so ``--learning_rate``, ``model_init``, PEFT and
``hyperparameter_search`` act on SAGE.

**SAGE, explicit.** :func:`sage_optimizer_cls_and_kwargs` returns ``(cls, kwargs)``; the Trainer calls
``cls(its_param_groups, **kwargs)``. **(choice)** The Trainer builds its own two groups (decay /
no decay by its own rules) and passes them positionally; a SAGE optimizer needs groups made from
the parameter *names*. So ``kwargs`` carries our groups under ``sage_groups`` and ``cls`` is a thin
subclass of the SAGE optimizer (:class:`AdamaxSAGEForTrainer` / :class:`AdamWSAGEForTrainer`) that
uses them instead, after checking they hold exactly the parameters the Trainer wanted to train
(a different model is an error). This works whether the Trainer passes ``model.parameters()`` or
groups, and does not rely on the Trainer popping a ``params`` key. Consequences: the optimizer's
learning rate is ``lr`` given here (the LR *schedule* is still the Trainer's, a multiplier on
it), and weight decay is ``weight_decay`` given here for weights, 0 for biases and norms (the
family's ``no_decay`` patterns); ``TrainingArguments.learning_rate`` / ``weight_decay`` are not
seen by the optimizer. :func:`make_sage_optimizer` builds the plain optimizer for
``Trainer(optimizers=(opt, None))``.

**DPS.** :class:`DPSCallback` builds :class:`adaptune.schedules.dps.DPS` at ``on_train_begin`` over the
model's ``nn.Linear`` weights matched by the DPS patterns, with ``T = state.max_steps`` optimizer
steps, and drives it with the Trainer's events, keyed on the optimizer-step counter
(``state.global_step + 1``), never on micro-batches:

- ``on_step_begin`` (before the first micro-batch's forward of each optimizer step): phase entry;
  Mix draws its column masks ``N``.
- ``on_pre_optimizer_step`` (after all micro-batches' backward, the DDP all-reduce, fp16
  unscaling **and the Trainer's gradient clipping**; right before ``optimizer.step()``): scores or
  masks ``.grad``. **Order (documented honestly):** the DPS reference (and the runner) masks
  *before* global-norm clipping; the Trainer offers no event between backward and its clipping,
  so here clipping comes first: with ``max_grad_norm > 0`` the clip coefficient is computed on
  the unmasked gradient (masked entries are still zeroed exactly; exploration scores are scaled
  by that step's clip coefficient). Set ``max_grad_norm=0`` to avoid the difference, or use the
  runner / :mod:`adaptune.schedules.integrations.accelerate` for the reference order.
- ``on_step_end``: **(choice)** if ``on_pre_optimizer_step`` did not fire for the step just
  finished (a transformers without that event, a custom loop, a Trainer subclass that drops it)
  it raises instead of silently training without DPS, at the end of the first optimizer step.

Gradient accumulation, DDP and fp16 / bf16 work as the Trainer runs them: one mask per optimizer
step on the all-reduced, unscaled gradient (identical on every rank, so the masks are too). An
fp16 step whose gradients overflowed (the GradScaler skips it) is skipped by DPS as well.
DeepSpeed and FSDP shard or flatten the gradients, so DPS cannot see whole weight matrices: a
:class:`~adaptune.common.errors.ConfigError` at ``on_train_begin``.

**(choice) Mix** is supported: ``on_init_end`` (the end of ``Trainer.__init__``, before ``train()``
wraps the model in DDP) attaches :func:`adaptune.schedules.dps.attach_mix` to the selected Linears (a
``torch.nn.utils.parametrize`` of their weights: same ``Parameter`` objects, so the optimizer the
Trainer built is unaffected; ``state_dict`` keys unchanged). Registering the parametrization gives
each weight a new autograd accumulator, which the hooks DDP registered when it wrapped the model
never see: attached after the wrap, those gradients would not be all-reduced (ranks drift apart
silently under the Trainer's ``find_unused_parameters=True``). So under DDP the callback must be
passed to ``Trainer(callbacks=[...])`` with the model (``add_callback`` / ``model_init``: a
ConfigError at ``on_train_begin``); in one process ``on_train_begin`` attaches it. It is refused, with
the reason, where that forward cannot be patched: DeepSpeed/FSDP, a selected weight that is not a
floating-point ``nn.Linear`` weight (quantised layers), or one already parametrized by something
else. Not tested with ``torch_compile=True``.

Checkpoints: the callback writes DPS's state (scores, masks, phase, Mix generator) as
``adaptune_dps.pt`` into each ``checkpoint-<step>/`` the Trainer saves, and reads it back when
``trainer.train(resume_from_checkpoint=...)`` resumes: a resumed run ends bit-identical to an
uninterrupted one on CPU.
LoRA (peft) models: SAGE and DPS apply to the ``lora_A`` / ``lora_B`` adapters only
(:mod:`adaptune.schedules.integrations.patterns`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from adaptune.common.errors import ConfigError
from adaptune.common.extras import require

from ..dps import DPS, attach_mix, check_dps_hparams, linear_weights, phase_length
from ..sage import AdamaxSAGE, AdamWSAGE, sage_param_groups
from ..sync import shared_seed
from .guards import grads_overflowed, refuse_sharded
from .patterns import dps_patterns, model_patterns

TrainerCallback = require("transformers", "adaptune.schedules.integrations.hf").TrainerCallback

__all__ = [
    "AdamWSAGEForTrainer",
    "AdamaxSAGEForTrainer",
    "DPSCallback",
    "make_sage_optimizer",
    "sage_groups",
    "sage_optimizer_cls_and_kwargs",
]


# ============================================================================ SAGE
def _params_of(params: Any) -> list[torch.Tensor]:
    out = []
    for item in params:
        if isinstance(item, dict):
            out.extend(item["params"])
        else:
            out.append(item)
    return out


class _FromSageGroups:
    """Mixin: take the SAGE groups from ``sage_groups`` instead of the caller's parameters."""

    def __init__(self, params: Iterable, sage_groups: list[dict] | None = None, **kwargs):
        if sage_groups is not None:
            given = {id(p) for p in _params_of(params)}
            ours = {id(p) for p in _params_of(sage_groups)}
            if given - ours:
                raise ValueError(
                    f"{type(self).__name__}: the Trainer trains {len(given - ours)} parameter(s) that the SAGE "
                    "groups do not hold; build them from the model you pass to the Trainer, after freezing "
                    "or adding adapters"
                )
            params = [{**g, "params": [p for p in g["params"] if id(p) in given]} for g in sage_groups]
            params = [g for g in params if g["params"]]
        super().__init__(params, **kwargs)


class AdamaxSAGEForTrainer(_FromSageGroups, AdamaxSAGE):
    """:class:`~adaptune.schedules.sage.AdamaxSAGE` that takes its groups from ``sage_groups=``."""


class AdamWSAGEForTrainer(_FromSageGroups, AdamWSAGE):
    """:class:`~adaptune.schedules.sage.AdamWSAGE` that takes its groups from ``sage_groups=``."""


_BASES = {"adamax": (AdamaxSAGE, AdamaxSAGEForTrainer), "adamw": (AdamWSAGE, AdamWSAGEForTrainer)}


def sage_groups(
    model: torch.nn.Module,
    family: str | None = None,
    *,
    weight_decay: float = 0.01,
    sage_patterns: Sequence[str] | None = None,
    no_decay: Sequence[str] | None = None,
) -> list[dict]:
    """SAGE parameter groups of ``model``'s trainable parameters: ``sage=True`` for the tensors
    matched by the SAGE patterns (the family's, from ``family`` or ``model.config.model_type``;
    a LoRA model's adapters), decay / no-decay split by the family's ``no_decay`` patterns."""
    patterns = model_patterns(model, family) if sage_patterns is None or no_decay is None else {}
    return sage_param_groups(
        model,
        sage_patterns=sage_patterns or patterns["sage"],
        no_decay=no_decay if no_decay is not None else patterns["no_decay"],
        weight_decay=weight_decay,
    )


def _split(base: str, kw: dict) -> tuple[type, type, dict]:
    if base not in _BASES:
        raise ConfigError(f"base='{base}' is unknown; allowed: {', '.join(_BASES)}")
    group_kw = {k: kw.pop(k) for k in ("weight_decay", "sage_patterns", "no_decay") if k in kw}
    return (*_BASES[base], group_kw)


def sage_optimizer_cls_and_kwargs(
    model: torch.nn.Module, family: str | None = None, base: str = "adamax", *, lr: float, beta3: float = 0.75, **kw
) -> tuple[type, dict[str, Any]]:
    """``(cls, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``: Adamax-SAGE (``base="adamax"``,
    the paper's GLUE optimizer) or AdamW-SAGE (``"adamw"``) over the SAGE groups of ``model``.

    Args:
        model: the model the Trainer trains (after freezing / adding LoRA adapters).
        family: ``bert`` | ``roberta`` | ``deberta`` | ... (``common/families.py``); None: from
            ``model.config.model_type``; LoRA models: the adapters.
        lr: the optimizer's (peak) learning rate; the Trainer's LR schedule multiplies it.
        beta3: SAGE's sensitivity EMA (the paper uses 0.6-0.9).
        **kw: ``weight_decay`` (default 0.01 for weights; biases/norms get 0), ``sage_patterns``,
            ``no_decay``, and the optimizer's own: ``betas``, ``eps``, ``fused``, ``bias_correction``
            (AdamW-SAGE).
    """
    _, trainer_cls, group_kw = _split(base, kw)
    return trainer_cls, {"sage_groups": sage_groups(model, family, **group_kw), "lr": lr, "beta3": beta3, **kw}


def make_sage_optimizer(
    model: torch.nn.Module, family: str | None = None, base: str = "adamax", *, lr: float, beta3: float = 0.75, **kw
) -> torch.optim.Optimizer:
    """The SAGE optimizer itself, for ``Trainer(optimizers=(opt, None))`` or any loop (same
    arguments as :func:`sage_optimizer_cls_and_kwargs`)."""
    cls, _, group_kw = _split(base, kw)
    return cls(sage_groups(model, family, **group_kw), lr=lr, beta3=beta3, **kw)


#: ``optim_args`` keys :class:`SageTrainer` reads, with their types (lr, weight decay, betas and eps
#: come from ``TrainingArguments``).
SAGE_OPTIM_ARGS: dict[str, type] = {"beta3": float, "base": str, "bias_correction": bool, "family": str}


def _parse_bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise ValueError(text)


def sage_kwargs_from_args(args) -> dict[str, Any]:
    """The :func:`make_sage_optimizer` arguments a ``TrainingArguments`` describes: ``learning_rate``,
    ``weight_decay``, ``adam_beta1`` / ``adam_beta2``, ``adam_epsilon``, and SAGE's own settings from
    ``optim_args`` (``"beta3=0.8,base=adamw,bias_correction=true,family=bert"``; keys
    :data:`SAGE_OPTIM_ARGS`). An unknown key or a bad value is a one-line :class:`ConfigError`."""
    out: dict[str, Any] = {
        "lr": float(args.learning_rate),
        "weight_decay": float(args.weight_decay),
        "betas": (float(args.adam_beta1), float(args.adam_beta2)),
        "eps": float(args.adam_epsilon),
    }
    text = (getattr(args, "optim_args", None) or "").strip()
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or key not in SAGE_OPTIM_ARGS:
            raise ConfigError(
                f"optim_args: '{item}' is not one of SageTrainer's settings ({', '.join(f'{k}=...' for k in SAGE_OPTIM_ARGS)})"
            )
        try:
            out[key] = _parse_bool(value) if SAGE_OPTIM_ARGS[key] is bool else SAGE_OPTIM_ARGS[key](value)
        except ValueError:
            raise ConfigError(f"optim_args: {key}={value} is not a {SAGE_OPTIM_ARGS[key].__name__}") from None
    if "bias_correction" in out and out.get("base", "adamax") != "adamw":
        raise ConfigError("optim_args: bias_correction applies to base=adamw only")
    return out


def _sage_trainer_class():
    from transformers import Trainer

    class SageTrainer(Trainer):
        """A ``transformers.Trainer`` whose optimizer is SAGE, configured the Trainer's way.

        ``TrainingArguments.learning_rate``, ``weight_decay``, ``adam_beta1`` / ``adam_beta2`` and
        ``adam_epsilon`` are SAGE's (so ``--learning_rate`` and ``hyperparameter_search`` over them
        act on SAGE); SAGE's own settings come from ``optim_args``, e.g.
        ``optim_args="beta3=0.8,base=adamw"`` (:data:`SAGE_OPTIM_ARGS`; default Adamax-SAGE,
        ``beta3=0.75``). The groups are built in ``create_optimizer`` from the model the Trainer
        actually trains (after ``model_init``, PEFT adapters, freezing): SAGE on the family's
        patterned weights (a LoRA model's ``lora_A``), plain updates elsewhere, no decay on biases
        and norms. ``args.optim`` is not read. (choice) ``adam_epsilon`` defaults to 1e-8 in
        ``TrainingArguments``; SAGE's own default is 1e-6 (its multiplier divides by eps²): pass
        ``adam_epsilon=1e-6`` for that setting.
        """

        def create_optimizer(self, model=None):
            if self.optimizer is None and self.optimizer_cls_and_kwargs is None:
                opt_model = self.model if model is None else model
                kwargs = sage_kwargs_from_args(self.args)
                family = kwargs.pop("family", None)
                self.optimizer = make_sage_optimizer(opt_model, family, **kwargs)
            return super().create_optimizer(model)

    return SageTrainer


def __getattr__(name: str):
    # SageTrainer subclasses transformers.Trainer, whose import is slow: built on first use
    if name == "SageTrainer":
        cls = _sage_trainer_class()
        globals()["SageTrainer"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ============================================================================ DPS
def _checkpoint_folder(args, state) -> Path:
    """The Trainer's checkpoint folder of ``state.global_step`` (``<output_dir>/checkpoint-<step>``)."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    return Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"


class DPSCallback(TrainerCallback):
    """DPS (Dense or Mix) in the Hugging Face Trainer; see the module docstring for the event order.

    Args:
        p: fraction of entries dropped in a selection phase, in [0, 1).
        update_ratio: phase length ``U = int(T * update_ratio)``; ``U < 1`` is a ConfigError.
        variant: ``"dense"`` or ``"mix"``.
        patterns: name substrings of the Linear weights DPS selects from; None: the model's
            family's DPS patterns (``model.config.model_type``, or ``family``), or a LoRA model's
            adapters.
        family: the pattern family when ``patterns`` is None and the model type is not known.
        total_steps: ``T``; None: ``state.max_steps`` (the run's optimizer steps).
        seed: seed of Mix's draws; None: derived from the run seed, rank 0's on every rank
            (:func:`adaptune.schedules.sync.shared_seed`), so DDP ranks draw the same masks even where
            user code seeds the ranks apart.

    After training, ``callback.dps`` is the :class:`~adaptune.schedules.dps.DPS` object (``kept_fraction()``,
    ``masks``, ``state_dict()``).
    """

    KEY = "DPSCallback"

    def __init__(
        self,
        p: float = 0.3,
        update_ratio: float = 0.05,
        variant: str = "dense",
        patterns: Sequence[str] | None = None,
        *,
        family: str | None = None,
        total_steps: int | None = None,
        seed: int | None = None,
    ):
        try:
            check_dps_hparams(p, update_ratio, variant)
        except ValueError as err:  # the class's own argument, named as its users call it
            raise ConfigError(f"{self.KEY}.{err}") from None
        self.p, self.update_ratio, self.variant = float(p), float(update_ratio), variant
        self.patterns = list(patterns) if patterns is not None else None
        self.family, self.total_steps, self.seed = family, total_steps, seed
        self.dps: DPS | None = None
        self._mix_attached = False  # Mix's forward patched at on_init_end, before the Trainer wraps the model (DDP)
        self.masked_step = 0  # last optimizer step whose gradients DPS processed (or skipped: fp16 overflow)
        self.skipped_steps = 0

    # ------------------------------------------------------------------ events
    def on_init_end(self, args, state, control, model=None, **kwargs):
        # Mix: patch the forward now, before train() wraps the model in DistributedDataParallel.
        # register_parametrization gives each weight a new autograd accumulator, so DDP's
        # all-reduce hooks (registered on the old ones when it wrapped) would never fire for it.
        if self.variant == "mix" and model is not None:
            refuse_sharded(model, args, self.KEY)
            self._attach_mix(model, self._patterns(model))
            self._mix_attached = True

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise RuntimeError(f"{self.KEY}: the Trainer passed no model to on_train_begin")
        refuse_sharded(model, args, self.KEY)
        total = int(self.total_steps or state.max_steps)
        phase_length(total, self.update_ratio, prefix=self.KEY)
        patterns = self._patterns(model)
        mix = None
        if self.variant == "mix":
            if not self._mix_attached and getattr(args, "world_size", 1) > 1:
                raise ConfigError(
                    f"{self.KEY}: DPS-Mix under DDP must patch the forward before the Trainer wraps the model in "
                    "DistributedDataParallel (else DDP never all-reduces the patched weights' gradients); pass the "
                    "callback to Trainer(callbacks=[...]) with the model (not add_callback, not model_init)"
                )
            mix = self._attach_mix(model, patterns)  # (idempotent: returns the wrappers on_init_end made)
        self.dps = DPS(
            linear_weights(model),
            total,
            self.p,
            self.update_ratio,
            self.variant,
            patterns=patterns,
            mix=mix,
            seed=self.seed if self.seed is not None else shared_seed(),
            key=f"{self.KEY}.patterns",
        )
        self.masked_step = int(state.global_step)
        if state.global_step > 0:
            self._resume(args, state)

    def on_step_begin(self, args, state, control, **kwargs):
        self._require_dps("on_step_begin")
        self.dps.on_step_begin(state.global_step + 1)

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._require_dps("on_pre_optimizer_step")
        step = state.global_step + 1
        if model is not None and grads_overflowed(model, getattr(optimizer, "scaler", None)):
            self.skipped_steps += 1
        else:
            self.dps.on_gradients(step)
        self.masked_step = step

    def on_step_end(self, args, state, control, **kwargs):
        self._require_dps("on_step_end")
        if self.masked_step != state.global_step:
            import transformers

            raise RuntimeError(
                f"{self.KEY}: optimizer step {state.global_step} ran but on_pre_optimizer_step never fired, so DPS "
                f"masked nothing (transformers {transformers.__version__}). The Trainer must call the callback "
                "event on_pre_optimizer_step between backward and optimizer.step() (transformers 5 does); a custom "
                "loop must call callback.on_pre_optimizer_step(args, state, control, model=..., optimizer=...)"
            )

    # ------------------------------------------------------------------ checkpoints
    STATE_FILE = "adaptune_dps.pt"

    def state_dict(self) -> dict:
        """DPS's state (scores, masks, phase, Mix generator) and the callback's step counters."""
        self._require_dps("state_dict")
        return {"dps": self.dps.state_dict(), "masked_step": self.masked_step, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._require_dps("load_state_dict")
        self.dps.load_state_dict(state["dps"])
        self.masked_step, self.skipped_steps = int(state["masked_step"]), int(state["skipped_steps"])

    def on_save(self, args, state, control, **kwargs):
        """Beside the Trainer's checkpoint (``checkpoint-<step>/``): :data:`STATE_FILE`, so that
        ``trainer.train(resume_from_checkpoint=...)`` resumes DPS where it was (written by the
        main process; every rank holds the same state)."""
        if self.dps is None or not state.is_world_process_zero:
            return
        folder = _checkpoint_folder(args, state)
        if folder.is_dir():
            torch.save(self.state_dict(), folder / self.STATE_FILE)

    def _resume(self, args, state) -> None:
        """At ``on_train_begin`` of a resumed run (``state.global_step > 0``): the DPS state saved
        with that checkpoint. (choice) A resumed run without it is an error, not a silent restart
        of DPS's phases."""
        given = getattr(args, "resume_from_checkpoint", None)  # set by scripts that pass it through args
        folder = Path(given) if isinstance(given, str) and Path(given).is_dir() else _checkpoint_folder(args, state)
        path = folder / self.STATE_FILE
        if not path.is_file():
            raise ConfigError(
                f"{self.KEY}: the run resumes at step {state.global_step} but {path} does not exist "
                "(a checkpoint saved without the callback?); DPS cannot continue its phases"
            )
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    # ------------------------------------------------------------------ helpers
    def _require_dps(self, event: str) -> None:
        if self.dps is None:
            raise RuntimeError(
                f"{self.KEY}: {event} before on_train_begin; add the callback to the Trainer "
                "(callbacks=[...]) before train(), not during training"
            )

    def _patterns(self, model: torch.nn.Module) -> list[str]:
        """The selected weights' patterns: the given ones, else the model's family's DPS patterns."""
        return dps_patterns(model, self.patterns, self.family)

    def _attach_mix(self, model: torch.nn.Module, patterns: Sequence[str]) -> dict:
        """Mix's wrappers of the selected Linears (:func:`attach_mix`, idempotent), after refusing
        weights that cannot take the Mix forward."""
        key = f"{self.KEY}.patterns"
        self._check_patchable(model, patterns, key)
        return attach_mix(model, patterns, key=key)

    @staticmethod
    def _check_patchable(model: torch.nn.Module, patterns: Sequence[str], key: str) -> None:
        """Refuse Mix, with the reason, where the weights cannot take the Mix forward."""
        for name, weight in linear_weights(model):
            if weight.requires_grad and any(pat in name for pat in patterns) and not weight.is_floating_point():
                raise ConfigError(
                    f"{key}: DPS-Mix cannot patch the forward of {name} ({weight.dtype} weights, "
                    "e.g. a quantised layer): its weight is not a floating-point tensor; use variant='dense'"
                )
