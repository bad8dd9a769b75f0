"""Callbacks (runner/callbacks.py, conf/callbacks/) and the precision helper (runner/precision.py)."""

from __future__ import annotations

import math

import pytest
import torch

from adaptune.common.errors import ConfigError
from conftest import InfGrad, compose, glue_overrides, write_glue
from adaptune.runner import checkpoint as ckpt
from adaptune.runner.callbacks import Callback, build_callbacks
from adaptune.runner.loggers import NullLogger
from adaptune.runner.loop import Interrupted, Trainer, run
from adaptune.runner.precision import Precision, resolve_precision


class Recorder(Callback):
    """A user callback, configured from the command line: records every event it receives."""

    instances: list["Recorder"] = []

    def __init__(self, tag: str = ""):
        self.tag = tag
        self.events: list[tuple] = []
        Recorder.instances.append(self)

    def on_fit_start(self, trainer):
        self.events.append(("on_fit_start", trainer.state.step))

    def on_step_begin(self, trainer, step):
        self.events.append(("on_step_begin", step))

    def on_before_clip(self, trainer, step):
        assert any(p.grad is not None for p in trainer.model.parameters())
        self.events.append(("on_before_clip", step))

    def on_gradients(self, trainer, step):
        # the gradients are final here: normalised, clipped, about to be applied
        assert any(p.grad is not None for p in trainer.model.parameters())
        self.events.append(("on_gradients", step))

    def after_step(self, trainer, step):
        self.events.append(("after_step", step))

    def on_step_end(self, trainer, step, loss):
        evals = trainer.state.evals
        self.events.append(
            ("on_step_end", step, trainer.state.step, loss, evals[-1]["step"] if evals else None, trainer.last_saved_step)
        )

    def on_epoch_end(self, trainer, epoch):
        self.events.append(("on_epoch_end", epoch, trainer.state.epoch, trainer.state.batch_in_epoch))

    def on_stop(self, trainer, step):
        self.events.append(("on_stop", step))

    def on_fit_end(self, trainer):
        self.events.append(("on_fit_end", trainer.state.step))

    def teardown(self, trainer):
        self.events.append(("teardown",))


