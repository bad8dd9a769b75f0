"""SAGE for ``timm.optim.create_optimizer_v2`` users, timm's parameter groups kept::

    from timm.optim import create_optimizer_v2
    from adaptune.schedules.integrations.timm import register_sage_optimizers

    register_sage_optimizers()            # adds "adamwsage" / "adamaxsage" to timm's registry
    opt = create_optimizer_v2(model, "adamwsage", lr=1e-4, weight_decay=0.05, layer_decay=0.65, beta3=0.75)

timm builds its usual groups (layer-wise ``lr_scale``, weight decay 0 for 1-d tensors and the
model's ``no_weight_decay()`` names); each group is split in two by parameter name: the weights the
SAGE patterns match get SAGE, every other tensor the optimizer's plain maths, each part with the
group's ``lr_scale`` and ``weight_decay``. The patterns default to the ``vit`` family (timm
``VisionTransformer``: ``blocks.N.attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``, so 4 weights a
block); pass ``family="bert"`` or ``sage_patterns=(...)`` to ``create_optimizer_v2`` for other
architectures. Other keywords (``beta3``, ``bias_correction``, ``eps``, ``betas``, ``fused``) reach
:class:`~adaptune.schedules.sage.AdamWSAGE` / :class:`~adaptune.schedules.sage.AdamaxSAGE`, which
is what ``create_optimizer_v2`` returns (``lookahead_adamwsage``: wrapped in timm's ``Lookahead``).

Layer decay takes effect through timm's LR schedulers (``timm.scheduler``; ``train.py`` builds one
unless ``--sched none``): they write ``lr = scheduled lr × lr_scale`` into each group, exactly as for timm's
own ``adamw``; the optimizer itself does not read ``lr_scale``. With a torch scheduler, set the
groups' ``lr`` yourself.

timm's ``train.py``: nothing to edit. Run it through this module, which registers the names and
then runs the script as ``__main__``; ``--opt-kwargs`` carries the SAGE keywords::

    python -m adaptune.schedules.integrations.timm train.py --model vit_base_patch16_224 \\
        --opt adamwsage --lr 1e-4 --weight-decay 0.05 --layer-decay 0.65 --opt-kwargs beta3=0.75
    torchrun --nproc_per_node=8 -m adaptune.schedules.integrations.timm train.py ...   # several GPUs

Your own groups still work: groups that carry ``sage`` are used as given, e.g. those of
:func:`sage_param_group_fn` (``param_group_fn=sage_param_group_fn(weight_decay=0.05)``, no layer
decay).

**(choice)** Which tensors get SAGE: those the patterns match, minus what timm exempts from decay by
shape (1-d tensors and ``*.bias``, its ``weight_decay_exclude_1d`` rule) and minus timm's
``use_fallback`` groups (its ``fallback_list``; ``fallback_list=("blocks.0.*",)`` keeps block 0
plain). The shape rule holds whatever ``weight_decay`` is (at 0 timm puts every tensor in one
no-decay group). Biases are left out because timm initialises them to 0, and SAGE never moves an
entry that is 0 (``I = |θ ⊙ g| = 0``, so the multiplier is 0): trained from scratch they would stay
0. The runner's ``schedule=sage`` and :func:`sage_param_group_fn` follow docs/algorithms.md §1
instead and give the matched biases SAGE too (they fine-tune pretrained, non-zero biases).

**(choice)** timm hands the optimizer tensors without names (timm 1.0.31 keeps ``param_names``
out of the groups), so the names come from the model that ``create_optimizer_v2`` is grouping: a
local of the timm frames that call the optimizer (:func:`_caller_names`). Names in the groups
(``param_names``, or ``(name, tensor)`` pairs) take precedence. Tensors passed without a model or
names keep the optimizers' default: SAGE everywhere. If timm grouped a model (``lr_scale`` or
``use_fallback`` present) and the model cannot be found, building the optimizer fails with a
message rather than SAGE-ing every tensor.

**(choice)** Registration writes into ``timm.optim._optim_factory.default_registry``, the registry
behind ``create_optimizer_v2``: timm 1.0.31 exports ``OptimizerRegistry`` and ``OptimInfo`` but no
function that registers into the default one, and no entry point or plug-in hook for optimizers.
``tests/test_integrations_timm.py`` fails first, naming it, if it moves; both this and the frames
above are tested with timm ``>=1.0.12,<1.1`` (:data:`TIMM_TESTED`; 1.0.11 has no registry). The
registered entries are the factories :func:`adamw_sage` / :func:`adamax_sage`, not the classes, so
the optimizer is the plain class. Registry names have no underscore:
``create_optimizer_v2`` keeps only the text after the last ``_`` (``lookahead_adamwsage`` works).
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Mapping, Sequence

import torch

from adaptune.common.extras import require
from adaptune.common.families import family_patterns

from ..patterns import select_names
from ..sage import AdamaxSAGE, AdamWSAGE, sage_param_groups

__all__ = ["adamax_sage", "adamw_sage", "register_sage_optimizers", "sage_param_group_fn", "sage_split_groups"]

#: the timm versions this module is tested with (its private registry and the frames it reads)
TIMM_TESTED = ">=1.0.12,<1.1"


def sage_param_group_fn(
    family: str = "vit",
    *,
    weight_decay: float = 0.05,
    sage_patterns: Sequence[str] | None = None,
    no_decay: Sequence[str] | None = None,
) -> Callable[[torch.nn.Module], list[dict]]:
    """A ``param_group_fn`` for ``create_optimizer_v2``: the model's :func:`sage_param_groups`.

    The groups carry ``sage`` and their own ``weight_decay`` (0 for the family's ``no_decay``
    tensors and the model's ``no_weight_decay()`` names). timm skips its own grouping when given a
    ``param_group_fn``, so there is no layer decay on this path.
    """

    def groups(model: torch.nn.Module) -> list[dict]:
        skip = tuple(no_decay) if no_decay is not None else tuple(family_patterns(family, "no_decay"))
        skip += tuple(getattr(model, "no_weight_decay", lambda: ())())
        return sage_param_groups(model, family=family, sage_patterns=sage_patterns, no_decay=skip, weight_decay=weight_decay)

    return groups


def _as_groups(params) -> list[dict]:
    """``params`` as a list of group dicts with lists of tensors; ``(name, tensor)`` pairs become ``param_names``."""
    items = list(params)
    if items and not isinstance(items[0], dict):
        items = [{"params": items}]
    groups = []
    for group in items:
        group = dict(group)
        tensors = group["params"]
        tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
        if tensors and all(isinstance(t, tuple) for t in tensors):
            group["param_names"] = [n for n, _ in tensors]
            tensors = [t for _, t in tensors]
        group["params"] = tensors
        groups.append(group)
    return groups


def _caller_names(tensors: Sequence[torch.Tensor]) -> dict[int, str] | None:
    """``id(tensor) -> name`` from the model that the calling ``timm.optim`` code is grouping, or None.

    Walks up past this module's frames, then through the consecutive ``timm.optim`` frames (timm
    1.0.31: ``OptimizerRegistry.create_optimizer``, local ``model_or_params``, and
    ``create_optimizer_v2``) and takes the first ``nn.Module`` local that owns every tensor.
    """
    wanted = {id(t) for t in tensors}
    frame = sys._getframe(1)
    try:
        while frame is not None and frame.f_globals.get("__name__") == __name__:
            frame = frame.f_back
        while frame is not None and str(frame.f_globals.get("__name__", "")).startswith("timm.optim"):
            for value in list(frame.f_locals.values()):
                if isinstance(value, torch.nn.Module):
                    names = {id(p): n for n, p in value.named_parameters()}
                    if wanted <= names.keys():
                        return names
            frame = frame.f_back
        return None
    finally:
        del frame


def _one_d(name: str, tensor: torch.Tensor) -> bool:
    """timm's no-decay rule for tensors (``weight_decay_exclude_1d``): biases and other 1-d tensors."""
    return tensor.ndim <= 1 or name.endswith(".bias")


