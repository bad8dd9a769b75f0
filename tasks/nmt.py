"""Neural machine translation with fairseq used as a library (``task.kind: nmt``).

The SAGE paper's IWSLT'14 German→English setting: a Transformer trained from scratch
(``transformer_iwslt_de_en``, smaller sizes through ``task.model``), label-smoothed
cross-entropy, token-based batches (``task.max_tokens``), beam search and BLEU, all driven by the
shared training loop so that the baseline, SAGE and DPS schedules apply unchanged.

fairseq is imported lazily inside the task (never at module import) through
:func:`tasks.nmt_data.import_fairseq`, which also undoes the import's side effects on logging and
on Hydra's ConfigStore. Data paths (``task.data``: binarized | raw | demo) are described in
:mod:`tasks.nmt_data`.

Batching follows ``fairseq-train``: the training set is sorted by length (ties broken by a
permutation seeded with the run's seed), filtered by ``max_source_positions`` /
``max_target_positions`` / ``max_tokens``, and cut once into batches of at most
``max_tokens`` tokens (``batch_by_size``); each epoch visits those batches in an order drawn from
a generator seeded by ``(seed, epoch)``, so :meth:`train_batches` is a pure function of them.

Loss: fairseq's ``label_smoothed_nll_loss`` summed over the target tokens, with
``sample_size = ntokens`` (target tokens incl. end-of-sentence), fairseq's convention.

Evaluation (``evaluate(model, "dev" | "test")``), all in nats:
``loss`` (label-smoothed, per target token), ``nll_loss``, ``ppl = exp(nll_loss)`` and, with
``task.eval_bleu: true`` (default), ``bleu``: sacrebleu's corpus BLEU of detokenised beam-search
output (``beam``, ``max_len_a``/``max_len_b``, ``lenpen``) against detokenised references. For
``raw``/``demo`` data the hypotheses are decoded with the sentencepiece model and scored against
the original text lines; for ``binarized`` data both sides are decoded from tokens, the subword
split removed (``task.bpe``) and Moses-detokenised (``task.detok``), and ``bleu_tok`` (BLEU on the
tokenised text, what fairseq-generate and most IWSLT papers report) is added. Dev BLEU runs on
the first ``eval_bleu_max_sentences`` sentences (null: all); test BLEU always uses the whole split.
With ``eval_bleu: false`` the main metric is the dev ``loss`` (lower is better) and no beam
search runs during training.
"""
from __future__ import annotations

import argparse
import logging
import math
import types
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from common.errors import ConfigError

from . import nmt_data
from .base import StepLoss, Task, move_to

log = logging.getLogger("adaptune")

BPE_OPTIONS = {"subword_nmt": "subword_nmt", "sentencepiece": "sentencepiece", "none": None}
DETOK_OPTIONS = ("moses", "none")
SPLITS = {"train": "train_subset", "dev": "valid_subset", "test": "test_subset"}


def _positive_int(cfg: Mapping[str, Any], key: str, allow_none: bool = False) -> int | None:
    value = cfg.get(key)
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"task.{key} must be a positive integer{' or null' if allow_none else ''}, got {value!r}")
    return value


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The fairseq model inside torch.compile / DDP wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


