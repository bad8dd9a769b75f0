"""What a run prints without W&B (start and end blocks, progress lines in a log), and W&B
settings the way W&B users expect (environment variables, a new run id when starting over)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from conftest import compose, glue_overrides, write_glue

from adaptune.common.errors import ConfigError
from adaptune.runner.config import LoggerConfig
from adaptune.runner.loggers import RUN_ID_FILE, wandb_settings
from adaptune.runner.loop import run


@pytest.mark.e2e
def test_a_logged_run_says_what_ran_where_and_where_its_results_are(tmp_path):
    """Run as a batch job would (stderr is a pipe): the start block, one progress line per log
    point and no carriage returns, the end block with the metric, the results file and the
    ``wandb sync`` command of the offline W&B run."""
    data = write_glue(tmp_path / "rte", "rte", n_train=32, n_dev=8)
    run_dir = tmp_path / "r"
    args = [
        *glue_overrides(
            data,
            "rte",
            "trainer.batch_size=8",
            "trainer.max_steps=4",
            "trainer.log_every=2",
            "trainer.progress=true",
            "logger=wandb",
        ),
        f"hydra.run.dir={run_dir}",
    ]
    out = subprocess.run(
        [sys.executable, "-m", "adaptune", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "WANDB_MODE": "offline"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    assert "\r" not in text
    assert f"adaptune: run {run_dir} (fresh)" in text
    assert "task glue/rte" in text and "schedule baseline, seed 42" in text
    assert "device cpu (" in text and "precision fp32" in text and "world size 1" in text
    assert "4 optimizer steps" in text
    assert "step 2/4 (50%) loss " in text and "step 4/4 (100%) loss " in text
    res = json.loads((run_dir / "results.json").read_text())
    best = res["best"]["accuracy"]
    assert (
        f"adaptune: done: accuracy best {best:.4f} at step {res['best_step']}, "
        f"final {res['final']['accuracy']:.4f} at step 4 (completed)"
    ) in text
    assert f"results: {run_dir / 'results.json'}" in text
    sync = [line for line in text.splitlines() if "wandb sync" in line]
    assert len(sync) == 1 and sync[0].split("wandb sync ")[1].startswith(str(run_dir / "wandb" / "offline-run-"))


@pytest.mark.parametrize(
    "config,env,expected",
    [
        ({}, {}, ("offline", "adaptune", None)),
        ({}, {"WANDB_MODE": "disabled", "WANDB_PROJECT": "p", "WANDB_ENTITY": "e"}, ("disabled", "p", "e")),
        ({"mode": "online", "project": "mine"}, {"WANDB_MODE": "disabled", "WANDB_PROJECT": "p"}, ("online", "mine", None)),
    ],
)
def test_wandb_environment_wins_over_defaults_and_config_keys_win_over_it(monkeypatch, config, env, expected):
    for key in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    got = wandb_settings(LoggerConfig(**config))
    assert (got["mode"], got["project"], got["entity"]) == expected


def test_a_bad_wandb_mode_in_the_environment_is_one_line(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ConfigError, match="WANDB_MODE=sometimes is unknown; allowed: offline, online, disabled"):
        wandb_settings(LoggerConfig())


@pytest.mark.e2e
def test_starting_over_gets_a_new_wandb_run_and_resuming_keeps_it(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    data = write_glue(tmp_path / "rte", "rte", n_train=16, n_dev=8)
    run_dir = tmp_path / "r"
    over = glue_overrides(data, "rte", "trainer.batch_size=8", "trainer.max_steps=2", "logger=wandb")
    run(compose(over), run_dir)
    first = (run_dir / RUN_ID_FILE).read_text()
    (run_dir / "results.json").unlink()
    run(compose(over), run_dir)  # resumes from its checkpoint: the same W&B run
    assert (run_dir / RUN_ID_FILE).read_text() == first
    run(compose([*over, "resume=false"]), run_dir)  # starts over: a new W&B run
    second = (run_dir / RUN_ID_FILE).read_text()
    assert second != first and len(second) == 16
    # offline-run-<date>_<time>-<id>[-n]: W&B numbers a directory whose name is taken (a resume in the same second)
    runs = {
        re.match(r"offline-run-\d{8}_\d{6}-([0-9a-f]{16})", p.name).group(1) for p in (run_dir / "wandb").glob("offline-run-*")
    }
    assert runs == {first, second}


def _csv(path):
    """The rows, without throughput (samples/s is wall-clock timing, the one thing a rerun changes)."""
    import csv

    with open(path, newline="") as f:
        return [(int(r["step"]), r["metric"], float(r["value"])) for r in csv.DictReader(f) if "samples_per_s" not in r["metric"]]


@pytest.mark.e2e  # training runs, interrupted and resumed
def test_logger_csv_holds_every_logged_scalar_and_resumes_exactly(tmp_path):
    """logger=csv: the training losses equal results.json's train_loss, the evaluations its evals,
    the summaries its final metrics; a run interrupted after its step-4 checkpoint and resumed
    writes the same file as an uninterrupted one."""
    data = write_glue(tmp_path / "rte", "rte", n_train=32, n_dev=8)
    over = glue_overrides(
        data,
        "rte",
        "trainer.batch_size=8",
        "trainer.max_steps=8",
        "trainer.log_every=2",
        "trainer.eval_every=4",
        "trainer.save_every=4",
        "logger=csv",
    )
    res = run(compose(over), tmp_path / "full")
    rows = _csv(tmp_path / "full" / "metrics.csv")
    losses = [(s, v) for s, m, v in rows if m == "train/loss"]
    assert losses == [tuple(x) for x in res["train_loss"]]
    assert [(s, m) for s, m, _ in rows if m == "final/accuracy"] == [(8, "final/accuracy")]
    assert dict(((m, v) for s, m, v in rows if m.startswith("final/")))["final/accuracy"] == res["final"]["accuracy"]

    # the same run stopped after step 6 (its last checkpoint: step 4), then resumed
    run(compose([*over, "trainer.max_steps=8"]), tmp_path / "resumed")
    ckpt_rows = [r for r in _csv(tmp_path / "resumed" / "metrics.csv")]
    assert ckpt_rows == rows
    from adaptune.runner import checkpoint as ckpt

    last = tmp_path / "resumed" / "checkpoints"
    (last / ckpt.LAST).unlink()
    (last / ckpt.PREVIOUS).rename(last / ckpt.LAST)  # as if killed before step 8's checkpoint
    (tmp_path / "resumed" / "results.json").unlink()
    run(compose(over), tmp_path / "resumed")
    assert _csv(tmp_path / "resumed" / "metrics.csv") == rows


@pytest.mark.e2e  # a training run with W&B (offline) and csv
def test_several_loggers_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    data = write_glue(tmp_path / "rte", "rte", n_train=16, n_dev=8)
    run(
        compose(glue_overrides(data, "rte", "trainer.batch_size=8", "trainer.max_steps=2", "logger=wandb", "logger.also=[csv]")),
        tmp_path / "r",
    )
    assert (tmp_path / "r" / "metrics.csv").is_file() and list((tmp_path / "r" / "wandb").glob("offline-run-*"))
    with pytest.raises(ConfigError, match=r"logger.also.*unknown logger mlflow; allowed: wandb, csv, tensorboard"):
        compose(glue_overrides(data, "rte", "logger.also=[mlflow]"))
        run(compose(glue_overrides(data, "rte", "logger.also=[mlflow]")), tmp_path / "bad")


def _events(run_dir):
    """{tag: [(step, value)]} of a run's TensorBoard event files, read back with TensorBoard's reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"] if "samples_per_s" not in tag}


