"""Parameter-name patterns per model family, used by SAGE, DPS and weight-decay grouping.

A pattern matches a parameter when it is a substring of the parameter's qualified name (the
reference implementations match this way). Families:

- ``bert``: Hugging Face BERT/MiniLM/ELECTRA-style encoders (``encoder.layer.N.attention.self.query``).
- ``roberta``: same module names as BERT.
- ``deberta``: DeBERTa(-v2/v3): ``attention.self.query_proj`` etc. share BERT's prefixes.
- ``fairseq_transformer``: fairseq ``TransformerModel`` (``encoder.layers.N.self_attn.k_proj``).
- ``vit``: timm VisionTransformer (``blocks.N.attn.qkv``).
"""
from __future__ import annotations

from typing import Iterable, Sequence

from common.errors import ConfigError

_BERT_NO_DECAY = ("bias", "LayerNorm.weight", "LayerNorm.bias", "gamma", "beta")

FAMILY_PATTERNS: dict[str, dict[str, tuple[str, ...]]] = {
    "bert": {
        # ALGORITHMS.md §1: the reference SAGE patterns for BERT-style models.
        "sage": ("attention.self", "attention.output.dense", "output.dense", "intermediate.dense"),
        # ALGORITHMS.md §2: query/key/value, attention output, intermediate, output, pooler, classifier.
        "dps": ("attention.self", "attention.output.dense", "intermediate.dense", "output.dense",
                "pooler.dense", "classifier"),
        "no_decay": _BERT_NO_DECAY,
    },
    "roberta": {
        "sage": ("attention.self", "attention.output.dense", "output.dense", "intermediate.dense"),
        "dps": ("attention.self", "attention.output.dense", "intermediate.dense", "output.dense",
                "classifier.dense", "classifier.out_proj"),
        "no_decay": _BERT_NO_DECAY,
    },
    "deberta": {
        "sage": ("attention.self", "attention.output.dense", "output.dense", "intermediate.dense"),
        "dps": ("attention.self", "attention.output.dense", "intermediate.dense", "output.dense",
                "pooler.dense", "classifier"),
        "no_decay": _BERT_NO_DECAY,
    },
    "fairseq_transformer": {
        # trailing dots: "self_attn" alone would also match self_attn_layer_norm
        "sage": ("self_attn.", "encoder_attn.", "fc1", "fc2"),
        "dps": ("self_attn.", "encoder_attn.", "fc1", "fc2"),
        "no_decay": ("bias", "layer_norm", "layernorm"),
    },
    "vit": {
        "sage": ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"),
        "dps": ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "head"),
        "no_decay": ("bias", "norm", "pos_embed", "cls_token", "reg_token"),
    },
}


def family_patterns(family: str, kind: str) -> tuple[str, ...]:
    """Default patterns of ``kind`` (``sage``, ``dps`` or ``no_decay``) for a model family."""
    if family not in FAMILY_PATTERNS:
        raise ConfigError(
            f"unknown model family '{family}'; allowed: {', '.join(sorted(FAMILY_PATTERNS))}")
    return FAMILY_PATTERNS[family][kind]


def matches(name: str, patterns: Iterable[str]) -> bool:
    """True when any pattern is a substring of ``name``."""
    return any(p in name for p in patterns)


def select_names(names: Sequence[str], patterns: Sequence[str], key: str) -> list[str]:
    """Names matched by ``patterns``; a pattern list that matches nothing is a ConfigError.

    ``key`` is the config key the patterns came from, used in the message.
    """
    chosen = [n for n in names if matches(n, patterns)]
    if not chosen:
        sample = ", ".join(list(names)[:6])
        raise ConfigError(
            f"{key}={list(patterns)} matches no parameter of this model (names look like: {sample}, ...)")
    return chosen
