"""Your own data (``task.name=custom``): CSV / TSV / JSON Lines with named columns, classes or a
regression target, one-line errors naming the file, line and column; a run on generated files."""
from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from conftest import FAST, TINY_BERT, compose

from adaptune.common.errors import ConfigError
from adaptune.runner.loop import run
from adaptune.tasks.custom_data import load_custom

WORDS = "good great fine bad awful poor movie film plot actor".split()


def _write(path, rows, fmt):
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path
    sep = "," if fmt == "csv" else "\t"
    cols = list(rows[0])
    path.write_text(sep.join(cols) + "\n" + "".join(sep.join(str(r[c]) for c in cols) + "\n" for r in rows))
    return path


def _rows(n, seed, label=lambda pos: "pos" if pos else "neg"):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        pos = rng.random() < 0.5
        words = [rng.choice(WORDS[:3] if pos else WORDS[3:6])] + [rng.choice(WORDS[6:]) for _ in range(4)]
        out.append({"review": " ".join(words), "stars": label(pos), "extra": 1})
    return out


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_formats_and_string_labels(tmp_path, fmt):
    files = {s: str(_write(tmp_path / f"{s}.{fmt}", _rows(20, i), fmt)) for i, s in enumerate(("train", "dev"))}
    spec, train, dev, test = load_custom(files, ["review"], "stars", None)
    assert spec.labels == ("neg", "pos") and spec.main_metric == "accuracy" and test is None
    assert len(train) == len(dev) == 20 and train[0].text_b is None
    assert {e.label for e in train} == {0, 1}


def test_integer_labels_pairs_and_a_regression_target(tmp_path):
    pairs = [{"a": f"s{i}", "b": f"t{i}", "y": i % 3} for i in range(9)]
    files = {"train": str(_write(tmp_path / "t.csv", pairs, "csv")), "dev": str(_write(tmp_path / "d.csv", pairs, "csv"))}
    spec, train, _, _ = load_custom(files, ["a", "b"], "y", "matthews")
    assert spec.labels == ("0", "1", "2") and spec.main_metric == "matthews" and train[4].text_b == "t4"
    scores = [{"a": f"s{i}", "y": i / 4} for i in range(9)]
    files = {"train": str(_write(tmp_path / "r.jsonl", scores, "jsonl")),
             "dev": str(_write(tmp_path / "rd.jsonl", scores, "jsonl"))}
    spec, train, _, _ = load_custom(files, ["a"], "y", None)
    assert spec.labels is None and spec.main_metric == "pearson" and train[1].label == 0.25


@pytest.mark.parametrize("mutate,message", [
    (lambda p: None, "column stars2 not found; the file has review, stars, extra"),
    (lambda p: p.write_text(p.read_text().replace("pos", "meh", 1)), "label 'meh' is not one of the training labels (neg, pos)"),
    (lambda p: p.write_text(p.read_text().replace("\n", "\n,pos,1\n", 1)), ":2: empty text in column review"),
])
def test_bad_files_are_one_line_errors_naming_file_line_column(tmp_path, mutate, message):
    train = _write(tmp_path / "train.csv", _rows(10, 0), "csv")
    dev = _write(tmp_path / "dev.csv", _rows(10, 1), "csv")
    label = "stars2" if "stars2" in message else "stars"
    mutate(dev)
    with pytest.raises(ConfigError) as err:
        load_custom({"train": str(train), "dev": str(dev)}, ["review"], label, None)
    named = train if label == "stars2" else dev   # a missing column is found in the first file read
    assert message in str(err.value) and str(named) in str(err.value) and "\n" not in str(err.value)


def test_config_mistakes_are_one_line(tmp_path):
    train = str(_write(tmp_path / "train.csv", _rows(10, 0), "csv"))
    with pytest.raises(ConfigError, match="needs task.data_files.dev"):
        load_custom({"train": train}, ["review"], "stars", None)
    with pytest.raises(ConfigError, match="task.metric=pearson needs a regression target"):
        load_custom({"train": train, "dev": train}, ["review"], "stars", "pearson")
    with pytest.raises(ConfigError, match="unknown format '.xlsx'"):
        load_custom({"train": train, "dev": str(tmp_path / "d.xlsx")}, ["review"], "stars", None)


@pytest.mark.e2e
def test_a_run_on_your_own_files_learns_and_reports_test(tmp_path):
    files = {s: _write(tmp_path / f"{s}.csv", _rows(n, i), "csv") for i, (s, n) in
             enumerate((("train", 64), ("dev", 16), ("test", 16)))}
    over = ["task=glue", "task.name=custom", *[f"task.data_files.{s}={p}" for s, p in files.items()],
            "task.text_columns=[review]", "task.label_column=stars", "task.metric=f1",
            *TINY_BERT, *FAST, "trainer.batch_size=8", "trainer.max_steps=32", "schedule.lr=5e-3"]
    res = run(compose(over), tmp_path / "run")
    assert res["main_metric"] == "f1" and res["task_name"] == "custom"
    assert res["test"] and "f1" in res["test"] and res["best"]["accuracy"] > 0.8
    bad = subprocess.run([sys.executable, "-m", "adaptune", *over[:-5], "task.label_column=nope",
                          f"hydra.run.dir={tmp_path / 'bad'}"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        f"adaptune: error: {files['train']}: column nope not found; the file has review, stars, extra"]
