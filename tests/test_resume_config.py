"""Resuming with a changed config: significant changes are a one-line error, harmless ones resume."""

from __future__ import annotations

import json
import logging
import os
import signal

import pytest

from adaptune.common.errors import ConfigError
from conftest import compose, glue_overrides, write_glue
from adaptune.runner import checkpoint as ckpt
from adaptune.runner import loop
from adaptune.runner.loop import Interrupted, Trainer, run
from adaptune.runner.resume import ABSENT, HARMLESS, check_resume, config_diff, describe, is_harmless, saved_config

TAIL = "; pass resume=false to start over in that directory, or change name= to train in another one"


# ------------------------------------------------------------------------------ the diff, on hand-built dicts
SAVED = {
    "name": "a",
    "seed": 1,
    "resume": "auto",
    "schedule": {"name": "sage", "lr": 2e-4, "beta3": 0.75, "betas": [0.9, 0.999], "warmup_steps": None},
    "trainer": {
        "max_steps": 20,
        "num_threads": 2,
        "progress": True,
        "num_workers": 0,
        "device": "cpu",
        "log_every": 5,
        "save_every": 10,
        "eval_every": None,
    },
    "task": {"model": {"config_overrides": {"hidden_size": 32, "num_hidden_layers": 2}}},
    "logger": {"kind": "wandb", "mode": "offline", "tags": []},
}


def _new(**changes):
    """A deep copy of SAVED with dotted keys set (value ABSENT deletes the key)."""
    cfg = json.loads(json.dumps(SAVED))
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = cfg
        for p in parents:
            node = node.setdefault(p, {})
        if value is ABSENT:
            del node[last]
        else:
            node[last] = value
    return cfg


def test_identical_configs_have_no_diff():
    assert config_diff(_new(), SAVED) == []
    assert config_diff(_new(trainer__max_steps=20.0), SAVED) == []  # 20 == 20.0 as a config value


def test_nested_keys_are_dotted_with_saved_then_new_value():
    new = _new(schedule__beta3=0.85, task__model__config_overrides__hidden_size=64)
    assert config_diff(new, SAVED) == [("schedule.beta3", 0.75, 0.85), ("task.model.config_overrides.hidden_size", 32, 64)]


def _flat_schedule(name: str, **values) -> dict:
    """A schedule section as configs saved it before each schedule had its own schema: every
    schedule's keys (DPS's drop_p named p, ChildTuning's keep_p reserve_p, Mixout's mix_p mixout_p)."""
    import dataclasses

    from adaptune.schedules.config import RENAMED, SCHEDULE_SCHEMAS

    old = {new: old for old, new in RENAMED.items()}
    flat = {}
    for schema in SCHEDULE_SCHEMAS.values():
        flat.update({old.get(k, k): v for k, v in dataclasses.asdict(schema()).items()})
    return {**flat, "name": name, **values}


def _schema_node(name: str, **values) -> dict:
    import dataclasses

    from adaptune.schedules.config import SCHEDULE_SCHEMAS

    return {**dataclasses.asdict(SCHEDULE_SCHEMAS[name]()), **values}


@pytest.mark.parametrize("name", ["baseline", "sage", "dps", "childtuning_d", "childtuning_f", "mixout"])
def test_a_config_saved_with_the_flat_schedule_schema_still_resumes(name, tmp_path):
    """Renamed keys are compared under their new names; keys the saved run's schedule did not read
    (a DPS preset's update_ratio on the baseline arm) are dropped; presets may differ."""
    saved = {**SAVED, "presets": {}, "schedule": _flat_schedule(name, update_ratio=0.1, p=0.2, lr=1e-3)}
    own = {"dps": {"update_ratio": 0.1, "drop_p": 0.2}}.get(name, {})
    new = {**SAVED, "presets": {"dps_update_ratio": 0.1, "dps_drop_p": 0.2}, "schedule": _schema_node(name, lr=1e-3, **own)}
    check_resume(new, saved, tmp_path, "results.json")  # no error
    with pytest.raises(ConfigError, match=r"schedule.lr: 0.001 -> 0.002"):
        check_resume({**new, "schedule": {**new["schedule"], "lr": 2e-3}}, saved, tmp_path, "results.json")


def test_a_flat_config_with_other_dps_settings_is_refused_naming_the_new_key(tmp_path):
    saved = {**SAVED, "schedule": _flat_schedule("dps", p=0.2)}
    with pytest.raises(ConfigError, match=r"schedule.drop_p: 0.2 -> 0.3"):
        check_resume({**SAVED, "schedule": _schema_node("dps")}, saved, tmp_path, "results.json")
    saved = {**SAVED, "schedule": _flat_schedule("mixout", mixout_p=0.5)}
    with pytest.raises(ConfigError, match=r"schedule.mix_p: 0.5 -> 0.9"):
        check_resume({**SAVED, "schedule": _schema_node("mixout")}, saved, tmp_path, "results.json")