@pytest.mark.e2e  # training runs, interrupted and resumed
def test_logger_tensorboard_writes_every_scalar_beside_csv_and_resumes_exactly(tmp_path):
    """logger=tensorboard logger.also=[csv]: the event files hold what metrics.csv holds (same tags,
    steps, values to float32); a resumed run's curves equal an uninterrupted run's (purge_step)."""
    pytest.importorskip("tensorboard")
    data = write_glue(tmp_path / "rte", "rte", n_train=32, n_dev=8)
    over = glue_overrides(
        data,
        "rte",
        "trainer.batch_size=8",
        "trainer.max_steps=8",
        "trainer.log_every=2",
        "trainer.eval_every=4",
        "trainer.save_every=4",
        "logger=tensorboard",
        "logger.also=[csv]",
    )
    res = run(compose(over), tmp_path / "full")
    events = _events(tmp_path / "full")

    def close(a, b):
        return [s for s, _ in a] == [s for s, _ in b] and [v for _, v in a] == pytest.approx([v for _, v in b], rel=1e-6)

    assert close(events["train/loss"], res["train_loss"])
    from collections import defaultdict

    from_csv = defaultdict(list)
    for step, metric, value in _csv(tmp_path / "full" / "metrics.csv"):
        from_csv[metric].append((step, value))
    assert events.keys() == from_csv.keys()
    assert all(close(events[k], from_csv[k]) for k in events)

    from adaptune.runner import checkpoint as ckpt

    run(compose(over), tmp_path / "resumed")
    last = tmp_path / "resumed" / "checkpoints"
    (last / ckpt.LAST).unlink()
    (last / ckpt.PREVIOUS).rename(last / ckpt.LAST)  # as if killed before step 8's checkpoint
    (tmp_path / "resumed" / "results.json").unlink()
    run(compose(over), tmp_path / "resumed")
    assert _events(tmp_path / "resumed") == events
