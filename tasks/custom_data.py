"""Your own text-classification or regression data (``task=glue task.name=custom``): CSV, TSV or
JSON Lines files with the columns named in the config::

    adaptune task=glue task.name=custom task.data_files.train=a.csv task.data_files.dev=b.csv \\
        task.text_columns=[premise,hypothesis] task.label_column=label [task.metric=f1]

- Formats by extension: ``.csv`` (comma), ``.tsv`` (tab), ``.jsonl`` / ``.json`` (one JSON object
  per line); UTF-8 with a header row (CSV/TSV).
- ``text_columns``: one column (single sentences) or two (sentence pairs).
- Labels: strings or integers are classes (names in sorted order; integers by value), a column
  whose training values are numbers with a fraction is a regression target (MSE loss; metric
  pearson). (choice) Decided on the training file; dev / test labels must be among its classes.
- ``metric``: accuracy | f1 | matthews | pearson | spearman; null: accuracy (classification) or
  pearson (regression). f1 is binary F1 of the second class in sorted order (``1`` for 0/1 labels).
- Splits: ``train`` and ``dev`` required, ``test`` optional (evaluated at the end).
- Instead of files, ``task.hf_dataset``: a Hugging Face dataset id (``+ task.hf_config``), read
  from the hub through ``datasets.load_dataset`` when online, or a local directory of .csv / .json
  / .parquet files (``load_dataset`` infers the splits from the file names: train.csv,
  validation.csv, ...). ``task.hf_splits.{train,dev,test}`` name the dataset's splits (default
  train / validation / none). Columns and labels are handled as for files: ``datasets``'
  ``ClassLabel`` integers are classes by value. (choice) Separate keys, not an ``hf://`` path in
  ``data_files``: an id, its configuration and its split names are three things, each checked and
  named in errors. A dataset that cannot be downloaded (offline, ``HF_DATASETS_OFFLINE=1`` /
  ``HF_HUB_OFFLINE=1`` without it in the datasets cache) is one line naming the id; in offline
  mode a dataset already in the cache loads from it, as ``datasets`` does.

Every mistake is one :class:`ConfigError` line naming the file (the dataset and split), the line
(row) and the column, and what was found.
"""

from __future__ import annotations

import csv
import json
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from adaptune.common.errors import ConfigError

from .glue_data import DatasetSpec, Example, read_text

FORMATS = {".csv": ",", ".tsv": "\t", ".jsonl": "json", ".json": "json"}
CUSTOM_METRICS = ("accuracy", "f1", "matthews", "pearson", "spearman")