class StopAt(Callback):
    """A user callback that asks the run to stop after step ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer, step, loss):
        if step == self.step:
            trainer.should_stop = True


class ListLogger(NullLogger):
    def __init__(self):
        self.records: list[tuple[int, dict]] = []

    def log(self, metrics, step):
        self.records.append((step, dict(metrics)))


def _glue(tmp_path, *extra, n_train=32):
    # 32 examples in batches of 8: 4 optimizer steps per epoch
    data = write_glue(tmp_path / "rte", "rte", n_train=n_train, n_dev=8)
    return glue_overrides(data, "rte", "trainer.batch_size=8", "task.group_by_length=false", *extra)


def test_user_callback_from_the_command_line_gets_the_events_in_order(tmp_path, monkeypatch):
    from adaptune.schedules.baseline import BaselineSchedule

    Recorder.instances.clear()
    schedule_calls = []
    for hook in ("on_step_begin", "on_before_clip", "on_gradients", "after_step"):
        monkeypatch.setattr(
            BaselineSchedule, hook, lambda self, step, hook=hook: schedule_calls.append((hook, step)), raising=False
        )
    # eval_every=null: the dev set is evaluated at the end of epoch 0 (step 4) and at the last step
    over = _glue(
        tmp_path,
        "trainer.max_steps=6",
        "trainer.log_every=1",
        "trainer.save_every=5",
        "+callbacks.rec._target_=test_callbacks.Recorder",
        "+callbacks.rec.tag=mine",
    )
    res = run(compose(over), tmp_path / "r")

    (rec,) = Recorder.instances
    assert rec.tag == "mine"
    names = [e[0] for e in rec.events]
    per_step = ["on_step_begin", "on_before_clip", "on_gradients", "after_step", "on_step_end"]
    assert names == ["on_fit_start"] + per_step * 4 + ["on_epoch_end"] + per_step * 2 + ["on_fit_end", "teardown"]
    assert rec.events[0] == ("on_fit_start", 0)
    for name in per_step[:4]:
        assert [e[1] for e in rec.events if e[0] == name] == [1, 2, 3, 4, 5, 6]
    # the schedule is the first callback: its four hooks ran, with the same steps
    assert schedule_calls == [
        (h, s) for s in range(1, 7) for h in ("on_step_begin", "on_before_clip", "on_gradients", "after_step")
    ]

    ends = [e for e in rec.events if e[0] == "on_step_end"]
    assert [e[1] for e in ends] == [1, 2, 3, 4, 5, 6]
    assert all(e[1] == e[2] for e in ends)  # the trainer recorded the step before on_step_end
    # the step's mean loss: the same numbers the logging callback wrote (log_every=1)
    assert [[e[1], e[3]] for e in ends] == res["train_loss"]
    assert all(math.isfinite(e[3]) for e in ends)
    # built-in callbacks come first: at on_step_end the evaluation (steps 4, 6) and the checkpoint
    # (evaluations and save_every=5) of this step are done
    assert [e[4] for e in ends] == [None, None, None, 4, 4, 6]
    assert [e[5] for e in ends] == [None, None, None, 4, 5, 6]
    # epoch 0 ended after step 4; the state already points at epoch 1's first batch
    assert ("on_epoch_end", 0, 1, 0) in rec.events
    assert [e["step"] for e in res["evals"]] == [4, 6]
    assert res["config"]["callbacks"]["rec"] == {"_target_": "test_callbacks.Recorder", "tag": "mine"}


@pytest.mark.parametrize(
    "eval_every, steps, expected",
    [
        (3, 7, [3, 6, 7]),  # every 3 steps and at the last
        (None, 10, [4, 8, 10]),  # null: at each epoch's end (4 steps) and at the last
    ],
)
def test_evaluation_callback_evaluates_at_the_configured_steps(tmp_path, eval_every, steps, expected):
    over = _glue(tmp_path, f"trainer.max_steps={steps}", f"trainer.eval_every={'null' if eval_every is None else eval_every}")
    trainer = Trainer(compose(over), tmp_path / "r")
    logger = ListLogger()
    res = trainer.fit(logger)
    assert [e["step"] for e in res["evals"]] == expected
    assert [step for step, m in logger.records if "dev/accuracy" in m] == expected
    for step, metrics in logger.records:
        if "dev/accuracy" in metrics:
            (ev,) = [e for e in res["evals"] if e["step"] == step]
            assert metrics["dev/accuracy"] == ev["accuracy"]
    best = ckpt.load(tmp_path / "r" / "checkpoints" / "best.pt")
    assert best["step"] == res["best_step"] in expected
    assert best["metrics"] == res["best"]
    assert res["best"]["accuracy"] == max(e["accuracy"] for e in res["evals"] if e["step"] <= res["best_step"])


def test_checkpoint_callback_writes_at_save_every_and_each_evaluation(tmp_path, monkeypatch):
    saved = []
    original = Trainer.save_checkpoint

    def recording(self):
        path = original(self)
        data = ckpt.load(path)
        saved.append((self.state.step, data["state"]["step"], [e["step"] for e in data["state"]["evals"]]))
        return path

    monkeypatch.setattr(Trainer, "save_checkpoint", recording)
    over = _glue(tmp_path, "trainer.max_steps=7", "trainer.save_every=3", "trainer.eval_every=5")
    res = run(compose(over), tmp_path / "r")
    # save_every=3 -> 3, 6; evaluations at 5 and 7 (the last) -> 5, 7; each file holds its step
    # and the evaluations up to it
    assert saved == [(3, 3, []), (5, 5, [5]), (6, 6, [5]), (7, 7, [5, 7])]
    last = ckpt.load(tmp_path / "r" / "checkpoints" / "last.pt")
    assert last["state"]["step"] == 7 == res["steps"]
    assert last["config"]["trainer"]["save_every"] == 3
    assert last["config"]["callbacks"]["checkpoint"]["every"] == 3

    # without the checkpoint callback nothing writes last.pt (best.pt is the evaluation's)
    saved.clear()
    run(compose(over + ["callbacks.checkpoint=null"]), tmp_path / "none")
    assert saved == []
    assert sorted(p.name for p in (tmp_path / "none" / "checkpoints").iterdir()) == ["best.pt"]


def test_a_callback_stop_request_checkpoints_and_interrupts(tmp_path):
    over = _glue(
        tmp_path,
        "trainer.max_steps=6",
        "trainer.save_every=100",
        "+callbacks.halt._target_=test_callbacks.StopAt",
        "+callbacks.halt.step=2",
    )
    # the request comes from a callback after the checkpoint callback: on_stop still saves
    with pytest.raises(Interrupted, match=r"interrupted at step 2/6; checkpoint saved in .*checkpoints"):
        run(compose(over), tmp_path / "r")
    last = ckpt.load(tmp_path / "r" / "checkpoints" / "last.pt")
    assert last["state"]["step"] == 2 and last["state"]["batch_in_epoch"] == 2
    assert not (tmp_path / "r" / "results.json").exists()


def test_callback_config_mistakes_are_config_errors():
    cfg = compose(["+callbacks.bad._target_=no_such_module.Callback"])
    with pytest.raises(
        ConfigError, match=r"callbacks.bad: cannot build no_such_module.Callback: .*No module named 'no_such_module'"
    ):
        build_callbacks(cfg.callbacks)
    cfg = compose(["+callbacks.bad._target_=collections.OrderedDict"])
    with pytest.raises(ConfigError, match=r"callbacks.bad: collections.OrderedDict is not a adaptune.runner.callbacks.Callback"):
        build_callbacks(cfg.callbacks)
    cfg = compose(["callbacks.evaluation.every=0"])
    with pytest.raises(ConfigError, match=r"callbacks.evaluation: every must be a positive integer or null, got 0"):
        build_callbacks(cfg.callbacks)
    cfg = compose(["+callbacks.bad.every=3"])
    with pytest.raises(ConfigError, match=r"callbacks.bad needs a _target_"):
        build_callbacks(cfg.callbacks)
    built = build_callbacks(compose(["callbacks.logging=null", "trainer.save_every=7"]).callbacks)
    assert [type(c).__name__ for c in built] == ["SensitivityQuantiles", "Evaluation", "StopOnSignal", "Checkpoint"]
    assert built[-1].every == 7


# ------------------------------------------------------------------------------ precision helper
def _linear():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_precision_overflow_check_skips_the_update_on_an_infinite_gradient():
    amp = Precision("fp16", torch.device("cpu"))
    assert amp.name == "fp16" and amp.scaler is not None
    model, opt = _linear()
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    before = [p.detach().clone() for p in model.parameters()]
    scale = amp.scaler.get_scale()

    amp.backward(InfGrad.apply(model(x)).sum())
    amp.unscale_(opt)
    grads = [p.grad for p in model.parameters()]
    assert amp.overflowed(grads) is True
    torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)
    amp.step(opt)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)  # the update was skipped
    assert amp.scaler.get_scale() == scale * 0.5  # and the scale backed off

    # a finite step: unscaled gradients are the true ones (d sum(Wx+b) / dW = column sums of x)
    opt.zero_grad(set_to_none=True)
    amp.backward(model(x).sum())
    amp.unscale_(opt)
    assert torch.equal(model.weight.grad, torch.tensor([[5.0, 7.0, 9.0]]))
    assert torch.equal(model.bias.grad, torch.tensor([2.0]))
    assert amp.overflowed([p.grad for p in model.parameters()]) is False
    amp.step(opt)
    assert torch.allclose(model.weight, before[0] - 0.1 * torch.tensor([[5.0, 7.0, 9.0]]))

    again = Precision("fp16", torch.device("cpu"))
    again.load_state_dict(amp.state_dict())
    assert again.scaler.get_scale() == amp.scaler.get_scale() == scale * 0.5


def test_precision_without_scaler_never_skips():
    amp = Precision("fp32", torch.device("cpu"))
    assert amp.scaler is None and amp.state_dict() is None
    model, opt = _linear()
    amp.backward(InfGrad.apply(model(torch.ones(1, 3))).sum())
    amp.unscale_(opt)  # no-op
    assert not torch.isfinite(model.weight.grad).all()
    assert amp.overflowed([p.grad for p in model.parameters()]) is False
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    assert resolve_precision("auto", torch.device("cpu")) in ("bf16", "fp32")
