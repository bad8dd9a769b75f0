"""The NLI datasets of the DPS paper's out-of-domain protocol: readers of their original files, the
Hugging Face hub, and their label spaces.

Every set is read into :class:`adaptune.tasks.glue_data.Example` with labels in MNLI's order
(:data:`NLI_LABELS`: 0 entailment, 1 neutral, 2 contradiction); the 2-way sets (SciTail, RTE) use
0 entailment, 1 not entailment (SciTail's ``neutral``, RTE's ``not_entailment``). Rows without a
gold label are skipped (SNLI's ``"-"``, the hub's ``-1``).

Original formats (a directory per dataset, ``task.ood.data_dirs.<name>``):

- MNLI, RTE: the GLUE files (``dev_matched.tsv`` and, as the set ``mnli_mm``, ``dev_mismatched.tsv``
  of the same directory; ``dev.tsv``), read by :mod:`adaptune.tasks.glue_data`;
- SNLI 1.0 (``snli_1.0.zip``): ``snli_1.0_{train,dev,test}.jsonl``, one JSON object a line with
  ``sentence1``, ``sentence2`` and ``gold_label`` (``"-"`` where the annotators did not agree);
- SICK (``SICK.zip``): ``SICK.txt``, tab-separated with a header row (``pair_ID``, ``sentence_A``,
  ``sentence_B``, ``entailment_label`` = ENTAILMENT | NEUTRAL | CONTRADICTION, ...,
  ``SemEval_set`` = TRAIN | TRIAL | TEST); TRIAL is the dev split;
- SciTail 1.1 (``SciTailV1.1.zip``): ``dgem_format/scitail_1.0_structure_{dev,test}.tsv`` (the
  reference's files) when present, else ``tsv_format/scitail_1.0_{dev,test}.tsv``; no header,
  premise, hypothesis, label (``entails`` | ``neutral``), dgem adding a fourth column (the
  hypothesis graph, not read); the directory may be ``SciTailV1.1`` or one of its folders.

**(choice)** Hub names: ``nyu-mll/glue`` (mnli, rte), ``stanfordnlp/snli``, ``RobZamp/sick`` (the
former canonical ``sick``), ``allenai/scitail`` (``tsv_format``), as the reference repository's
loading scripts read them (``script/sick.py``, ``script/scitail.py``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adaptune.common.errors import ConfigError

from .glue_data import Example, get_spec, read_text, read_tsv

#: the 3-way label space of the training sets (MNLI's and SNLI's order)
NLI_LABELS = ("entailment", "neutral", "contradiction")
#: split -> SICK's SemEval_set value
SICK_PARTS = {"train": "TRAIN", "dev": "TRIAL", "test": "TEST"}


@dataclass(frozen=True)
class NLISet:
    name: str  # "snli": the metric prefix (test/snli/accuracy) and the key
    title: str  # for messages
    two_way: bool  # labelled entailment / not: scored on 3-way predictions mapped
    files: dict  # split -> file name(s) inside the directory, tried in order
    get: str  # what to download, for the offline message
    hub: tuple  # (path, config or None, {split: hub split})
    hub_label: Callable[[Any], int | None]  # hub label -> ours (None: unlabelled, skipped)


def _identity_label(value: Any) -> int | None:
    return None if value is None or int(value) < 0 else int(value)


def _scitail_label(value: Any) -> int | None:
    return {"entails": 0, "neutral": 1}.get(str(value).strip())


SETS: dict[str, NLISet] = {
    "mnli": NLISet(
        "mnli",
        "MNLI (matched)",
        False,
        {"dev": ("dev_matched.tsv",), "test": ("dev_matched.tsv",)},
        "GLUE's MNLI (download_glue_data.py)",
        ("nyu-mll/glue", "mnli", {"dev": "validation_matched", "test": "validation_matched"}),
        _identity_label,
    ),
    # the same GLUE MNLI directory's other dev file (task.ood.data_dirs.mnli serves both)
    "mnli_mm": NLISet(
        "mnli_mm",
        "MNLI (mismatched)",
        False,
        {"dev": ("dev_mismatched.tsv",), "test": ("dev_mismatched.tsv",)},
        "GLUE's MNLI (download_glue_data.py)",
        ("nyu-mll/glue", "mnli", {"dev": "validation_mismatched", "test": "validation_mismatched"}),
        _identity_label,
    ),
    "snli": NLISet(
        "snli",
        "SNLI 1.0",
        False,
        {"train": ("snli_1.0_train.jsonl",), "dev": ("snli_1.0_dev.jsonl",), "test": ("snli_1.0_test.jsonl",)},
        "SNLI 1.0 (https://nlp.stanford.edu/projects/snli/snli_1.0.zip)",
        ("stanfordnlp/snli", None, {"train": "train", "dev": "validation", "test": "test"}),
        _identity_label,
    ),
    "sick": NLISet(
        "sick",
        "SICK",
        False,
        {"dev": ("SICK.txt",), "test": ("SICK.txt",)},
        "SICK (https://zenodo.org/record/2787612/files/SICK.zip)",
        ("RobZamp/sick", None, {"dev": "validation", "test": "test"}),
        _identity_label,
    ),
    "scitail": NLISet(
        "scitail",
        "SciTail 1.1",
        True,
        # (choice) the reference's dgem_format files first, else tsv_format: the same
        # premise / hypothesis / label columns (dgem adds a fourth, the hypothesis graph)
        {
            s: (f"dgem_format/scitail_1.0_structure_{s}.tsv", f"tsv_format/scitail_1.0_{s}.tsv", f"scitail_1.0_{s}.tsv")
            for s in ("dev", "test")
        },
        "SciTail 1.1 (https://ai2-public-datasets.s3.amazonaws.com/scitail/SciTailV1.1.zip)",
        ("allenai/scitail", "tsv_format", {"dev": "validation", "test": "test"}),
        _scitail_label,
    ),
    "rte": NLISet(
        "rte",
        "RTE",
        True,
        {"dev": ("dev.tsv",), "test": ("dev.tsv",)},
        "GLUE's RTE (download_glue_data.py)",
        ("nyu-mll/glue", "rte", {"dev": "validation", "test": "validation"}),
        _identity_label,
    ),
}
OOD_SETS = tuple(SETS)


# ------------------------------------------------------------------------------ readers
def read_snli_jsonl(path: Path) -> list[Example]:
    """SNLI 1.0 (or MultiNLI) jsonl: rows whose ``gold_label`` is not one of the three (``"-"``)
    are skipped."""
    examples = []
    for lineno, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            gold, a, b = row["gold_label"], row["sentence1"], row["sentence2"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ConfigError(
                f"{path}:{lineno}: not an SNLI jsonl row ({type(err).__name__}: {err}); "
                "expected JSON objects with sentence1, sentence2, gold_label"
            ) from None
        if gold in NLI_LABELS:
            examples.append(Example(a, b, NLI_LABELS.index(gold)))
    return examples


def read_sick(path: Path, split: str) -> list[Example]:
    """SICK.txt: the rows of ``split`` (train / dev = TRIAL / test) by the ``SemEval_set`` column."""
    lines = [line.rstrip("\r") for line in read_text(path).split("\n") if line.strip()]
    header = lines[0].split("\t") if lines else []
    needed = ("sentence_A", "sentence_B", "entailment_label", "SemEval_set")
    missing = [c for c in needed if c not in header]
    if missing:
        raise ConfigError(f"{path}: header lacks column(s) {', '.join(missing)}; expected SICK.txt from SICK.zip")
    a, b, lab, part = (header.index(c) for c in needed)
    examples = []
    for lineno, line in enumerate(lines[1:], 2):
        cols = [c.strip() for c in line.split("\t")]
        if len(cols) != len(header):
            raise ConfigError(f"{path}:{lineno}: expected {len(header)} tab-separated columns, found {len(cols)}")
        label = cols[lab].lower()
        if cols[part] == SICK_PARTS[split] and label in NLI_LABELS:
            examples.append(Example(cols[a], cols[b], NLI_LABELS.index(label)))
    return examples


def read_scitail_tsv(path: Path) -> list[Example]:
    """SciTail tsv_format (or dgem_format): premise, hypothesis, label (entails | neutral)."""
    examples = []
    for lineno, line in enumerate(read_text(path).split("\n"), 1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        cols = line.split("\t")
        label = _scitail_label(cols[2]) if len(cols) >= 3 else None
        if label is None:
            raise ConfigError(
                f"{path}:{lineno}: expected premise<TAB>hypothesis<TAB>entails|neutral, "
                f"found {len(cols)} column(s){f' and label {cols[2]!r}' if len(cols) >= 3 else ''}"
            )
        examples.append(Example(cols[0], cols[1], label))
    return examples


#: the set whose directory a set reads (task.ood.data_dirs.<that>): MNLI's two dev files share one
DIRECTORY_OF = {"mnli_mm": "mnli"}


def read_file(nset: NLISet, path: Path, split: str) -> list[Example]:
    if nset.name in ("mnli", "mnli_mm", "rte"):
        return read_tsv(get_spec(DIRECTORY_OF.get(nset.name, nset.name)), path)
    if nset.name == "snli":
        return read_snli_jsonl(path)
    if nset.name == "sick":
        return read_sick(path, split)
    return read_scitail_tsv(path)


# ------------------------------------------------------------------------------ sources
def find_local(nset: NLISet, directory: str, split: str, key: str) -> Path:
    """The file of ``split`` of ``nset`` in ``directory`` (the first of its names there); ``key``
    names the setting in errors (a missing directory or file is one line naming the dataset and
    the key)."""
    root = Path(directory).expanduser()
    names = nset.files[split]
    for name in names:
        if (root / name).is_file():
            return root / name
    raise ConfigError(
        f"{key}={directory}: no {nset.title} file {' or '.join(names)} there; get {nset.get} and point {key} at its directory"
    )


def load_local(nset: NLISet, directory: str, split: str, key: str) -> list[Example]:
    """``split`` of ``nset`` from ``directory`` in its original format (:func:`find_local`)."""
    return read_file(nset, find_local(nset, directory, split, key), split)


def load_hub(nset: NLISet, split: str, key: str) -> list[Example]:
    """``split`` of ``nset`` from the Hugging Face hub; offline: one line naming what to get and ``key``."""
    path, config, splits = nset.hub
    try:
        import datasets

        ds = datasets.load_dataset(path, config, split=splits[split])
    except Exception as err:  # noqa: BLE001 - offline, hub down, auth: all end the same way
        raise ConfigError(
            f"could not load {nset.title} ({split}) from the Hugging Face hub ({type(err).__name__}); "
            f"offline? get {nset.get} and set {key}=/path/to/it"
        ) from None
    a_col, b_col = {
        "sick": ("sentence_A", "sentence_B"),
        "mnli": ("premise", "hypothesis"),
        "rte": ("sentence1", "sentence2"),
    }.get(nset.name, ("premise", "hypothesis"))
    examples = []
    for a, b, raw in zip(ds[a_col], ds[b_col], ds["label"]):
        label = nset.hub_label(raw)
        if label is not None:
            examples.append(Example(a, b, label))
    return examples


def load_set(name: str, directory: str | None, split: str, key: str) -> list[Example]:
    """``split`` (train / dev / test) of the set ``name``: from ``directory`` when given, else the hub."""
    nset = SETS[name]
    if split not in nset.files and split not in nset.hub[2]:
        raise ConfigError(f"{nset.title} has no {split} split here")
    return load_local(nset, directory, split, key) if directory else load_hub(nset, split, key)


def load_snli_task(data_dir: str | None) -> tuple[list[Example], list[list[Example]]]:
    """(train, [dev]) of SNLI as a training task (``task.name=snli``; ``task.data_dir``)."""
    return (load_set("snli", data_dir, "train", "task.data_dir"), [load_set("snli", data_dir, "dev", "task.data_dir")])