def test_a_vit_config_saved_with_task_hf_name_resumes_and_is_read_under_hf_dataset(tmp_path):
    task = {"kind": "vit", "dataset": "hf", "hf_dataset": "/data/flowers", "hf_config": None}
    old = {**SAVED, "task": {**{k: v for k, v in task.items() if k != "hf_dataset"}, "hf_name": "/data/flowers"}}
    check_resume({**SAVED, "task": task}, old, tmp_path, "results.json")  # no error
    with pytest.raises(ConfigError, match=r"task.hf_dataset: /data/flowers -> /data/cars"):
        check_resume({**SAVED, "task": {**task, "hf_dataset": "/data/cars"}}, old, tmp_path, "results.json")
    assert saved_config(tmp_path, {"config": old})["task"] == task  # what export and analyze rebuild from


def test_a_list_is_one_value():
    assert config_diff(_new(schedule__betas=[0.9, 0.99]), SAVED) == [("schedule.betas", [0.9, 0.999], [0.9, 0.99])]
    assert config_diff(_new(schedule__betas=[0.9, 0.999, 0.5]), SAVED)[0][0] == "schedule.betas"
    assert config_diff(_new(schedule__betas=[0.9, 0.999]), SAVED) == []


def test_added_and_removed_keys():
    new = _new(schedule__sage_patterns=["attention"], schedule__warmup_steps=ABSENT, extra={"x": 1})
    assert config_diff(new, SAVED) == [
        ("extra", ABSENT, {"x": 1}),
        ("schedule.sage_patterns", ABSENT, ["attention"]),
        ("schedule.warmup_steps", None, ABSENT),
    ]
    assert describe(config_diff(new, SAVED)) == (
        "extra: (absent) -> {'x': 1}, schedule.sage_patterns: (absent) -> ['attention'], schedule.warmup_steps: null -> (absent)"
    )


def test_types_matter_where_values_would_compare_equal():
    assert config_diff(_new(trainer__progress=1), SAVED) == []  # (progress is harmless anyway)
    assert config_diff(_new(seed=True), SAVED) == [("seed", 1, True)]
    assert config_diff(_new(trainer__eval_every=0), SAVED) == [("trainer.eval_every", None, 0)]
    assert config_diff(_new(schedule__lr=float("nan")), _new(schedule__lr=float("nan"))) == []


def test_harmless_keys_are_ignored_and_nothing_else():
    harmless = _new(
        name="b",
        resume=False,
        logger={"kind": "none"},
        trainer__num_threads=16,
        trainer__progress=False,
        trainer__num_workers=4,
        trainer__log_every=1,
        trainer__save_every=3,
        hydra={"run": {"dir": "x"}},
    )
    assert config_diff(harmless, SAVED) == []
    significant = _new(trainer__device="cuda", trainer__eval_every=5, seed=2)
    assert [k for k, _, _ in config_diff(significant, SAVED)] == ["seed", "trainer.device", "trainer.eval_every"]
    assert is_harmless("logger.mode") and is_harmless("hydra.sweeper.params.x") and is_harmless("name")
    assert not is_harmless("loggers") and not is_harmless("trainer.num_threads_x") and not is_harmless("trainer")
    assert not is_harmless("trainer.device") and not is_harmless("names")
    assert is_harmless("callbacks.bar.progress", HARMLESS + ("callbacks.*.progress",))
    assert not is_harmless("callbacks.bar.every", HARMLESS + ("callbacks.*.progress",))