def read_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) of a CSV / TSV / JSON Lines file."""
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ConfigError(f"{path}: unknown format '{path.suffix}'; allowed: {', '.join(FORMATS)}")
    if not path.is_file():
        raise ConfigError(f"{path} does not exist")
    text = read_text(path)
    if kind == "json":
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{path}:{number}: not a JSON object per line ({err.msg})") from None
            if not isinstance(row, dict):
                raise ConfigError(f"{path}:{number}: expected a JSON object, found {type(row).__name__}")
            rows.append((number, row))
        return rows
    reader = csv.DictReader(text.splitlines(), delimiter=kind)
    return [(number, row) for number, row in enumerate(reader, 2)]


def _check_columns(path: Path | str, rows, columns: Sequence[str], holder: str = "the file") -> None:
    if not rows:
        raise ConfigError(f"{path} holds no rows")
    found = list(rows[0][1].keys())
    missing = [c for c in columns if c not in found]
    if missing:
        raise ConfigError(f"{path}: column {', '.join(missing)} not found; {holder} has {', '.join(found)}")


def _one_line(err: BaseException) -> str:
    """``Type: first line``, with what datasets puts below a generic first line ("An error occurred
    while generating the dataset": the next line, else the cause's first and last lines)."""
    lines = [t.strip() for t in str(err).splitlines() if t.strip()]
    line = f"{type(err).__name__}: {lines[0][:200]}" if lines else type(err).__name__
    if len(lines) > 1:
        return f"{line}: {lines[1][:240]}"
    cause = err.__cause__
    if cause is not None and str(cause).strip():
        more = [t.strip() for t in str(cause).splitlines() if t.strip()]
        line += f" ({type(cause).__name__}: {more[0][:120]}{' ... ' + more[-1][:120] if len(more) > 1 else ''})"
    return line


#: errors of a download that did not happen (no network, offline mode, the hub unreachable)
_DOWNLOAD_ERRORS = (
    "OfflineModeIsEnabled",
    "LocalEntryNotFoundError",
    "ConnectError",
    "ConnectTimeout",
    "ReadTimeout",
    "ProxyError",
    "SSLError",
)


def _download_failed(err: BaseException) -> bool:
    return isinstance(err, (ConnectionError, TimeoutError)) or any(cls.__name__ in _DOWNLOAD_ERRORS for cls in type(err).__mro__)


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """datasets' and huggingface_hub's logging at ERROR (no "Retrying in 8s" lines: a failed
    download ends as one ConfigError line) and their progress bars off, restored afterwards."""
    from datasets.utils import logging as ds_logging
    from huggingface_hub.utils import logging as hub_logging

    levels, bars = (ds_logging.get_verbosity(), hub_logging.get_verbosity()), ds_logging.is_progress_bar_enabled()
    ds_logging.set_verbosity_error()
    hub_logging.set_verbosity_error()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        ds_logging.set_verbosity(levels[0])
        hub_logging.set_verbosity(levels[1])
        if bars:
            ds_logging.enable_progress_bar()


def read_hf(
    dataset: str, config: str | None, splits: Mapping[str, str], columns: Sequence[str]
) -> dict[str, tuple[str, list[tuple[str, dict[str, Any]]]]]:
    """{our split: (its name in messages, [(where, row)])} of the dataset's ``splits`` (ours ->
    theirs), through ``datasets.load_dataset``."""
    what = f"task.hf_dataset={dataset}" + (f" (task.hf_config={config})" if config else "")
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"{what} needs the PyPI package datasets (pip install 'adaptune[runner]')") from None
    local = Path(dataset).expanduser()
    try:
        with _quiet_datasets():
            loaded = datasets.load_dataset(str(local) if local.is_dir() else dataset, config)
    except Exception as err:  # noqa: BLE001 - hub, network and format errors all end as one line
        if _download_failed(err):
            why = (
                "offline mode is on (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE) and it is not in the datasets cache"
                if datasets.config.HF_HUB_OFFLINE
                else "no network, or the hub is unreachable"
            )
            raise ConfigError(
                f"{what} could not be downloaded from the Hugging Face hub ({_one_line(err)}): {why}; "
                "use local files instead (task.data_files.train=..., or task.hf_dataset=a directory "
                "of .csv / .json / .parquet files)"
            ) from None
        raise ConfigError(f"{what} cannot be loaded ({_one_line(err)})") from None
    tables = {}
    for ours, theirs in splits.items():
        if theirs not in loaded:
            raise ConfigError(f"task.hf_splits.{ours}={theirs}: {dataset} has no split {theirs}; it has {', '.join(loaded)}")
        name = f"{dataset}" + (f" ({config})" if config else "") + f" split {theirs}"
        split = loaded[theirs]
        found = list(split.column_names)
        missing = [c for c in columns if c not in found]
        if missing:
            raise ConfigError(f"{name}: column {', '.join(missing)} not found; the split has {', '.join(found)}")
        data = split.select_columns(list(dict.fromkeys(columns))).to_dict()
        rows = [(f"{name} row {i}", dict(zip(data, values))) for i, values in enumerate(zip(*data.values()))]
        _check_columns(name, rows, columns, "the split")
        tables[ours] = (name, rows)
    return tables


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    try:
        float(str(value))
        return True
    except ValueError:
        return False


def _label_space(path: Path, values: list[Any]) -> tuple[str, ...] | None:
    """Class names in id order, or None for a regression target."""
    if all(_is_number(v) for v in values):
        numbers = [float(v) for v in values]
        if any(not math.isfinite(x) for x in numbers):
            raise ConfigError(f"{path}: the label column holds a non-finite number")
        if any(x != int(x) for x in numbers):
            return None
        return tuple(str(int(x)) for x in sorted(set(numbers)))
    return tuple(sorted({str(v) for v in values}))


