"""Protocols a reviewer would accept: degenerate runs are marked and counted, and the selection
split never lets the official dev set influence selection."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import compose, glue_overrides, write_glue
from adaptune.runner.callbacks import Callback
from adaptune.runner.loop import Trainer, run


class Collapse(Callback):
    """Makes the classifier output its bias only (zero weights, no training): a model that predicts
    one class (or one value) for every example."""

    def on_fit_start(self, trainer):
        head = trainer.model.classifier
        with torch.no_grad():
            head.weight.zero_()
            head.bias.copy_(torch.arange(head.bias.numel(), 0, -1, dtype=head.bias.dtype))
        head.weight.requires_grad_(False)
        head.bias.requires_grad_(False)


COLLAPSE = ["+callbacks.collapse._target_=test_protocol.Collapse", "schedule.lr=0.0"]


@pytest.mark.parametrize(
    "task,reason",
    [
        ("rte", "predicts one class ('entailment') for every dev example"),
        ("stsb", "near-constant predictions on dev (std 0"),
    ],
)
def test_collapsed_run_is_marked_degenerate(tmp_path, task, reason, caplog):
    data = write_glue(tmp_path / task, task, n_train=16, n_dev=8)
    cfg = compose(glue_overrides(data, task, "trainer=cpu_fast", "trainer.max_steps=2", *COLLAPSE))
    with caplog.at_level("WARNING"):
        res = run(cfg, tmp_path / "run")
    assert res["degenerate"].startswith(reason)
    assert json.loads((tmp_path / "run" / "results.json").read_text())["degenerate"] == res["degenerate"]
    assert "degenerate run: " + reason in caplog.text and "schedule.lr" in caplog.text
    if task == "rte":
        assert res["final"]["pred_frac_entailment"] == 1.0 and res["final"]["pred_classes"] == 1.0


def test_report_counts_degenerate_runs(tmp_path):
    from adaptune.runner.report import main as report_main

    data = write_glue(tmp_path / "rte", "rte", n_train=16, n_dev=8)
    sweep = tmp_path / "sweep"
    for seed in (1, 2):
        over = glue_overrides(data, "rte", "trainer=cpu_fast", "trainer.max_steps=2", *COLLAPSE, f"seed={seed}")
        run(compose(over), sweep / f"seed={seed}")
    assert report_main([str(sweep)]) in (0, None)
    md = (sweep / "report.md").read_text()
    assert "50.00 ± 0.00 (n=2, 2 degenerate)" in md
    assert "predicts one class ('entailment') for every dev example" in md.split("## Degenerate runs")[1]
    summary = json.loads((sweep / "report.json").read_text())
    assert "degenerate" in json.dumps(summary)


def test_selection_split_never_reads_the_official_dev_set_before_the_end(tmp_path, monkeypatch):
    data = write_glue(tmp_path / "rte", "rte", n_train=64, n_dev=16)
    cfg = compose(
        glue_overrides(
            data, "rte", "trainer=cpu_fast", "trainer.max_steps=6", "trainer.eval_every=2", "task.selection_split=0.25"
        )
    )
    seen: list[tuple[int, str, frozenset]] = []
    original = Trainer.evaluate

    def spy(self, split="dev"):
        sets = self.task.eval_sets[split]
        texts = frozenset(tuple(d["input_ids"][i]) for d, _ in sets for i in range(len(d["labels"])))
        seen.append((self.state.step, split, texts))
        return original(self, split)

    monkeypatch.setattr(Trainer, "evaluate", spy)
    res = run(cfg, tmp_path / "run")

    import adaptune.tasks.glue as glue

    trainer_task = glue.GlueTask(cfg.task, tmp_path / "x", seed=42)  # the run's data, rebuilt
    trainer_task.setup()
    train = {tuple(ids) for ids in trainer_task.train["input_ids"]}
    selection = {tuple(ids) for ids in trainer_task.eval_sets["dev"][0][0]["input_ids"]}
    official = {tuple(ids) for ids in trainer_task.eval_sets["test"][0][0]["input_ids"]}
    assert len(trainer_task.eval_sets["dev"][0][0]["labels"]) == 16 and len(trainer_task.train["labels"]) == 48
    assert sorted(trainer_task.eval_sets["dev"][0][0]["labels"]) == [0] * 8 + [1] * 8  # stratified
    assert not selection & train and not selection & official  # disjoint slices
    # every evaluation during training read the selection slice; the official dev set once, at the end
    assert [(step, split) for step, split, _ in seen] == [(2, "dev"), (4, "dev"), (6, "dev"), (6, "test")]
    assert all(texts == selection for _, split, texts in seen if split == "dev")
    assert seen[-1][2] == official
    assert res["main_metric"] == "accuracy" and res["best_step"] in (2, 4, 6)
    assert set(res["test"]) >= {"accuracy", "loss"} and res["task_summary"]["selection_split"] == 0.25
    # the selection slice is the same for every seed (all grid points are selected on it)
    other = glue.GlueTask(
        compose(glue_overrides(data, "rte", "task.selection_split=0.25", "seed=7")).task, tmp_path / "y", seed=7
    )
    other.setup()
    assert {tuple(ids) for ids in other.eval_sets["dev"][0][0]["input_ids"]} == selection


def test_selection_split_must_leave_training_examples(tmp_path):
    from adaptune.common.errors import ConfigError

    data = write_glue(tmp_path / "rte", "rte", n_train=16, n_dev=8)
    cfg = compose(glue_overrides(data, "rte", "task.selection_split=16"))
    with pytest.raises(ConfigError, match=r"task.selection_split=16 leaves 0 of 16 training examples"):
        run(cfg, tmp_path / "run")
    with pytest.raises(Exception, match=r"task.selection_split must be a fraction in \(0, 1\) or a whole number"):
        run(compose(glue_overrides(data, "rte", "task.selection_split=2.5")), tmp_path / "run2")