class TranslationTask(Task):
    kind = "nmt"
    main_metric = "bleu"
    greater_is_better = True

    def __init__(self, cfg: Mapping[str, Any], run_dir: Path, seed: int):
        super().__init__(cfg, run_dir, seed)
        c = self.cfg
        if c.get("data") not in nmt_data.DATA_KINDS:
            raise ConfigError(f"task.data='{c.get('data')}' is unknown; allowed: {', '.join(nmt_data.DATA_KINDS)}")
        self.src = str(c.get("source_lang") or "de")
        self.tgt = str(c.get("target_lang") or "en")
        if self.src == self.tgt:
            raise ConfigError(f"task.source_lang and task.target_lang must differ, both are '{self.src}'")
        self.max_tokens = _positive_int(c, "max_tokens")
        self.max_sentences = _positive_int(c, "max_sentences", allow_none=True)
        self.eval_max_tokens = _positive_int(c, "eval_max_tokens", allow_none=True) or self.max_tokens
        self.max_source_positions = _positive_int(c, "max_source_positions")
        self.max_target_positions = _positive_int(c, "max_target_positions")
        self.batch_multiple = _positive_int(c, "required_batch_size_multiple", allow_none=True) or 8
        self.beam = _positive_int(c, "beam")
        self.bleu_cap = _positive_int(c, "eval_bleu_max_sentences", allow_none=True)
        ls = c.get("label_smoothing", 0.1)
        if isinstance(ls, bool) or not isinstance(ls, (int, float)) or not 0.0 <= ls < 1.0:
            raise ConfigError(f"task.label_smoothing must be a number in [0, 1), got {ls!r}")
        self.label_smoothing = float(ls)
        if c.get("bpe", "subword_nmt") not in BPE_OPTIONS:
            raise ConfigError(f"task.bpe='{c.get('bpe')}' is unknown; allowed: {', '.join(BPE_OPTIONS)}")
        if c.get("detok", "moses") not in DETOK_OPTIONS:
            raise ConfigError(f"task.detok='{c.get('detok')}' is unknown; allowed: {', '.join(DETOK_OPTIONS)}")
        self.eval_bleu = bool(c.get("eval_bleu", True))
        if not self.eval_bleu:
            self.main_metric, self.greater_is_better = "loss", False
        self.fs: types.SimpleNamespace | None = None
        self.datasets: dict[str, Any] = {}
        self.refs: dict[str, list[str] | None] = {}
        self.filtered: dict[str, int] = {}
        self._train_batches: list[np.ndarray] = []
        self._eval_batches: dict[str, list[np.ndarray]] = {}
        self._bleu_batches: dict[str, list[np.ndarray]] = {}
        self._detok = None

    # ------------------------------------------------------------------ setup
    @property
    def family(self) -> str:
        return "fairseq_transformer"

    @property
    def has_test(self) -> bool:
        return "test" in self.datasets

    def setup(self) -> None:
        c = self.cfg
        if c["data"] == "binarized":
            nmt_data.check_binarized_dir(c, self.src, self.tgt)  # before the slow fairseq import
        self.fs = fs = nmt_data.import_fairseq()
        # fairseq's attention passes a bool padding mask with a float causal mask; torch warns on
        # every run ("deprecated"), results are unaffected.
        warnings.filterwarnings("ignore", message="Support for mismatched key_padding_mask and attn_mask")
        if c["data"] == "binarized":
            self.data_dir = nmt_data.check_binarized_dir(c, self.src, self.tgt)
            split_names = {k: c.get(v) or {"train": "train", "dev": "valid", "test": "test"}[k]
                           for k, v in SPLITS.items()}
            self.bpe = BPE_OPTIONS[c.get("bpe", "subword_nmt")]
            self.detok_kind = c.get("detok", "moses")
        else:
            self.data_dir = nmt_data.prepare_text_data(c, self.src, self.tgt)
            split_names = {"train": "train", "dev": "valid", "test": "test"}
            self.bpe, self.detok_kind = "sentencepiece", "none"
        self.src_dict = fs.Dictionary.load(str(self.data_dir / f"dict.{self.src}.txt"))
        self.tgt_dict = fs.Dictionary.load(str(self.data_dir / f"dict.{self.tgt}.txt"))
        for split, name in split_names.items():
            ds = self._load_split(name)
            if ds is None:
                if split == "test":
                    continue
                raise ConfigError(f"task.data_dir={self.data_dir} has no '{name}' split for {self.src}-{self.tgt} "
                                  f"(expected {name}.{self.src}-{self.tgt}.{self.src}.idx; see task.{SPLITS[split]})")
            self.datasets[split] = ds
            self.refs[split] = nmt_data.read_refs(self.data_dir, name, self.tgt)
        self._make_batches()
        if self.detok_kind == "moses":
            try:
                from sacremoses import MosesDetokenizer
            except ImportError as err:
                raise ConfigError("task.detok=moses needs sacremoses (pip install sacremoses); "
                                  "or set task.detok=none") from err
            self._detok = MosesDetokenizer(lang=self.tgt)
        log.info("nmt: %s", self.summary())

    def _load_split(self, name: str):
        fs = self.fs
        prefixes = [nmt_data.split_prefix(self.data_dir, name, self.src, self.tgt, lang) for lang in (self.src, self.tgt)]
        if prefixes[0] is None or prefixes[1] is None:
            return None
        src = fs.data_utils.load_indexed_dataset(str(prefixes[0]), self.src_dict, dataset_impl=None)
        tgt = fs.data_utils.load_indexed_dataset(str(prefixes[1]), self.tgt_dict, dataset_impl=None)
        if src is None or tgt is None:
            return None
        if len(src) != len(tgt):
            raise ConfigError(f"task.data_dir={self.data_dir}: split '{name}' has {len(src)} source but "
                              f"{len(tgt)} target sentences")
        return fs.LanguagePairDataset(src, src.sizes, self.src_dict, tgt, tgt.sizes, self.tgt_dict,
                                      left_pad_source=True, left_pad_target=False, shuffle=True)

    def _valid_indices(self, split: str, indices: np.ndarray) -> np.ndarray:
        """Drop sentence pairs longer than the model's positions or than one batch can hold."""
        ds = self.datasets[split]
        max_tokens = self.max_tokens if split == "train" else self.eval_max_tokens
        keep = ((ds.src_sizes[indices] <= self.max_source_positions)
                & (ds.tgt_sizes[indices] <= self.max_target_positions)
                & (ds.num_tokens_vec(indices) <= max_tokens))
        self.filtered[split] = int((~keep).sum())
        if self.filtered[split]:
            log.warning("nmt: %d %s sentence pairs are longer than the positions / max_tokens limits and are skipped",
                        self.filtered[split], split)
        return indices[keep]

    def _batch(self, split: str, indices: np.ndarray, max_tokens: int) -> list[np.ndarray]:
        ds = self.datasets[split]
        batches = ds.batch_by_size(indices, max_tokens=max_tokens, max_sentences=self.max_sentences,
                                   required_batch_size_multiple=self.batch_multiple if split == "train" else 1)
        return [np.asarray(b, dtype=np.int64) for b in batches]

    def _make_batches(self) -> None:
        fs = self.fs
        train = self.datasets["train"]
        with fs.data_utils.numpy_seed(self.seed):
            order = train.ordered_indices()  # random permutation, then stable sort by length
        self._train_batches = self._batch("train", self._valid_indices("train", order), self.max_tokens)
        for split in ("dev", "test"):
            if split not in self.datasets:
                continue
            ds = self.datasets[split]
            ds.shuffle = False
            idx = self._valid_indices(split, ds.ordered_indices())  # sorted by length
            self._eval_batches[split] = self._batch(split, idx, self.eval_max_tokens)
            if split == "dev" and self.bleu_cap:  # the first sentences of the file, in length order
                idx = idx[np.isin(idx, np.sort(idx)[: self.bleu_cap])]
            self._bleu_batches[split] = self._batch(split, idx, self.eval_max_tokens)

    # ------------------------------------------------------------------ model
    def _model_args(self) -> argparse.Namespace:
        fs = self.fs
        arch = self.cfg.get("arch", "transformer_iwslt_de_en")
        transformer_archs = sorted(a for a, m in fs.ARCH_MODEL_NAME_REGISTRY.items() if m == "transformer")
        if arch not in transformer_archs:
            raise ConfigError(f"task.arch='{arch}' is unknown; allowed: {', '.join(transformer_archs)}")
        model_cls = fs.ARCH_MODEL_REGISTRY[arch]
        parser = argparse.ArgumentParser(add_help=False)
        model_cls.add_args(parser)
        allowed = {a.dest for a in parser._actions}
        overrides = {k: v for k, v in dict(self.cfg.get("model") or {}).items() if v is not None}
        unknown = sorted(set(overrides) - allowed)
        if unknown:
            raise ConfigError(f"task.model.{unknown[0]} is not an option of fairseq's {arch}; allowed: "
                              f"{', '.join(sorted(allowed))}")
        args = argparse.Namespace(**overrides)
        args.arch = arch
        args.max_source_positions = self.max_source_positions
        args.max_target_positions = self.max_target_positions
        fs.ARCH_CONFIG_REGISTRY[arch](args)  # fills the architecture's defaults for unset options
        return args

    def build_model(self) -> torch.nn.Module:
        args = self._model_args()
        model_cls = self.fs.ARCH_MODEL_REGISTRY[args.arch]
        holder = types.SimpleNamespace(source_dictionary=self.src_dict, target_dictionary=self.tgt_dict)
        try:
            return model_cls.build_model(args, holder)
        except ValueError as err:  # e.g. share_all_embeddings with two dictionaries
            raise ConfigError(f"task.model: {err}") from err

    # ------------------------------------------------------------------ training
    def train_batches(self, epoch: int) -> Sequence[np.ndarray]:
        order = np.random.default_rng([self.seed, int(epoch)]).permutation(len(self._train_batches))
        return [self._train_batches[i] for i in order]

    def make_batch(self, plan: Sequence[int], split: str = "train") -> dict[str, Any]:
        ds = self.datasets[split]
        return ds.collater([ds[int(i)] for i in plan])

    def _loss_terms(self, model: torch.nn.Module, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        net_output = model(**batch["net_input"])
        lprobs = unwrap(model).get_normalized_probs(net_output, log_probs=True)
        lprobs = lprobs.view(-1, lprobs.size(-1))
        target = batch["target"].view(-1)
        return self.fs.label_smoothed_nll_loss(lprobs, target, self.label_smoothing,
                                               ignore_index=self.tgt_dict.pad(), reduce=True)

    def loss(self, model: torch.nn.Module, batch: Mapping[str, Any]) -> StepLoss:
        loss, _ = self._loss_terms(model, batch)
        return StepLoss(loss, float(batch["ntokens"]), int(batch["nsentences"]))

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, model: torch.nn.Module, split: str = "dev") -> dict[str, float]:
        if split not in self._eval_batches:
            raise ConfigError(f"the NMT data has no '{split}' split")
        device = next(model.parameters()).device
        loss_sum = nll_sum = 0.0
        ntokens = 0
        for plan in self._eval_batches[split]:
            batch = move_to(self.make_batch(plan, split), device)
            loss, nll = self._loss_terms(model, batch)
            loss_sum += float(loss)
            nll_sum += float(nll)
            ntokens += int(batch["ntokens"])
        n = max(ntokens, 1)
        metrics = {"loss": loss_sum / n, "nll_loss": nll_sum / n, "ppl": math.exp(min(nll_sum / n, 50.0))}
        if self.eval_bleu:
            metrics.update(self.bleu(model, split))
        return metrics

    def _decode(self, tokens: torch.Tensor, unk: str) -> tuple[str, str]:
        """(tokenised text with the subword split removed, detokenised text)."""
        text = self.tgt_dict.string(tokens.int().cpu(), self.bpe, unk_string=unk)
        detok = self._detok.detokenize(text.split()) if self._detok is not None else text
        return text, detok

    def translate(self, model: torch.nn.Module, split: str) -> dict[int, torch.Tensor]:
        """Beam-search output tokens (best hypothesis) for the BLEU sentences of ``split``, by index."""
        model = unwrap(model)
        device = next(model.parameters()).device
        c = self.cfg
        generator = self.fs.SequenceGenerator(
            [model], self.tgt_dict, beam_size=self.beam, max_len_a=float(c.get("max_len_a", 1.2)),
            max_len_b=int(c.get("max_len_b", 10)), len_penalty=float(c.get("lenpen", 1.0)))
        out: dict[int, torch.Tensor] = {}
        for plan in self._bleu_batches[split]:
            batch = move_to(self.make_batch(plan, split), device)
            hypos = generator.generate([model], batch)
            for i, sample_id in enumerate(batch["id"].tolist()):
                out[int(sample_id)] = hypos[i][0]["tokens"]
        return out

    def bleu(self, model: torch.nn.Module, split: str) -> dict[str, float]:
        import sacrebleu

        hyps_tok = self.translate(model, split)
        ids = sorted(hyps_tok)
        ds = self.datasets[split]
        hyp_tok, hyp_detok, ref_tok, ref_detok = [], [], [], []
        raw_refs = self.refs.get(split)
        for i in ids:
            h, hd = self._decode(hyps_tok[i], "UNKNOWNTOKENINHYP")
            hyp_tok.append(h)
            hyp_detok.append(hd)
            if raw_refs is not None:
                ref_detok.append(raw_refs[i])
            else:
                r, rd = self._decode(ds.tgt[i], "UNKNOWNTOKENINREF")
                ref_tok.append(r)
                ref_detok.append(rd)
        metrics = {"bleu": sacrebleu.corpus_bleu(hyp_detok, [ref_detok]).score if ids else 0.0}
        if raw_refs is None:
            metrics["bleu_tok"] = sacrebleu.corpus_bleu(hyp_tok, [ref_tok], tokenize="none").score if ids else 0.0
        metrics["bleu_sentences"] = float(len(ids))
        return metrics

    # ------------------------------------------------------------------ reporting
    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"data": self.cfg.get("data"), "data_dir": str(getattr(self, "data_dir", "")),
                               "pair": f"{self.src}-{self.tgt}"}
        for split, ds in self.datasets.items():
            out[f"{split}_sentences"] = len(ds)
        if self.datasets:
            out["src_vocab"], out["tgt_vocab"] = len(self.src_dict), len(self.tgt_dict)
            out["train_batches"] = len(self._train_batches)
            out["train_target_tokens"] = int(self.datasets["train"].tgt_sizes.sum())
        out.update({f"{k}_skipped": v for k, v in self.filtered.items() if v})
        return out