def _label(value: Any, labels: tuple[str, ...] | None, where: str) -> float | int:
    if labels is None:
        if not _is_number(value):
            raise ConfigError(f"{where}: label {value!r} is not a number (the training labels are a regression target)")
        return float(value)
    key = str(int(float(value))) if _is_number(value) and float(value) == int(float(value)) else str(value)
    if key not in labels:
        raise ConfigError(f"{where}: label {value!r} is not one of the training labels ({', '.join(labels)})")
    return labels.index(key)


def load_custom(
    data_files: Mapping[str, str],
    text_columns: Sequence[str],
    label_column: str,
    metric: str | None,
    hf_dataset: str | None = None,
    hf_config: str | None = None,
    hf_splits: Mapping[str, str | None] | None = None,
) -> tuple[DatasetSpec, list[Example], list[Example], list[Example] | None]:
    """(spec, train, dev, test or None) of the files ``data_files`` names, or of the Hugging Face
    dataset ``hf_dataset`` (its ``hf_splits``: ours -> its split names)."""
    if hf_dataset is None:
        for split in ("train", "dev"):
            if not data_files.get(split):
                raise ConfigError(
                    f"task.name=custom needs task.data_files.{split} (a .csv, .tsv or .jsonl file) or task.hf_dataset"
                )
    unknown = [k for k in data_files if k not in ("train", "dev", "test")]
    if unknown:
        raise ConfigError(f"task.data_files.{unknown[0]} is unknown; allowed: train, dev, test")
    if len(text_columns) not in (1, 2):
        raise ConfigError(f"task.text_columns must name one or two columns, got {list(text_columns)}")
    columns = [*text_columns, label_column]
    if hf_dataset is not None:
        splits = {k: v for k, v in (hf_splits or {"train": "train", "dev": "validation"}).items() if v}
        for split in ("train", "dev"):
            if split not in splits:
                raise ConfigError(f"task.hf_splits.{split} must name a split of {hf_dataset}")
        tables = read_hf(hf_dataset, hf_config, splits, columns)
    else:
        tables = {}
        for split, name in data_files.items():
            if not name:
                continue
            path = Path(name).expanduser()
            rows = read_rows(path)
            _check_columns(path, rows, columns)
            tables[split] = (path, [(f"{path}:{number}", row) for number, row in rows])
    path, rows = tables["train"]
    labels = _label_space(path, [row[label_column] for _, row in rows])
    if metric is not None and metric not in CUSTOM_METRICS:
        raise ConfigError(f"task.metric={metric} is unknown; allowed: {', '.join(CUSTOM_METRICS)}")
    regression = labels is None
    if metric in ("pearson", "spearman") and not regression:
        raise ConfigError(
            f"task.metric={metric} needs a regression target; {path}'s labels are classes ({', '.join(labels[:5])})"
        )
    if metric in ("accuracy", "f1", "matthews") and regression:
        raise ConfigError(f"task.metric={metric} needs class labels; {path}'s labels are numbers with fractions")
    if metric == "f1" and len(labels) != 2:
        raise ConfigError(f"task.metric=f1 is binary F1; {path} has {len(labels)} classes")
    main = metric or ("pearson" if regression else "accuracy")
    metrics = (main, *(m for m in (("pearson", "spearman") if regression else ("accuracy",)) if m != main))
    spec = DatasetSpec("custom", labels, metrics, main, tuple(text_columns))
    out = {}
    for split, (path, rows) in tables.items():
        examples = []
        for where, row in rows:
            texts = [row[c] for c in text_columns]
            empty = [c for c, t in zip(text_columns, texts) if t is None or str(t).strip() == ""]
            if empty:
                raise ConfigError(f"{where}: empty text in column {empty[0]}")
            examples.append(
                Example(str(texts[0]), str(texts[1]) if len(texts) > 1 else None, _label(row[label_column], labels, where))
            )
        out[split] = examples
    return spec, out["train"], out["dev"], out.get("test")
