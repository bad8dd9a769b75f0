"""Parameter-name patterns of the model families the project knows.

A pattern matches a parameter when it is a substring of the parameter's qualified name (the
reference implementations match this way). Kinds: ``sage`` (the tensors SAGE scales), ``dps``
(the weights DPS selects from), ``no_decay`` (no weight decay: biases, normalisation).

Tasks own their models, so a task supplies its model's patterns to the schedules
(``Task.param_patterns``); this table is what they (and users outside the runner, through
``adaptune.schedules.sage_param_groups(model, family=...)``) draw on. Families:

- ``bert``: Hugging Face BERT/MiniLM/ELECTRA-style encoders (``encoder.layer.N.attention.self.query``).
- ``roberta``: same module names as BERT, RoBERTa's classification head.
- ``deberta``: DeBERTa(-v2/v3): ``attention.self.query_proj`` etc. share BERT's prefixes.
- ``fairseq_transformer``: fairseq ``TransformerModel`` (``encoder.layers.N.self_attn.k_proj``).
- ``vit``: timm VisionTransformer (``blocks.N.attn.qkv``).
"""

from __future__ import annotations

from typing import Mapping

from .errors import ConfigError

#: kind -> name substrings, as a task hands them to a schedule.
ParamPatterns = Mapping[str, tuple[str, ...]]

_BERT_NO_DECAY = ("bias", "LayerNorm.weight", "LayerNorm.bias", "gamma", "beta")
_BERT_SAGE = ("attention.self", "attention.output.dense", "output.dense", "intermediate.dense")

FAMILY_PATTERNS: dict[str, dict[str, tuple[str, ...]]] = {
    "bert": {
        # docs/algorithms.md §1: the reference SAGE patterns for BERT-style models.
        "sage": _BERT_SAGE,
        # docs/algorithms.md §2: query/key/value, attention output, intermediate, output, pooler, classifier.
        "dps": ("attention.self", "attention.output.dense", "intermediate.dense", "output.dense", "pooler.dense", "classifier"),
        "no_decay": _BERT_NO_DECAY,
    },
    "roberta": {
        "sage": _BERT_SAGE,
        "dps": (
            "attention.self",
            "attention.output.dense",
            "intermediate.dense",
            "output.dense",
            "classifier.dense",
            "classifier.out_proj",
        ),
        "no_decay": _BERT_NO_DECAY,
    },
    "deberta": {
        "sage": _BERT_SAGE,
        "dps": ("attention.self", "attention.output.dense", "intermediate.dense", "output.dense", "pooler.dense", "classifier"),
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


def family_patterns(family: str, kind: str | None = None):
    """The patterns of ``kind`` for a model family, or all its kinds (a dict) when ``kind`` is None."""
    if family not in FAMILY_PATTERNS:
        raise ConfigError(f"unknown model family '{family}'; allowed: {', '.join(sorted(FAMILY_PATTERNS))}")
    return FAMILY_PATTERNS[family] if kind is None else FAMILY_PATTERNS[family][kind]


#: Hugging Face ``config.model_type`` -> pattern family (GLUE's task and the integrations infer the
#: family of a model with it).
HF_MODEL_TYPES: dict[str, str] = {
    "bert": "bert",
    "electra": "bert",
    "roberta": "roberta",
    "xlm-roberta": "roberta",
    "camembert": "roberta",
    "deberta": "deberta",
    "deberta-v2": "deberta",
}

#: peft's LoRA adapter matrices (``nn.Linear`` modules). Trailing dots: ``lora_A.`` never matches
#: ``lora_embedding_A`` (a ParameterDict, not a Linear).
LORA_SUBSTRINGS = ("lora_A.", "lora_B.")


def lora_patterns(patterns: ParamPatterns) -> ParamPatterns:
    """A family's patterns with SAGE and DPS narrowed to the LoRA adapters.

    **(choice)** DPS selects from both adapter matrices; SAGE scales ``lora_A`` only: its
    multiplier ``|I - Ī| / (Ī + ε²)`` with ``I = |θ ⊙ g|`` is exactly 0 wherever ``θ = 0``, and peft
    initialises ``lora_B`` to zeros, so a SAGE-scaled ``lora_B`` would never move and ``lora_A``
    (whose gradient is proportional to ``lora_B``) would never get one: the adapter would not train.
    ``lora_B`` is trained by the base optimizer's plain maths. ``no_decay`` stays the family's.
    """
    return {**patterns, "sage": ("lora_A.",), "dps": LORA_SUBSTRINGS}