def test_only_display_settings_of_builtin_callbacks_are_harmless():
    cbs = {
        "logging": {"_target_": "adaptune.runner.callbacks.Logging", "every": 5, "progress": True},
        "evaluation": {"_target_": "adaptune.runner.callbacks.Evaluation", "every": None},
        "checkpoint": {"_target_": "adaptune.runner.callbacks.Checkpoint", "every": 10},
        "mine": {"_target_": "my.Callback", "every": 3, "progress": True},
    }
    saved = {**SAVED, "callbacks": cbs}
    assert config_diff(_new(callbacks=cbs), saved) == []
    harmless = json.loads(json.dumps(cbs))
    harmless["logging"].update(every=1, progress=False)
    harmless["checkpoint"]["every"] = 2
    assert config_diff(_new(callbacks=harmless), saved) == []
    significant = json.loads(json.dumps(cbs))
    significant["evaluation"]["every"] = 2
    significant["mine"].update(every=4, progress=False)
    assert [k for k, _, _ in config_diff(_new(callbacks=significant), saved)] == [
        "callbacks.evaluation.every",
        "callbacks.mine.every",
        "callbacks.mine.progress",
    ]
    # another class under the built-in's name: its settings and the _target_ itself count
    other = json.loads(json.dumps(cbs))
    other["logging"] = {"_target_": "my.Logging", "every": 1, "progress": True}
    assert [k for k, _, _ in config_diff(_new(callbacks=other), saved)] == [
        "callbacks.logging._target_",
        "callbacks.logging.every",
    ]
    off = {**cbs, "logging": None}
    assert [k for k, _, _ in config_diff(_new(callbacks=off), saved)] == ["callbacks.logging"]


def test_message_shows_the_first_keys_then_a_count(tmp_path):
    new = _new(schedule__beta3=0.85, trainer__max_steps=30)
    with pytest.raises(ConfigError) as err:
        check_resume(new, SAVED, tmp_path / "run", "last.pt")
    assert str(err.value) == (
        f"{tmp_path / 'run'} was trained with a different config "
        f"(schedule.beta3: 0.75 -> 0.85, trainer.max_steps: 20 -> 30){TAIL}"
    )
    many = _new(
        seed=2,
        schedule__lr=1e-3,
        schedule__beta3=0.8,
        schedule__name="dps",
        schedule__eps=1e-8,
        trainer__max_steps=30,
        trainer__device="cuda",
    )
    with pytest.raises(ConfigError) as err:
        check_resume(many, SAVED, "outputs/runs/x/y", "last.pt")
    assert str(err.value) == (
        "outputs/runs/x/y was trained with a different config (schedule.beta3: 0.75 -> 0.8, "
        "schedule.eps: (absent) -> 1e-08, schedule.lr: 0.0002 -> 0.001, schedule.name: sage "
        f"-> dps, and 3 more){TAIL}"
    )
    assert "\n" not in str(err.value)
    long = _new(schedule__sage_patterns=["attention.self", "attention.output.dense", "output.dense"])
    with pytest.raises(
        ConfigError,
        match=r"\(schedule.sage_patterns: \(absent\) -> \['attention.self', "
        r"'attention.output\.\.\.\.\); pass",
    ):
        check_resume(long, SAVED, "r", "last.pt")


def test_a_missing_saved_config_warns_and_allows(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="adaptune"):
        check_resume(SAVED, None, tmp_path, tmp_path / "last.pt")
    assert "holds no config (written by an older version)" in caplog.text


# ------------------------------------------------------------------------------ through run()
def _over(data, *extra):
    return glue_overrides(
        data,
        "rte",
        "trainer=cpu_fast",
        "trainer.batch_size=8",
        "trainer.max_steps=4",
        "trainer.save_every=2",
        "trainer.log_every=2",
        "schedule.lr=1e-3",
        *extra,
    )


@pytest.fixture
def data(tmp_path):
    return write_glue(tmp_path / "rte", "rte", n_train=32, n_dev=8)


@pytest.fixture
def steps(monkeypatch):
    """Counts optimizer steps taken (the steps a run trained rather than restored)."""
    taken = []
    original = Trainer._train_step

    def counting(self, step, *args):
        taken.append(step)
        return original(self, step, *args)

    monkeypatch.setattr(Trainer, "_train_step", counting)
    return taken


def _interrupted(data, run_dir, monkeypatch):
    """A run stopped by SIGINT during step 2: checkpoints/last.pt at step 2, no results.json."""
    original = Trainer._train_step

    def interrupting(self, step, *args):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, step, *args)

    monkeypatch.setattr(Trainer, "_train_step", interrupting)
    with pytest.raises(Interrupted, match="interrupted at step 2/4"):
        run(compose(_over(data)), run_dir)
    monkeypatch.setattr(Trainer, "_train_step", original)
    assert ckpt.load(run_dir / "checkpoints" / ckpt.LAST)["state"]["step"] == 2
    assert not (run_dir / "results.json").exists()


def _no_model(monkeypatch):
    """Fail if run() gets as far as building a Trainer (the check must come first)."""

    def refuse(*args, **kwargs):
        raise AssertionError("a Trainer was built")

    monkeypatch.setattr(loop, "Trainer", refuse)


