"""Neural machine translation with fairseq used as a library (``task.kind: nmt``).

The SAGE paper's IWSLT'14 German→English setting: a Transformer trained from scratch
(``transformer_iwslt_de_en``, smaller sizes through ``task.model``), label-smoothed
cross-entropy, token-based batches (``task.max_tokens``), beam search and BLEU, all driven by the
shared training loop so that the baseline, SAGE and DPS schedules apply unchanged.

fairseq is imported lazily inside the task (never at module import) through
:func:`adaptune.tasks.nmt_data.import_fairseq`, which also undoes the import's side effects on logging and
on Hydra's ConfigStore. Data paths (``task.data``: binarized | raw | demo) are described in
:mod:`adaptune.tasks.nmt_data`.

Batching follows ``fairseq-train``: the training set is sorted by length (ties broken by a
permutation seeded with the run's seed), filtered by ``max_source_positions`` /
``max_target_positions`` / ``max_tokens``, and cut once into batches of at most
``max_tokens`` tokens (``batch_by_size``); each epoch visits those batches in an order drawn from
a generator seeded by ``(seed, epoch)``, so :meth:`train_batches` is a pure function of them.

Loss: fairseq's ``label_smoothed_nll_loss`` summed over the target tokens, with
``sample_size = ntokens`` (target tokens incl. end-of-sentence), fairseq's convention.

Evaluation (splits ``dev`` and ``test``, driven by runner/evaluation.py: ``eval_step`` sums the
losses and beam-searches each batch's BLEU sentences, ``finalize`` scores them), all in nats:
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
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np
import torch

from adaptune.common.errors import ConfigError
from adaptune.common.families import ParamPatterns, family_patterns

from . import nmt_data
from .base import StepLoss, Task
from .config import NMTConfig

log = logging.getLogger("adaptune")

BPE_OPTIONS = {"subword_nmt": "subword_nmt", "sentencepiece": "sentencepiece", "none": None}
SPLITS = {"train": "train_subset", "dev": "valid_subset", "test": "test_subset"}


class EvalPlan(NamedTuple):
    """One evaluation batch: sentence indices, and whether it scores the loss and/or BLEU."""

    indices: np.ndarray
    loss: bool
    bleu: bool


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The fairseq model inside torch.compile / DDP wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


class TranslationTask(Task):
    kind = "nmt"
    schema = NMTConfig
    main_metric = "bleu"
    greater_is_better = True

    def __init__(self, cfg: Mapping[str, Any], run_dir: Path, seed: int):
        super().__init__(cfg, run_dir, seed)
        c: NMTConfig = self.cfg
        self.src, self.tgt = c.source_lang, c.target_lang
        self.max_tokens = c.max_tokens
        self.max_sentences = c.max_sentences
        self.eval_max_tokens = c.eval_max_tokens or c.max_tokens
        self.max_source_positions = c.max_source_positions
        self.max_target_positions = c.max_target_positions
        self.batch_multiple = c.required_batch_size_multiple
        self.beam = c.beam
        self.bleu_cap = c.eval_bleu_max_sentences
        self.label_smoothing = c.label_smoothing
        self.eval_bleu = c.eval_bleu
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
    def param_patterns(self, model: torch.nn.Module) -> ParamPatterns:
        return family_patterns("fairseq_transformer")

    @property
    def has_test(self) -> bool:
        return "test" in self.datasets

    def setup(self) -> None:
        c = self.cfg
        if c.data == "binarized":
            nmt_data.check_binarized_dir(c, self.src, self.tgt)  # before the slow fairseq import
        self.fs = fs = nmt_data.import_fairseq()
        # fairseq's attention passes a bool padding mask with a float causal mask; torch warns on
        # every run ("deprecated"), results are unaffected.
        warnings.filterwarnings("ignore", message="Support for mismatched key_padding_mask and attn_mask")
        if c.data == "binarized":
            self.data_dir = nmt_data.check_binarized_dir(c, self.src, self.tgt)
            split_names = {k: getattr(c, v) for k, v in SPLITS.items()}
            self.bpe = BPE_OPTIONS[c.bpe]
            self.detok_kind = c.detok
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
                raise ConfigError(
                    f"task.data_dir={self.data_dir} has no '{name}' split for {self.src}-{self.tgt} "
                    f"(expected {name}.{self.src}-{self.tgt}.{self.src}.idx; see task.{SPLITS[split]})"
                )
            self.datasets[split] = ds
            self.refs[split] = nmt_data.read_refs(self.data_dir, name, self.tgt)
        self._make_batches()
        if self.detok_kind == "moses":
            try:
                from sacremoses import MosesDetokenizer
            except ImportError as err:
                raise ConfigError("task.detok=moses needs sacremoses (pip install sacremoses); or set task.detok=none") from err
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
            raise ConfigError(
                f"task.data_dir={self.data_dir}: split '{name}' has {len(src)} source but {len(tgt)} target sentences"
            )
        return fs.LanguagePairDataset(
            src,
            src.sizes,
            self.src_dict,
            tgt,
            tgt.sizes,
            self.tgt_dict,
            left_pad_source=True,
            left_pad_target=False,
            shuffle=True,
        )

    def _valid_indices(self, split: str, indices: np.ndarray) -> np.ndarray:
        """Drop sentence pairs longer than the model's positions or than one batch can hold."""
        ds = self.datasets[split]
        max_tokens = self.max_tokens if split == "train" else self.eval_max_tokens
        keep = (
            (ds.src_sizes[indices] <= self.max_source_positions)
            & (ds.tgt_sizes[indices] <= self.max_target_positions)
            & (ds.num_tokens_vec(indices) <= max_tokens)
        )
        self.filtered[split] = int((~keep).sum())
        if self.filtered[split]:
            log.warning(
                "nmt: %d %s sentence pairs are longer than the positions / max_tokens limits and are skipped",
                self.filtered[split],
                split,
            )
        return indices[keep]

    def _batch(self, split: str, indices: np.ndarray, max_tokens: int) -> list[np.ndarray]:
        ds = self.datasets[split]
        batches = ds.batch_by_size(
            indices,
            max_tokens=max_tokens,
            max_sentences=self.max_sentences,
            required_batch_size_multiple=self.batch_multiple if split == "train" else 1,
        )
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
        arch = self.cfg.arch
        transformer_archs = sorted(a for a, m in fs.ARCH_MODEL_NAME_REGISTRY.items() if m == "transformer")
        if arch not in transformer_archs:
            raise ConfigError(f"task.arch='{arch}' is unknown; allowed: {', '.join(transformer_archs)}")
        model_cls = fs.ARCH_MODEL_REGISTRY[arch]
        parser = argparse.ArgumentParser(add_help=False)
        model_cls.add_args(parser)
        allowed = {a.dest for a in parser._actions}
        overrides = {k: v for k, v in self.cfg.model.items() if v is not None}
        unknown = sorted(set(overrides) - allowed)
        if unknown:
            raise ConfigError(
                f"task.model.{unknown[0]} is not an option of fairseq's {arch}; allowed: {', '.join(sorted(allowed))}"
            )
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
        return self.fs.label_smoothed_nll_loss(
            lprobs, target, self.label_smoothing, ignore_index=self.tgt_dict.pad(), reduce=True
        )

    def loss(self, model: torch.nn.Module, batch: Mapping[str, Any]) -> StepLoss:
        loss, _ = self._loss_terms(model, batch)
        return StepLoss(loss, float(batch["ntokens"]), int(batch["nsentences"]))

    # ------------------------------------------------------------------ evaluation
    # Plans: EvalPlan(indices, loss, bleu). Where the BLEU sentences are the loss batches (test,
    # or dev without eval_bleu_max_sentences), one batch serves both; otherwise the (capped) BLEU
    # batches follow the loss batches as plans of their own.
    def eval_batches(self, split: str) -> list[EvalPlan]:
        if split not in self._eval_batches:
            raise ConfigError(f"the NMT data has no '{split}' split")
        loss = self._eval_batches[split]
        if not self.eval_bleu:
            return [EvalPlan(b, True, False) for b in loss]
        bleu = self._bleu_batches[split]
        if len(loss) == len(bleu) and all(np.array_equal(a, b) for a, b in zip(loss, bleu)):
            return [EvalPlan(b, True, True) for b in loss]
        return [EvalPlan(b, True, False) for b in loss] + [EvalPlan(b, False, True) for b in bleu]

    def make_eval_batch(self, split: str, plan: EvalPlan) -> dict[str, Any]:
        return {"sample": self.make_batch(plan.indices, split), "loss": plan.loss, "bleu": plan.bleu}

    def eval_step(self, model: torch.nn.Module, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Loss sums over the batch's target tokens and/or the best beam-search hypothesis of each
        sentence, decoded: ``hyps = {sentence id: (tokenised text, detokenised text)}``."""
        sample, out = batch["sample"], {}
        if batch["loss"]:
            loss, nll = self._loss_terms(model, sample)
            out.update(loss=loss, nll_loss=nll, ntokens=int(sample["ntokens"]))
        if batch["bleu"]:
            hypos = self._generator(model).generate([unwrap(model)], sample)
            out["hyps"] = {
                int(sample_id): self._decode(hypos[i][0]["tokens"], "UNKNOWNTOKENINHYP")
                for i, sample_id in enumerate(sample["id"].tolist())
            }
        return out

    def finalize(self, split: str, reduced: Mapping[str, Any]) -> dict[str, float]:
        n = max(int(reduced.get("ntokens", 0)), 1)
        loss_sum, nll_sum = float(reduced.get("loss", 0.0)), float(reduced.get("nll_loss", 0.0))
        metrics = {"loss": loss_sum / n, "nll_loss": nll_sum / n, "ppl": math.exp(min(nll_sum / n, 50.0))}
        if self.eval_bleu:
            metrics.update(self._bleu(split, reduced.get("hyps", {})))
        return metrics

    def _generator(self, model: torch.nn.Module):
        c = self.cfg
        return self.fs.SequenceGenerator(
            [unwrap(model)],
            self.tgt_dict,
            beam_size=self.beam,
            max_len_a=c.max_len_a,
            max_len_b=c.max_len_b,
            len_penalty=c.lenpen,
        )

    def _decode(self, tokens: torch.Tensor, unk: str) -> tuple[str, str]:
        """(tokenised text with the subword split removed, detokenised text)."""
        text = self.tgt_dict.string(tokens.int().cpu(), self.bpe, unk_string=unk)
        detok = self._detok.detokenize(text.split()) if self._detok is not None else text
        return text, detok

    def _bleu(self, split: str, hyps: Mapping[int, tuple[str, str]]) -> dict[str, float]:
        """Corpus BLEU of the decoded hypotheses (by sentence id) against the references."""
        import sacrebleu

        ids = sorted(hyps)
        ds = self.datasets[split]
        hyp_tok, hyp_detok, ref_tok, ref_detok = [], [], [], []
        raw_refs = self.refs.get(split)
        for i in ids:
            h, hd = hyps[i]
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
        out: dict[str, Any] = {
            "data": self.cfg.data,
            "data_dir": str(getattr(self, "data_dir", "")),
            "pair": f"{self.src}-{self.tgt}",
        }
        for split, ds in self.datasets.items():
            out[f"{split}_sentences"] = len(ds)
        if self.datasets:
            out["src_vocab"], out["tgt_vocab"] = len(self.src_dict), len(self.tgt_dict)
            out["train_batches"] = len(self._train_batches)
            out["train_target_tokens"] = int(self.datasets["train"].tgt_sizes.sum())
        out.update({f"{k}_skipped": v for k, v in self.filtered.items() if v})
        return out
