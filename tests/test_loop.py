"""The shared training loop: resume, interruption, accumulation, divergence, W&B, results."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from conftest import InfGrad, compose, glue_overrides, write_glue
from adaptune.runner import checkpoint as ckpt
from adaptune.runner.loop import Interrupted, Trainer, TrainingDiverged, run
from adaptune.common.errors import ConfigError
from wandb_records import closed_run


def _params(run_dir):
    return ckpt.load(run_dir / "checkpoints" / "last.pt")["model"]


def _overrides(data, *extra):
    # dropout on (the RNG state must be restored on resume) and accumulation of 2 micro-batches
    return glue_overrides(
        data,
        "rte",
        "trainer.batch_size=8",
        "trainer.grad_accum_steps=2",
        "trainer.max_steps=12",
        "trainer.save_every=3",
        "trainer.eval_every=6",
        "trainer.log_every=2",
        "schedule.lr=5e-3",
        "task.model.config_overrides.hidden_dropout_prob=0.1",
        *extra,
    )


@pytest.mark.e2e
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_after_interrupt_is_bit_identical(tmp_path, monkeypatch, workers):
    data = write_glue(tmp_path / "rte", "rte", n_train=64, n_dev=16)
    # with workers, the uninterrupted run prepares batches in 2 DataLoader processes; the
    # interrupted and resumed runs prepare them in-process: all three must agree exactly
    full = run(compose(_overrides(data, f"trainer.num_workers={workers}")), tmp_path / "full")
    assert full["steps"] == 12

    # Second run: SIGINT arrives during step 5 -> the loop finishes the step, checkpoints, stops.
    calls = {"n": 0}
    original = Trainer._train_step

    def interrupting(self, step, *args):
        calls["n"] += 1
        if step == 5:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, step, *args)

    monkeypatch.setattr(Trainer, "_train_step", interrupting)
    cfg = compose(_overrides(data))
    with pytest.raises(Interrupted, match="interrupted at step 5/12; checkpoint saved"):
        run(cfg, tmp_path / "cut")
    assert ckpt.load(tmp_path / "cut" / "checkpoints" / "last.pt")["state"]["step"] == 5
    assert not (tmp_path / "cut" / "results.json").exists()
    monkeypatch.setattr(Trainer, "_train_step", original)

    resumed = run(compose(_overrides(data, "resume=true")), tmp_path / "cut")
    assert resumed["steps"] == 12
    a, b = _params(tmp_path / "full"), _params(tmp_path / "cut")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed["final"] == full["final"]
    assert [e["step"] for e in resumed["evals"]] == [6, 12]
    assert resumed["train_loss"] == full["train_loss"]


def test_auto_resume_skips_a_completed_run_and_resume_true_needs_a_checkpoint(tmp_path):
    data = write_glue(tmp_path / "rte", "rte", n_train=32, n_dev=8)
    over = glue_overrides(data, "rte", "trainer.max_steps=2", "trainer.batch_size=8")
    first = run(compose(over), tmp_path / "r")
    mtime = (tmp_path / "r" / "results.json").stat().st_mtime_ns
    again = run(compose(over), tmp_path / "r")  # resume=auto: already complete
    assert again["final"] == first["final"]
    assert (tmp_path / "r" / "results.json").stat().st_mtime_ns == mtime
    with pytest.raises(ConfigError, match="resume=true but there is no checkpoint"):
        run(compose(over + ["resume=true"]), tmp_path / "empty")


def test_checkpoints_load_with_weights_only(tmp_path):
    data = write_glue(tmp_path / "rte", "rte", n_train=32, n_dev=8)
    run(compose(glue_overrides(data, "rte", "trainer.max_steps=2", "trainer.batch_size=8")), tmp_path / "r")
    last = torch.load(tmp_path / "r" / "checkpoints" / "last.pt", weights_only=True)
    assert {"model", "optimizer", "lr_scheduler", "schedule", "rng", "state", "config"} <= set(last)
    assert last["config"]["trainer"]["max_steps"] == 2 and last["config"]["task"]["name"] == "rte"
    best = torch.load(tmp_path / "r" / "checkpoints" / "best.pt", weights_only=True)
    assert best["step"] == 2 and "accuracy" in best["metrics"]
    assert not [p for p in (tmp_path / "r" / "checkpoints").iterdir() if p.name.endswith(".tmp")]


@pytest.mark.e2e
def test_gradient_accumulation_equals_one_large_batch(tmp_path):
    data = write_glue(tmp_path / "rte", "rte", n_train=48, n_dev=8)
    common = ["task.group_by_length=false", "trainer.max_steps=4", "trainer.max_grad_norm=1.0"]
    run(compose(glue_overrides(data, "rte", "trainer.batch_size=12", *common)), tmp_path / "big")
    run(compose(glue_overrides(data, "rte", "trainer.batch_size=4", "trainer.grad_accum_steps=3", *common)), tmp_path / "acc")
    a, b = _params(tmp_path / "big"), _params(tmp_path / "acc")
    moved = 0
    for k in a:
        assert torch.allclose(a[k], b[k], atol=2e-6, rtol=1e-5), k
    init = Trainer(compose(glue_overrides(data, "rte", "trainer.batch_size=12", *common)), tmp_path / "x").model
    for k, v in init.state_dict().items():
        moved += int(not torch.equal(v, a[k]))
    assert moved > 10  # training changed the weights, so the equality above is not vacuous


def _alter_nth_loss(monkeypatch, n: int, alter) -> None:
    """Make the GLUE task's ``n``-th loss call return ``alter(loss_sum)`` instead."""
    from adaptune.tasks.glue import GlueTask

    original = GlueTask.loss
    calls = {"n": 0}

    def patched(self, model, batch):
        out = original(self, model, batch)
        calls["n"] += 1
        return out._replace(loss_sum=alter(out.loss_sum)) if calls["n"] == n else out

    monkeypatch.setattr(GlueTask, "loss", patched)