def test_checkpoint_saves_the_resolved_config(tmp_path, data, monkeypatch):
    _interrupted(data, tmp_path / "r", monkeypatch)
    saved = ckpt.load(tmp_path / "r" / "checkpoints" / ckpt.LAST).get("config")
    assert saved is not None, "checkpoints/last.pt has no 'config' (Trainer.save_checkpoint must save it)"
    assert saved["schedule"]["lr"] == 1e-3 and saved["trainer"]["max_steps"] == 4


def test_changed_schedule_key_refuses_to_resume_a_checkpoint(tmp_path, data, monkeypatch):
    _interrupted(data, tmp_path / "r", monkeypatch)
    _no_model(monkeypatch)
    for extra, shown in (
        (["schedule.weight_decay=0.1"], "schedule.weight_decay: 0.01 -> 0.1"),
        (["schedule.lr=5e-4", "trainer.max_steps=6"], "schedule.lr: 0.001 -> 0.0005, trainer.max_steps: 4 -> 6"),
    ):
        for resume in ("auto", "true"):
            with pytest.raises(ConfigError) as err:
                run(compose(_over(data, *extra, f"resume={resume}")), tmp_path / "r")
            assert str(err.value) == f"{tmp_path / 'r'} was trained with a different config ({shown}){TAIL}"
    assert not (tmp_path / "r" / "results.json").exists()


def test_harmless_changes_resume_the_checkpoint(tmp_path, data, monkeypatch, steps):
    _interrupted(data, tmp_path / "r", monkeypatch)
    steps.clear()
    res = run(compose(_over(data, "trainer.num_threads=1", "trainer.log_every=1", "name=renamed")), tmp_path / "r")
    assert steps == [3, 4]  # resumed after step 2, not started over
    assert res["steps"] == 4 and res["config"]["trainer"]["num_threads"] == 1


def test_resume_false_starts_over_with_the_new_config(tmp_path, data, monkeypatch, steps):
    _interrupted(data, tmp_path / "r", monkeypatch)
    steps.clear()
    res = run(compose(_over(data, "schedule.weight_decay=0.1", "resume=false")), tmp_path / "r")
    assert steps == [1, 2, 3, 4]
    assert res["config"]["schedule"]["weight_decay"] == 0.1
    saved = json.loads((tmp_path / "r" / "results.json").read_text())
    assert saved["config"]["schedule"]["weight_decay"] == 0.1
    assert ckpt.load(tmp_path / "r" / "checkpoints" / ckpt.LAST)["config"]["schedule"]["weight_decay"] == 0.1


@pytest.mark.e2e
def test_old_checkpoint_without_config_warns_and_resumes(tmp_path, data, monkeypatch, steps, caplog):
    _interrupted(data, tmp_path / "r", monkeypatch)
    last = tmp_path / "r" / "checkpoints" / ckpt.LAST
    old = ckpt.load(last)
    old.pop("config", None)
    ckpt.atomic_save(old, last)
    steps.clear()
    with caplog.at_level(logging.WARNING, logger="adaptune"):
        res = run(compose(_over(data, "schedule.weight_decay=0.1")), tmp_path / "r")
    assert steps == [3, 4] and res["steps"] == 4
    assert f"{last} holds no config (written by an older version)" in caplog.text


def test_completed_run_with_changed_config_is_an_error_not_old_results(tmp_path, data, monkeypatch, steps):
    first = run(compose(_over(data)), tmp_path / "r")
    assert steps == [1, 2, 3, 4]
    results = tmp_path / "r" / "results.json"
    mtime = results.stat().st_mtime_ns
    steps.clear()

    # harmless changes: resume=auto returns the finished results without training
    again = run(
        compose(
            _over(
                data,
                "trainer.num_threads=1",
                "logger=wandb",
                "logger.mode=disabled",
                "trainer.num_workers=2",
                "trainer.progress=true",
            )
        ),
        tmp_path / "r",
    )
    assert steps == [] and again["final"] == first["final"] and results.stat().st_mtime_ns == mtime

    # a changed schedule key: one line, before any model is built; results.json untouched
    with monkeypatch.context() as m:
        _no_model(m)
        with pytest.raises(ConfigError) as err:
            run(compose(_over(data, "schedule.lr=5e-4")), tmp_path / "r")
    assert str(err.value) == f"{tmp_path / 'r'} was trained with a different config (schedule.lr: 0.001 -> 0.0005){TAIL}"
    assert results.stat().st_mtime_ns == mtime

    # resume=false trains again with the new config
    res = run(compose(_over(data, "schedule.lr=5e-4", "resume=false")), tmp_path / "r")
    assert steps == [1, 2, 3, 4] and res["config"]["schedule"]["lr"] == 5e-4
    assert json.loads(results.read_text())["config"]["schedule"]["lr"] == 5e-4