def sage_split_groups(
    params, *, family: str = "vit", sage_patterns: Sequence[str] | str | None = None, names: Mapping[int, str] | None = None
) -> list[dict]:
    """timm's parameter groups split for the SAGE optimizers (see the module docstring).

    Args:
        params: tensors, ``(name, tensor)`` pairs or group dicts, as an optimizer takes them.
        family: the model family whose ``sage`` patterns apply (``common/families.py``).
        sage_patterns: name substrings of the SAGE tensors (default: the family's).
        names: ``id(tensor) -> name``; default: the groups' ``param_names``, else the model that
            timm's ``create_optimizer`` is grouping (found only when called from timm).

    Returns:
        Groups with a ``sage`` flag: a group that already has one is kept as given; every other
        group becomes its SAGE part (the matched tensors of 2 or more dimensions whose names do not
        end in ``.bias``) and its plain part (all of a ``use_fallback`` group), each keeping the
        group's other keys (``lr_scale``, ``weight_decay``, ...). Without any names the groups are
        returned unflagged (the optimizers' default: SAGE).

    Raises:
        ConfigError: the patterns match no parameter.
        RuntimeError: timm grouped a model (``lr_scale`` / ``use_fallback``) but no names were found.
    """
    groups = _as_groups(params)
    todo = [g for g in groups if "sage" not in g]
    if not todo:
        return groups
    if names is None and not all("param_names" in g for g in todo):
        names = _caller_names([t for g in todo for t in g["params"]])
        if names is None:
            if any("lr_scale" in g or "use_fallback" in g for g in todo):
                import timm

                raise RuntimeError(
                    f"adaptune's timm integration did not find the model behind timm's parameter groups "
                    f"(timm {timm.__version__}; tested with timm{TIMM_TESTED}), so it cannot tell which tensors "
                    "get SAGE. Pass param_group_fn=sage_param_group_fn(...) to create_optimizer_v2 instead."
                )
            return groups
    group_names = [list(g["param_names"]) if "param_names" in g else [names[id(t)] for t in g["params"]] for g in todo]
    patterns = (
        (sage_patterns,)
        if isinstance(sage_patterns, str)
        else tuple(sage_patterns)
        if sage_patterns
        else tuple(family_patterns(family, "sage"))
    )
    chosen = set(select_names([n for ns in group_names for n in ns], patterns, "sage_patterns"))
    own_names = dict(zip(map(id, todo), group_names))
    out = []
    for group in groups:
        if "sage" in group:
            out.append(group)
            continue
        gnames = own_names[id(group)]
        fallback = bool(group.get("use_fallback", False))
        flags = [n in chosen and not fallback and not _one_d(n, t) for n, t in zip(gnames, group["params"])]
        for flag in (True, False):
            idx = [i for i, f in enumerate(flags) if f == flag]
            if not idx:
                continue
            part = {**group, "params": [group["params"][i] for i in idx], "sage": flag}
            if "param_names" in group:
                part["param_names"] = [gnames[i] for i in idx]
            out.append(part)
    return out


