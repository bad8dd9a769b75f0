"""What DPS and Mixout share about a model's ``nn.Linear`` layers: their weights by plain name
(also when a weight is parametrized for the Mix forward) and turning dropout off (both references
set it to 0)."""

from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize

#: how torch names a parametrized weight's tensor (``a.b.parametrizations.weight.original``)
PARAMETRIZED_SUFFIX = "parametrizations.weight.original"


def canonical_name(name: str) -> str:
    """``a.b.parametrizations.weight.original`` -> ``a.b.weight`` (other names unchanged)."""
    if name == PARAMETRIZED_SUFFIX:
        return "weight"
    if name.endswith("." + PARAMETRIZED_SUFFIX):
        return name[: -len(PARAMETRIZED_SUFFIX)] + "weight"
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
            "Dropout" in type(module).__name__ and isinstance(getattr(module, "p", None), float)
        )
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
