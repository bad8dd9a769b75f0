"""Your own data (``task.name=custom``): CSV / TSV / JSON Lines with named columns, classes or a
regression target, one-line errors naming the file, line and column; a run on generated files."""

from __future__ import annotations

import json
import os
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
    files = {
        "train": str(_write(tmp_path / "r.jsonl", scores, "jsonl")),
        "dev": str(_write(tmp_path / "rd.jsonl", scores, "jsonl")),
    }
    spec, train, _, _ = load_custom(files, ["a"], "y", None)
    assert spec.labels is None and spec.main_metric == "pearson" and train[1].label == 0.25


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda p: None, "column stars2 not found; the file has review, stars, extra"),
        (
            lambda p: p.write_text(p.read_text().replace("pos", "meh", 1)),
            "label 'meh' is not one of the training labels (neg, pos)",
        ),
        (lambda p: p.write_text(p.read_text().replace("\n", "\n,pos,1\n", 1)), ":2: empty text in column review"),
    ],
)
def test_bad_files_are_one_line_errors_naming_file_line_column(tmp_path, mutate, message):
    train = _write(tmp_path / "train.csv", _rows(10, 0), "csv")
    dev = _write(tmp_path / "dev.csv", _rows(10, 1), "csv")
    label = "stars2" if "stars2" in message else "stars"
    mutate(dev)
    with pytest.raises(ConfigError) as err:
        load_custom({"train": str(train), "dev": str(dev)}, ["review"], label, None)
    named = train if label == "stars2" else dev  # a missing column is found in the first file read
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
    files = {
        s: _write(tmp_path / f"{s}.csv", _rows(n, i), "csv")
        for i, (s, n) in enumerate((("train", 64), ("dev", 16), ("test", 16)))
    }
    over = [
        "task=glue",
        "task.name=custom",
        *[f"task.data_files.{s}={p}" for s, p in files.items()],
        "task.text_columns=[review]",
        "task.label_column=stars",
        "task.metric=f1",
        *TINY_BERT,
        *FAST,
        "trainer.batch_size=8",
        "trainer.max_steps=32",
        "schedule.lr=5e-3",
    ]
    res = run(compose(over), tmp_path / "run")
    assert res["main_metric"] == "f1" and res["task_name"] == "custom"
    assert res["test"] and "f1" in res["test"] and res["best"]["accuracy"] > 0.8
    bad = subprocess.run(
        [sys.executable, "-m", "adaptune", *over[:-5], "task.label_column=nope", f"hydra.run.dir={tmp_path / 'bad'}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        f"adaptune: error: {files['train']}: column nope not found; the file has review, stars, extra"
    ]


# ------------------------------------------------------------------------------ task.hf_dataset
def _put(directory, split, rows, fmt):
    """``<split>.csv`` or ``<split>.parquet`` in ``directory``: load_dataset's split by file name."""
    if fmt == "csv":
        return _write(directory / f"{split}.csv", rows, "csv")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), directory / f"{split}.parquet")
    return directory / f"{split}.parquet"


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_hf_dataset_directory_reads_as_the_same_files(tmp_path, fmt):
    """A local directory through datasets.load_dataset (the code path of a hub id, without the
    download): the same examples, labels and spec as the same rows given as data_files."""
    rows = {s: _rows(n, i) for i, (s, n) in enumerate((("train", 30), ("validation", 12), ("test", 8)))}
    hub = tmp_path / "hub"
    hub.mkdir()
    for split, data in rows.items():
        _put(hub, split, data, fmt)
    files = {
        ours: str(_write(tmp_path / f"{ours}.csv", rows[theirs], "csv"))
        for ours, theirs in (("train", "train"), ("dev", "validation"), ("test", "test"))
    }
    expected = load_custom(files, ["review"], "stars", "f1")
    got = load_custom(
        {}, ["review"], "stars", "f1", hf_dataset=str(hub), hf_splits={"train": "train", "dev": "validation", "test": "test"}
    )
    assert got == expected and got[0].labels == ("neg", "pos") and len(got[3]) == 8
    # integer (ClassLabel-like) labels are classes by value; pairs as for files; no test by default
    pairs = [{"premise": f"p{i}", "hypothesis": f"h{i}", "label": i % 3} for i in range(9)]
    for split in ("train", "validation"):
        _put(hub, split, pairs, fmt)
    with pytest.raises(ConfigError) as err:  # the test split's columns differ: one line saying so
        load_custom({}, ["premise", "hypothesis"], "label", None, hf_dataset=str(hub))
    assert "cannot be loaded (" in str(err.value) and "\n" not in str(err.value)
    assert "the same columns" in str(err.value) or "column names don't match" in str(err.value)
    (hub / f"test.{fmt}").unlink()
    spec, train, dev, test = load_custom({}, ["premise", "hypothesis"], "label", None, hf_dataset=str(hub))
    assert spec.labels == ("0", "1", "2") and [e.label for e in train] == [i % 3 for i in range(9)]
    assert train[4].text_b == "h4" and test is None and len(dev) == 9


