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

Every mistake is one :class:`ConfigError` line naming the file, the line and the column, and what
was found.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

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


def _check_columns(path: Path, rows, columns: Sequence[str]) -> None:
    if not rows:
        raise ConfigError(f"{path} holds no rows")
    found = list(rows[0][1].keys())
    missing = [c for c in columns if c not in found]
    if missing:
        raise ConfigError(f"{path}: column {', '.join(missing)} not found; the file has {', '.join(found)}")


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


def load_custom(data_files: Mapping[str, str], text_columns: Sequence[str], label_column: str,
                metric: str | None) -> tuple[DatasetSpec, list[Example], list[Example], list[Example] | None]:
    """(spec, train, dev, test or None) of the files ``data_files`` names."""
    for split in ("train", "dev"):
        if not data_files.get(split):
            raise ConfigError(f"task.name=custom needs task.data_files.{split} (a .csv, .tsv or .jsonl file)")
    unknown = [k for k in data_files if k not in ("train", "dev", "test")]
    if unknown:
        raise ConfigError(f"task.data_files.{unknown[0]} is unknown; allowed: train, dev, test")
    if len(text_columns) not in (1, 2):
        raise ConfigError(f"task.text_columns must name one or two columns, got {list(text_columns)}")
    columns = [*text_columns, label_column]
    tables = {}
    for split, name in data_files.items():
        if not name:
            continue
        path = Path(name).expanduser()
        rows = read_rows(path)
        _check_columns(path, rows, columns)
        tables[split] = (path, rows)
    path, rows = tables["train"]
    labels = _label_space(path, [row[label_column] for _, row in rows])
    if metric is not None and metric not in CUSTOM_METRICS:
        raise ConfigError(f"task.metric={metric} is unknown; allowed: {', '.join(CUSTOM_METRICS)}")
    regression = labels is None
    if metric in ("pearson", "spearman") and not regression:
        raise ConfigError(f"task.metric={metric} needs a regression target; {path}'s labels are classes "
                          f"({', '.join(labels[:5])})")
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
        for number, row in rows:
            where = f"{path}:{number}"
            texts = [row[c] for c in text_columns]
            empty = [c for c, t in zip(text_columns, texts) if t is None or str(t).strip() == ""]
            if empty:
                raise ConfigError(f"{where}: empty text in column {empty[0]}")
            examples.append(Example(str(texts[0]), str(texts[1]) if len(texts) > 1 else None,
                                    _label(row[label_column], labels, where)))
        out[split] = examples
    return spec, out["train"], out["dev"], out.get("test")