def adamw_sage(params, *, family: str = "vit", sage_patterns: Sequence[str] | str | None = None, **kwargs) -> AdamWSAGE:
    """:class:`AdamWSAGE` on :func:`sage_split_groups` of ``params`` (timm's ``adamwsage``)."""
    return AdamWSAGE(sage_split_groups(params, family=family, sage_patterns=sage_patterns), **kwargs)


def adamax_sage(params, *, family: str = "vit", sage_patterns: Sequence[str] | str | None = None, **kwargs) -> AdamaxSAGE:
    """:class:`AdamaxSAGE` on :func:`sage_split_groups` of ``params`` (timm's ``adamaxsage``)."""
    return AdamaxSAGE(sage_split_groups(params, family=family, sage_patterns=sage_patterns), **kwargs)


NAMES: dict[str, Callable] = {"adamwsage": adamw_sage, "adamaxsage": adamax_sage}
CLASSES = {"adamwsage": AdamWSAGE, "adamaxsage": AdamaxSAGE}


def timm_default_registry():
    """The registry behind ``timm.optim.create_optimizer_v2`` (private in timm; see the module docstring)."""
    timm = require("timm", "adaptune.schedules.integrations.timm")
    try:
        from timm.optim import OptimizerRegistry
        from timm.optim._optim_factory import default_registry
    except ImportError as err:
        raise ImportError(
            f"timm {timm.__version__} has no timm.optim._optim_factory.default_registry; "
            f"adaptune's timm integration is tested with timm{TIMM_TESTED}"
        ) from err
    if not isinstance(default_registry, OptimizerRegistry):
        raise ImportError(
            f"timm {timm.__version__}: timm.optim._optim_factory.default_registry is not an "
            f"OptimizerRegistry; adaptune's timm integration is tested with timm{TIMM_TESTED}"
        )
    return default_registry


def register_sage_optimizers() -> list[str]:
    """Register ``adamwsage`` / ``adamaxsage`` in timm's optimizer registry (idempotent); their names."""
    registry = timm_default_registry()
    from timm.optim import OptimInfo

    for name, factory in NAMES.items():
        current = registry.get_optimizer_info(name).opt_class if name in registry.list_optimizers() else None
        if current is not factory:
            registry.register(
                OptimInfo(
                    name=name,
                    opt_class=factory,
                    has_betas=True,
                    description=f"{CLASSES[name].__name__} (SAGE on the patterned tensors, adaptune.schedules.sage)",
                )
            )
    return list(NAMES)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m adaptune.schedules.integrations.timm SCRIPT [ARGS...]``: register, then run SCRIPT as ``__main__``."""
    import importlib
    import runpy

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        raise SystemExit(
            "usage: python -m adaptune.schedules.integrations.timm train.py [train.py arguments]\n"
            "registers timm optimizers 'adamwsage' and 'adamaxsage', then runs train.py"
        )
    # the importable module, not this __main__ copy: one set of factories in timm's registry
    importlib.import_module("adaptune.schedules.integrations.timm").register_sage_optimizers()
    sys.argv = argv
    sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))  # as `python SCRIPT` does
    runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