def test_hf_dataset_mistakes_are_one_line(tmp_path):
    hub = tmp_path / "hub"
    hub.mkdir()
    _write(hub / "train.csv", _rows(10, 0), "csv")
    _write(hub / "validation.csv", _rows(10, 1), "csv")
    cases = [
        (
            dict(hf_splits={"train": "train", "dev": "dev"}),
            f"task.hf_splits.dev=dev: {hub} has no split dev; it has train, validation",
        ),
        (dict(label="nope"), f"{hub} split train: column nope not found; the split has review, stars, extra"),
        (dict(hf_splits={"train": "train", "dev": None}), f"task.hf_splits.dev must name a split of {hub}"),
        (dict(hf_config="nope"), f"task.hf_dataset={hub} (task.hf_config=nope) cannot be loaded (ValueError: "),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError) as err:
            load_custom({}, ["review"], kwargs.pop("label", "stars"), None, hf_dataset=str(hub), **kwargs)
        assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


@pytest.mark.e2e  # a subprocess with the hub offline
def test_hf_dataset_in_offline_mode_is_one_line_naming_it(tmp_path, monkeypatch):
    """conftest sets HF_HUB_OFFLINE=1 (as HF_DATASETS_OFFLINE=1 does): a dataset id that is not in
    the datasets cache is one line naming it, saying it could not be downloaded and why."""
    import datasets

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    assert datasets.config.HF_HUB_OFFLINE
    with pytest.raises(ConfigError) as err:
        load_custom({}, ["sentence1", "sentence2"], "label", None, hf_dataset="nyu-mll/glue", hf_config="rte")
    message = str(err.value)
    assert "\n" not in message and message.startswith(
        "task.hf_dataset=nyu-mll/glue (task.hf_config=rte) could not be downloaded from the Hugging Face hub ("
    )
    assert "offline mode is on (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE) and it is not in the datasets cache" in message
    # HF_DATASETS_OFFLINE=1 alone: the same line, at once (no download tried); a local directory still loads
    hub = tmp_path / "hub"
    hub.mkdir()
    _write(hub / "train.csv", _rows(6, 0), "csv")
    _write(hub / "validation.csv", _rows(4, 1), "csv")
    code = (
        "import sys; from adaptune.tasks.custom_data import load_custom\n"
        f"print(len(load_custom({{}}, ['review'], 'stars', None, hf_dataset={str(hub)!r})[1]))\n"
        "load_custom({}, ['sentence1'], 'label', None, hf_dataset='nyu-mll/glue', hf_config='rte')"
    )
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf")},
    )
    assert proc.stdout.split() == ["6"]
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "adaptune.common.errors.ConfigError: task.hf_dataset=nyu-mll/glue (task.hf_config=rte) could not be "
            "downloaded from the Hugging Face hub ("
        )
        and "offline mode is on" in proc.stderr
    )


def test_hf_dataset_keys_are_checked():
    for over, message in [
        (["task.name=rte", "task.hf_dataset=nyu-mll/glue"], "task.hf_dataset is for task.name=custom"),
        (["task.name=custom", "task.hf_config=rte"], "task.hf_config names a configuration of task.hf_dataset"),
        (
            ["task.name=custom", "task.hf_dataset=x", "task.data_files.train=a.csv"],
            "task.hf_dataset and task.data_files.train are two sources of the data; give one",
        ),
    ]:
        from adaptune.common.schema import build
        from adaptune.tasks.config import GlueConfig

        with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
            build(GlueConfig, compose(["task=glue", *over]).task, "task")


@pytest.mark.e2e
def test_a_run_on_a_dataset_directory_and_an_unreachable_hub(tmp_path):
    hub = tmp_path / "hub"
    hub.mkdir()
    for i, (split, n) in enumerate((("train", 64), ("validation", 16))):
        _write(hub / f"{split}.csv", _rows(n, i), "csv")
    over = [
        "task=glue",
        "task.name=custom",
        f"task.hf_dataset={hub}",
        "task.text_columns=[review]",
        "task.label_column=stars",
        *TINY_BERT,
        *FAST,
        "trainer.batch_size=8",
        "trainer.max_steps=32",
        "schedule.lr=5e-3",
        f"task.feature_cache_dir={tmp_path / 'cache'}",
    ]
    res = run(compose(over), tmp_path / "run")
    assert res["task_name"] == "custom" and res["best"]["accuracy"] > 0.8
    # the hub unreachable, offline mode off: retried by huggingface_hub, then one line
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "0",
        "HF_DATASETS_OFFLINE": "0",
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "HF_DATASETS_CACHE": str(tmp_path / "hf"),
        "HF_HOME": str(tmp_path / "hfhome"),
    }
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "adaptune",
            *over[:2],
            "task.hf_dataset=nyu-mll/glue",
            "task.hf_config=rte",
            "task.text_columns=[sentence1,sentence2]",
            *TINY_BERT,
            *FAST,
            f"hydra.run.dir={tmp_path / 'bad'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1, bad.stderr
    assert (
        lines[0].startswith(
            "adaptune: error: task.hf_dataset=nyu-mll/glue (task.hf_config=rte) could not be "
            "downloaded from the Hugging Face hub ("
        )
        and "no network, or the hub is unreachable" in lines[0]
    )
