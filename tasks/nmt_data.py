"""Data for the NMT task: importing fairseq safely, the three data paths, the binarised cache.

The task reads one on-disk format, the one ``fairseq-preprocess`` writes (``dict.<lang>.txt`` and
``<split>.<src>-<tgt>.<lang>.{bin,idx}``). Three ways to get it (``task.data``):

``binarized``
    A directory already made by ``fairseq-preprocess`` (fairseq's IWSLT'14 recipe:
    ``examples/translation/prepare-iwslt14.sh`` in the fairseq repository then ``fairseq-preprocess --source-lang de
    --target-lang en --trainpref $TEXT/train --validpref $TEXT/valid --testpref $TEXT/test
    --destdir data-bin/iwslt14.tokenized.de-en``). Used as is.
``raw``
    Parallel plain-text files ``<split>.<src>`` / ``<split>.<tgt>`` (one sentence a line). A joint
    sentencepiece model is trained on the training text, every split is encoded and binarised
    into ``<cache_dir>/raw-<hash>/`` in fairseq-preprocess's format (so ``fairseq-train`` reads it
    too), with the untokenised validation/test references kept beside it for BLEU.
``demo``
    The offline demo corpus: German–English example sentences of the Debian ``trans-de-en``
    dictionary (``/usr/share/trans/de-en``), split deterministically into train/valid/test by a
    hash of the German sentence, then treated like ``raw``.

The cache directory name is a hash of the inputs' contents and of every setting that changes
the result, so re-runs reuse it and a change rebuilds it. It is written to a temporary
directory and renamed into place, so concurrent runs (a multirun) never see half a cache.

fairseq is imported only through :func:`import_fairseq`, which undoes its import side effects.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import types
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

from adaptune.common.errors import ConfigError

log = logging.getLogger("adaptune")

DATA_KINDS = ("binarized", "raw", "demo")
DEMO_PATH = "/usr/share/trans/de-en"
SUBWORD_TOOLS = ("sentencepiece",)
SUBWORD_MODEL_TYPES = ("bpe", "unigram")
#: Bumped when the cache layout or the demo corpus extraction changes.
CACHE_VERSION = 1

_FAIRSEQ: types.SimpleNamespace | None = None


# --------------------------------------------------------------------------- fairseq import
def _purge_fairseq_configs() -> int:
    """Remove what ``import fairseq`` put in Hydra's global ConfigStore; returns how many.

    fairseq stores its dataclasses as root configs (``config``, ``task``, ``model``,
    ``optimizer``, ...) and as options of the groups ``task``, ``model``, ``optimizer``,
    ``criterion``, ``lr_scheduler``, ... (provider "fairseq"). Left there, a later composition in
    the same process (the next job of a multirun) could pick one up, e.g. ``task=translation``
    would silently compose fairseq's config instead of failing. fairseq as a library (what this
    task uses) never reads them back.
    """
    from hydra.core.config_store import ConfigStore

    try:
        from fairseq.dataclass.configs import FairseqConfig

        root_names = {f"{k}.yaml" for k in FairseqConfig.__dataclass_fields__} | {"config.yaml"}
    except ImportError:  # pragma: no cover
        root_names = set()
    removed = 0

    def walk(d: dict, depth: int) -> None:
        nonlocal removed
        for key in list(d):
            value = d[key]
            if isinstance(value, dict):
                walk(value, depth + 1)
                if not value and depth > 0:
                    del d[key]
                continue
            provider = getattr(value, "provider", None)
            if provider == "fairseq" or (depth == 0 and key in root_names and provider is None):
                del d[key]
                removed += 1

    repo = ConfigStore.instance().repo
    walk(repo, 0)
    for group in [k for k, v in repo.items() if isinstance(v, dict) and not v]:
        del repo[group]
    return removed


def import_fairseq() -> types.SimpleNamespace:
    """Import the parts of fairseq the task uses, once, and undo the import's side effects.

    Side effects undone: the root logger's level and handlers (fairseq calls
    ``logging.basicConfig(level=DEBUG)`` at import), and fairseq's entries in Hydra's
    ConfigStore (see :func:`_purge_fairseq_configs`). fairseq's own loggers are set to WARNING
    (its INFO lines are about its CLI). Import-time warnings (``torch.jit.script`` deprecation)
    are silenced.
    """
    global _FAIRSEQ
    if _FAIRSEQ is not None:
        return _FAIRSEQ
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    logging.getLogger("fairseq").setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import fairseq  # noqa: F401
            from fairseq import utils
            from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss
            from fairseq.data import Dictionary, LanguagePairDataset, data_utils, indexed_dataset
            from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_NAME_REGISTRY, ARCH_MODEL_REGISTRY
            from fairseq.sequence_generator import SequenceGenerator
    except ImportError as err:
        from adaptune.common.extras import FAIRSEQ_HINT, missing_message

        hint = (missing_message(err) if isinstance(err, ModuleNotFoundError) else None) or FAIRSEQ_HINT
        raise ConfigError(f"task=nmt: {hint} ({err})") from err
    finally:
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
        root.setLevel(level)
        if "fairseq" in sys.modules:  # also after a partly failed import
            _purge_fairseq_configs()
    _FAIRSEQ = types.SimpleNamespace(
        version=fairseq.__version__,
        utils=utils,
        Dictionary=Dictionary,
        LanguagePairDataset=LanguagePairDataset,
        data_utils=data_utils,
        indexed_dataset=indexed_dataset,
        label_smoothed_nll_loss=label_smoothed_nll_loss,
        SequenceGenerator=SequenceGenerator,
        ARCH_MODEL_REGISTRY=ARCH_MODEL_REGISTRY,
        ARCH_CONFIG_REGISTRY=ARCH_CONFIG_REGISTRY,
        ARCH_MODEL_NAME_REGISTRY=ARCH_MODEL_NAME_REGISTRY,
    )
    return _FAIRSEQ


# --------------------------------------------------------------------------- demo corpus
_ANNOTATION = re.compile(r"\{[^}]*\}|\[[^\]]*\]|<[^>]*>|\([^)]*\)")
_SENTENCE_START = "\"'„‚“‘"


def _clean(text: str) -> str:
    text = text.split(";")[0]  # first of several alternatives
    text = " ".join(_ANNOTATION.sub(" ", text).split())
    for p in ".,?!":
        text = text.replace(" " + p, p)
    return text


def _is_sentence(text: str, min_words: int) -> bool:
    return (
        len(text.split()) >= min_words
        and text[-1] in ".!?"
        and (text[0].isupper() or text[0].isdigit() or text[0] in _SENTENCE_START)
        and "/" not in text
        and "…" not in text
        and "..." not in text
    )


def parse_trans_de_en(path: str | Path, min_words: int = 4) -> list[tuple[str, str]]:
    """German–English example sentences of the Ding dictionary file (``trans-de-en``).

    Entries are ``German :: English`` with sub-entries separated by ``|`` on both sides. Keeps
    sub-entry pairs where both sides are sentences (start upper-case, end in . ! or ?, no
    ``/`` alternatives), German with at least ``min_words`` words; drops annotations such as
    ``{m}``, ``[coll.]``, ``<...>`` and ``(...)``; the first German occurrence wins.
    """
    pairs: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("#") or "::" not in line:
                continue
            de, en = line.rstrip("\n").split("::", 1)
            de_parts, en_parts = de.split("|"), en.split("|")
            if len(de_parts) != len(en_parts):
                continue
            for d, e in zip(de_parts, en_parts):
                d, e = _clean(d), _clean(e)
                if d and e and _is_sentence(d, min_words) and _is_sentence(e, 3):
                    pairs.setdefault(d, e)
    return sorted(pairs.items())


def split_demo(
    pairs: Sequence[tuple[str, str]], valid_per_mille: int = 50, test_per_mille: int = 50
) -> dict[str, tuple[list[str], list[str]]]:
    """train/valid/test by a hash of the German side: stable across runs and dictionary versions."""
    out: dict[str, tuple[list[str], list[str]]] = {s: ([], []) for s in ("train", "valid", "test")}
    for de, en in pairs:
        bucket = int(hashlib.sha1(de.encode("utf-8")).hexdigest()[:8], 16) % 1000
        split = "test" if bucket < test_per_mille else "valid" if bucket < test_per_mille + valid_per_mille else "train"
        out[split][0].append(de)
        out[split][1].append(en)
    return out


# --------------------------------------------------------------------------- raw text
def _read_lines(path: Path) -> list[str]:
    with open(path, encoding="utf-8", newline="\n") as f:
        return [line.rstrip("\n").rstrip("\r") for line in f]


def read_parallel(data_dir: Path, split: str, src: str, tgt: str, required: bool) -> tuple[list[str], list[str]] | None:
    """``<split>.<src>`` and ``<split>.<tgt>`` of ``data_dir`` with equal line counts, or None."""
    s_path, t_path = data_dir / f"{split}.{src}", data_dir / f"{split}.{tgt}"
    if not s_path.is_file() or not t_path.is_file():
        if required:
            missing = s_path if not s_path.is_file() else t_path
            raise ConfigError(
                f"task.data=raw: {missing} is missing; task.data_dir needs "
                f"train/valid(/test).{src} and .{tgt} text files, one sentence a line"
            )
        return None
    s_lines, t_lines = _read_lines(s_path), _read_lines(t_path)
    if len(s_lines) != len(t_lines):
        raise ConfigError(
            f"task.data_dir: {s_path.name} has {len(s_lines)} lines but {t_path.name} has "
            f"{len(t_lines)}; parallel files need one sentence pair per line"
        )
    if not s_lines:
        raise ConfigError(f"task.data_dir: {s_path} is empty")
    return s_lines, t_lines


# --------------------------------------------------------------------------- binarised cache
def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_root(cfg: Any) -> Path:
    """``task.cache_dir``, or ``outputs/.cache/nmt`` under the current directory."""
    return Path(cfg.cache_dir or Path.cwd() / "outputs" / ".cache" / "nmt").expanduser()


def subword_settings(cfg: Any) -> dict[str, Any]:
    """``task.subword`` as a plain dict (it enters the cache key)."""
    sw = cfg.subword
    return {
        "tool": sw.tool,
        "vocab_size": sw.vocab_size,
        "model_type": sw.model_type,
        "character_coverage": float(sw.character_coverage),
    }


def prepare_text_data(cfg: Any, src: str, tgt: str) -> Path:
    """Paths (b) and (c): the binarised cache directory for ``task.data`` raw or demo (built if needed)."""
    kind = cfg.data
    sub = subword_settings(cfg)
    splits_cfg = {"train": cfg.train_subset, "valid": cfg.valid_subset, "test": cfg.test_subset}
    if kind == "demo":
        demo = Path(cfg.demo_path)
        if not demo.is_file():
            raise ConfigError(
                f"task.data=demo needs the Debian trans-de-en dictionary at {demo} "
                "(apt-get install trans-de-en); or use task.data=raw / task.data=binarized with task.data_dir"
            )
        if {src, tgt} != {"de", "en"}:
            raise ConfigError(
                f"task.data=demo is German-English; task.source_lang/target_lang must be de/en "
                f"(either direction), got {src}/{tgt}"
            )
        inputs = {"demo": _file_digest(demo)}
    else:
        data_dir = Path(str(cfg.data_dir or "")).expanduser()
        if not cfg.data_dir or not data_dir.is_dir():
            raise ConfigError(
                f"task.data=raw needs task.data_dir, a directory with train/valid/test.{src} and .{tgt} "
                f"text files (got {cfg.data_dir!r})"
            )
        inputs = {}
        for name, split in splits_cfg.items():
            for lang in (src, tgt):
                p = data_dir / f"{split}.{lang}"
                if p.is_file():
                    inputs[f"{name}.{lang}"] = _file_digest(p)
    key = _digest(
        {"v": CACHE_VERSION, "kind": kind, "src": src, "tgt": tgt, "subword": sub, "splits": splits_cfg, "inputs": inputs}
    )[:16]
    out = cache_root(cfg) / f"{kind}-{src}-{tgt}-{key}"
    if (out / "meta.json").is_file():
        return out

    # Read and check everything before doing any work.
    if kind == "demo":
        pairs = parse_trans_de_en(demo)
        parts = split_demo(pairs)
        splits = {name: (de, en) if src == "de" else (en, de) for name, (de, en) in parts.items()}
    else:
        splits = {}
        for name, split in splits_cfg.items():
            got = read_parallel(data_dir, split, src, tgt, required=name != "test")
            if got is not None:
                splits[name] = got
    log.info("nmt: building the binarised cache %s (%s)", out, ", ".join(f"{k} {len(v[0])}" for k, v in splits.items()))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)
    try:
        _build_cache(tmp, splits, src, tgt, sub)
        (tmp / "meta.json").write_text(
            json.dumps(
                {
                    "version": CACHE_VERSION,
                    "kind": kind,
                    "source_lang": src,
                    "target_lang": tgt,
                    "subword": sub,
                    "sizes": {k: len(v[0]) for k, v in splits.items()},
                    "bpe": "sentencepiece",
                    "raw_refs": True,
                },
                indent=2,
            )
        )
        try:
            os.replace(tmp, out)
        except OSError:  # another process finished first: use its cache
            if not (out / "meta.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _build_cache(
    out: Path, splits: Mapping[str, tuple[list[str], list[str]]], src: str, tgt: str, sub: Mapping[str, Any]
) -> None:
    import sentencepiece as spm
    import torch

    fs = import_fairseq()
    train_src, train_tgt = splits["train"]
    text = out / "spm_train.txt"
    with open(text, "w", encoding="utf-8") as f:
        for line in list(train_src) + list(train_tgt):
            if line.strip():
                f.write(line.strip() + "\n")
    spm.set_random_generator_seed(1)
    spm.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(out / "spm"),
        vocab_size=int(sub["vocab_size"]),
        model_type=sub["model_type"],
        character_coverage=sub["character_coverage"],
        hard_vocab_limit=False,
        input_sentence_size=2_000_000,
        shuffle_input_sentence=True,
        bos_id=-1,
        eos_id=-1,
        pad_id=-1,
        unk_id=0,
        num_threads=2,
        minloglevel=2,
    )
    text.unlink()
    sp = spm.SentencePieceProcessor(model_file=str(out / "spm.model"))

    encoded = {name: (sp.encode(list(s), out_type=str), sp.encode(list(t), out_type=str)) for name, (s, t) in splits.items()}
    dicts = {}
    for side, lang in ((0, src), (1, tgt)):
        d = fs.Dictionary()
        for pieces in encoded["train"][side]:
            for p in pieces:
                d.add_symbol(p)
        d.finalize(threshold=0, nwords=-1, padding_factor=8)
        d.save(str(out / f"dict.{lang}.txt"))
        dicts[lang] = d
    for name, sides in encoded.items():
        for side, lang in ((0, src), (1, tgt)):
            d = dicts[lang]
            index, unk, eos = d.indices, d.unk(), d.eos()
            prefix = out / f"{name}.{src}-{tgt}.{lang}"
            builder = fs.indexed_dataset.make_builder(str(prefix) + ".bin", impl="mmap", vocab_size=len(d))
            for pieces in sides[side]:
                builder.add_item(torch.tensor([index.get(p, unk) for p in pieces] + [eos], dtype=torch.int32))
            builder.finalize(str(prefix) + ".idx")
        if name != "train":  # untokenised references for BLEU
            (out / f"{name}.raw.{tgt}").write_text("".join(line + "\n" for line in splits[name][1]), encoding="utf-8")


def check_binarized_dir(cfg: Any, src: str, tgt: str) -> Path:
    """Path (a): the fairseq-preprocess directory named by ``task.data_dir``, checked."""
    raw = cfg.data_dir
    options = (
        "task.data=binarized with task.data_dir=<fairseq-preprocess output, e.g. "
        "data-bin/iwslt14.tokenized.de-en>, task.data=raw with task.data_dir=<train/valid/test."
        f"{src},.{tgt} text files>, or task.data=demo (apt-get install trans-de-en)"
    )
    if not raw:
        raise ConfigError(f"task.data_dir is not set; NMT data options: {options}")
    data_dir = Path(str(raw)).expanduser()
    if not data_dir.is_dir():
        raise ConfigError(f"task.data_dir={raw} does not exist; NMT data options: {options}")
    for lang in (src, tgt):
        if not (data_dir / f"dict.{lang}.txt").is_file():
            raise ConfigError(
                f"task.data_dir={raw} has no dict.{lang}.txt, so it is not a fairseq-preprocess "
                f"output for {src}-{tgt}; NMT data options: {options}"
            )
    return data_dir


def split_prefix(data_dir: Path, split: str, src: str, tgt: str, lang: str) -> Path | None:
    """Prefix of ``<split>.<src>-<tgt>.<lang>`` (or the ``<tgt>-<src>`` naming), if it exists."""
    for a, b in ((src, tgt), (tgt, src)):
        prefix = data_dir / f"{split}.{a}-{b}.{lang}"
        if (Path(str(prefix) + ".idx")).is_file():
            return prefix
    return None


def read_refs(data_dir: Path, split: str, tgt: str) -> list[str] | None:
    path = data_dir / f"{split}.raw.{tgt}"
    return _read_lines(path) if path.is_file() else None
