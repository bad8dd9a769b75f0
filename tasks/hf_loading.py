"""Loading a pretrained Hugging Face model quietly: transformers 5 prints a table per load (and a
progress bar) that says, for a fine-tuning run, what is expected: the new task head is missing
from the checkpoint. Here that is one info line; what a user must see still warns: weights missing
outside the task head, and shape mismatches."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

log = logging.getLogger("adaptune")

#: Parameter-name prefixes of the sequence-classification heads transformers builds fresh.
HEAD_PREFIXES = ("classifier.", "score.", "pre_classifier.", "logits_proj.", "sequence_summary.")


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' own logging at ERROR and its progress bars off, restored afterwards."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def reset_head(model) -> list[str]:
    """Re-initialise the classification head's Linear layers with ``nn.Linear``'s own
    ``reset_parameters`` (kaiming-uniform a=sqrt(5), bias U(+-1/sqrt(fan_in))), from the global
    RNG; the names of the layers reset."""
    import torch

    names = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and f"{name}.".startswith(HEAD_PREFIXES):
            module.reset_parameters()
            names.append(name)
    if not names:
        from adaptune.common.errors import ConfigError

        raise ConfigError(
            f"task.model.head_init=torch_default: {type(model).__name__} has no head named "
            f"{', '.join(p.rstrip('.') for p in HEAD_PREFIXES)}"
        )
    return names


def load_pretrained(model_cls, path: str, **kwargs):
    """``model_cls.from_pretrained(path, **kwargs)`` with one line about its loading report."""
    with quiet_transformers():
        model, info = model_cls.from_pretrained(path, output_loading_info=True, **kwargs)
    missing = sorted(map(str, info.get("missing_keys", ())))
    head = [k for k in missing if k.startswith(HEAD_PREFIXES)]
    other = [k for k in missing if k not in head]
    unexpected = sorted(map(str, info.get("unexpected_keys", ())))
    log.info(
        "loaded %s: %s newly initialised (the task head)%s",
        path,
        ", ".join(head) or "nothing",
        f"; {len(unexpected)} checkpoint tensors unused (e.g. pretraining heads)" if unexpected else "",
    )
    if other:
        log.warning(
            "%s: %d weights are not in the checkpoint and were newly initialised: %s%s",
            path,
            len(other),
            ", ".join(other[:5]),
            " ..." if len(other) > 5 else "",
        )
    for item in info.get("mismatched_keys", ()):
        log.warning("%s: shape mismatch, newly initialised: %s", path, item)
    return model


#: Model types whose position ids start after the padding index (``padding_idx + 1``), so that
#: ``max_position_embeddings`` counts ``pad_token_id + 1`` positions no token uses (RoBERTa's 514).
PADDING_OFFSET_TYPES = ("roberta", "xlm-roberta", "camembert", "longformer", "data2vec-text", "roberta-prelayernorm", "xmod")


def position_limit(config) -> int | None:
    """The longest input a model with learned absolute positions embeds (``max_position_embeddings``
    less RoBERTa's padding offset); None for relative or rotary positions (DeBERTa-v3, ALiBi,
    RoPE), which take any length. (choice) From the model's config, not the tokenizer's
    ``model_max_length``, which is often a sentinel and ignores ``task.model.config_overrides``."""
    if getattr(config, "position_biased_input", True) is False:  # DeBERTa-v2/v3: relative only
        return None
    if getattr(config, "position_embedding_type", "absolute") not in (None, "absolute"):
        return None
    if getattr(config, "rope_theta", None) is not None or getattr(config, "rope_parameters", None) is not None:
        return None
    n = getattr(config, "max_position_embeddings", None)
    if not isinstance(n, int) or n <= 0:
        return None
    if getattr(config, "model_type", "") in PADDING_OFFSET_TYPES:
        pad = getattr(config, "pad_token_id", None)
        n -= (1 if pad is None else int(pad)) + 1
    return n