def test_nan_loss_stops_with_clear_message_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    data = write_glue(tmp_path / "rte", "rte", n_train=64, n_dev=8)
    _alter_nth_loss(monkeypatch, 5, lambda loss: loss * float("nan"))
    cfg = compose(glue_overrides(data, "rte", "trainer.batch_size=8", "trainer.max_steps=8", "trainer.save_every=2"))
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 5.*last good checkpoint is .*last.pt"):
        run(cfg, tmp_path / "r")
    assert ckpt.load(tmp_path / "r" / "checkpoints" / "last.pt")["state"]["step"] == 4
    results = json.loads((tmp_path / "r" / "results.json").read_text())  # recorded for reports
    assert results["status"] == "diverged" and results["degenerate"] == "diverged: loss became nan at step 5"
    assert results["steps"] == 4
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 5 \(an earlier run in"):
        run(cfg, tmp_path / "r")  # resume=auto: not retrained


@pytest.mark.e2e
def test_results_json_and_wandb_offline_metrics(tmp_path):
    data = write_glue(tmp_path / "rte", "rte", n_train=32, n_dev=8)
    over = glue_overrides(
        data,
        "rte",
        "trainer.batch_size=8",
        "trainer.max_steps=4",
        "trainer.log_every=2",
        "logger=wandb",
        "logger.mode=offline",
        "name=wbtest",
        "seed=7",
    )
    res = run(compose(over), tmp_path / "r")
    saved = json.loads((tmp_path / "r" / "results.json").read_text())
    assert saved["final"] == res["final"] and saved["steps"] == 4
    assert {"best", "wall_time_s", "samples_per_s", "config", "train_loss"} <= set(saved)
    assert saved["config"]["task"]["name"] == "rte" and saved["config"]["seed"] == 7
    logs = list((tmp_path / "r" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 1
    rec = closed_run(logs[0])
    assert rec["run"]["group"] == "wbtest"
    assert {"task:glue", "schedule:baseline", "seed:7"} <= set(rec["run"]["tags"])
    losses = [h["train/loss"] for h in rec["history"] if "train/loss" in h]
    assert losses == pytest.approx([loss for _, loss in saved["train_loss"]])
    assert any("train/lr" in h for h in rec["history"])
    assert rec["summary"]["final/accuracy"] == pytest.approx(saved["final"]["accuracy"])


def test_wandb_failure_never_fails_training(tmp_path, monkeypatch):
    import wandb

    def broken(*a, **k):
        raise RuntimeError("no W&B today")

    monkeypatch.setattr(wandb, "init", broken)
    data = write_glue(tmp_path / "rte", "rte", n_train=16, n_dev=8)
    res = run(compose(glue_overrides(data, "rte", "trainer.batch_size=8", "trainer.max_steps=2", "logger=wandb")), tmp_path / "r")
    assert res["status"] == "completed"


def test_fp16_grad_scaler_skips_overflowing_steps(tmp_path, monkeypatch):
    """Under fp16 an inf gradient skips the update, the schedule hooks and the LR step."""
    data = write_glue(tmp_path / "rte", "rte", n_train=64, n_dev=8)
    from adaptune.schedules.baseline import BaselineSchedule

    _alter_nth_loss(monkeypatch, 3, InfGrad.apply)  # finite loss, infinite gradient
    hooked, before_clip = [], []
    monkeypatch.setattr(BaselineSchedule, "on_gradients", lambda self, step: hooked.append(step), raising=False)
    monkeypatch.setattr(BaselineSchedule, "on_before_clip", lambda self, step: before_clip.append(step), raising=False)
    cfg = compose(
        glue_overrides(
            data, "rte", "trainer.batch_size=8", "trainer.max_steps=5", "trainer.precision=fp16", "schedule.warmup_ratio=0.0"
        )
    )
    trainer = Trainer(cfg, tmp_path / "r")
    assert trainer.scaler is not None
    from adaptune.runner.loggers import NullLogger

    res = trainer.fit(NullLogger())
    assert res["steps"] == 5 and res["precision"] == "fp16"
    # step 3 overflowed by construction (and the scaler's first steps may overflow too, as fp16
    # scaling starts at 2**16): skipped steps run neither the schedule hook nor the LR step
    assert 3 not in hooked and hooked[-2:] == [4, 5] and before_clip == hooked
    assert trainer.schedule.lr_scheduler.last_epoch == len(hooked)
    assert trainer.scaler.get_scale() < 2.0**16  # the scaler backed off
    for p in trainer.model.parameters():
        assert torch.isfinite(p).all()


@pytest.mark.e2e
def test_max_grad_norm_zero_and_null_both_mean_no_clipping(tmp_path, monkeypatch):
    """One meaning everywhere (the loop, ChildTuning's Fisher pass, HF's max_grad_norm=0): 0 and
    null turn global clipping off; a negative value is a one-line error naming the key."""
    data = write_glue(tmp_path / "rte", "rte", n_train=32, n_dev=8)
    clipped = []
    original = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: clipped.append(1) or original(*a, **k))
    weights = {}
    for value in ("0", "null", "1e-4"):
        run(
            compose(
                glue_overrides(
                    data,
                    "rte",
                    "trainer.batch_size=8",
                    "trainer.max_steps=3",
                    "schedule.lr=1e-2",
                    f"trainer.max_grad_norm={value}",
                )
            ),
            tmp_path / value,
        )
        weights[value] = ckpt.load(tmp_path / value / "checkpoints" / "last.pt")["model"]
    assert len(clipped) == 3  # only the 1e-4 run clipped, once per step
    assert all(torch.equal(weights["0"][k], weights["null"][k]) for k in weights["0"])
    assert any(not torch.equal(weights["0"][k], weights["1e-4"][k]) for k in weights["0"])
    with pytest.raises(ConfigError, match=r"trainer.max_grad_norm.*>= 0"):
        run(compose(glue_overrides(data, "rte", "trainer.max_grad_norm=-1")), tmp_path / "neg")
