"""Each schedule fine-tunes the quickstart setup (pip MiniLM, real Amazon reviews) through the
shared loop for a few steps and the training loss falls."""

from __future__ import annotations

import pytest

from conftest import FAST, compose
from adaptune.runner.loop import run

pytestmark = pytest.mark.e2e  # every test here runs the loop, a subprocess or a build

QUICK = [
    "experiment=quickstart",
    *FAST,
    "task.train_subset=96",
    "task.eval_subset=32",
    "task.max_seq_length=40",
    "trainer.batch_size=12",
    "trainer.epochs=3",
    "trainer.log_every=4",
    "schedule.warmup_ratio=0.0",
]


@pytest.mark.parametrize(
    "schedule",
    [
        ["schedule=baseline", "schedule.lr=1e-4"],
        ["schedule=sage", "schedule.lr=4e-4"],
        ["schedule=sage", "schedule.base=adamw", "schedule.lr=4e-4"],
        ["schedule=dps", "schedule.variant=dense", "schedule.lr=1e-4", "schedule.update_ratio=0.17"],
        ["schedule=dps", "schedule.variant=mix", "schedule.lr=1e-4", "schedule.update_ratio=0.17"],
    ],
    ids=["baseline", "adamax_sage", "adamw_sage", "dps_dense", "dps_mix"],
)
def test_schedule_trains_quickstart_and_loss_falls(tmp_path, schedule):
    res = run(compose(QUICK + schedule), tmp_path / "run")
    losses = [loss for _, loss in res["train_loss"]]
    assert res["steps"] == 24 and len(losses) == 6
    first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    assert last < 0.9 * first, losses
    assert res["final"]["accuracy"] >= 0.5
