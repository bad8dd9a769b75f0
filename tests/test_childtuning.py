"""ChildTuning-F and -D (docs/algorithms.md §3) against the spec, step by step on small tensors, and
through the shared loop (resume skips D's Fisher pass and restores its mask)."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import torch
from torch import nn

from adaptune.common.errors import ConfigError
from conftest import compose, glue_overrides, write_glue
from adaptune.runner import checkpoint as ckpt
from adaptune.runner.loop import Interrupted, Trainer, run
from adaptune.schedules import build_schedule
from adaptune.schedules.childtuning import ChildTuningD, ChildTuningDSchedule, ChildTuningF, percentile_threshold


# --------------------------------------------------------------------------- ChildTuning-F
def _grads(*shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.zeros(s)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    return params


def test_f_keeps_bernoulli_entries_rescaled_by_one_over_reserve_p():
    params = _grads((3, 4), (5,))
    f = ChildTuningF(params, reserve_p=0.3, seed=7)
    replica = torch.Generator().manual_seed(7)
    for step in range(3):  # a fresh B every step, continuing the schedule's own stream
        before = [p.grad.clone() for p in params]
        f.apply()
        for p, g in zip(params, before):
            keep = torch.rand(g.shape, generator=replica) < 0.3
            assert torch.equal(p.grad, g * (keep.float() / 0.3)), step
            kept = p.grad != 0
            assert torch.equal(kept, keep & (g != 0))
            assert torch.allclose(p.grad[kept], g[kept] / 0.3)


def test_f_is_unbiased_and_keeps_reserve_p_of_the_entries():
    (p,) = _grads((4000,))
    g = p.grad.clone()
    f = ChildTuningF([p], reserve_p=0.4, seed=3)
    total, kept = torch.zeros_like(g), 0
    for _ in range(200):
        p.grad = g.clone()
        f.apply()
        total += p.grad
        kept += int((p.grad != 0).sum())
    assert kept / (200 * 4000) == pytest.approx(0.4, abs=0.005)
    # mean over draws ≈ g: per entry the estimate's std is |g|·sqrt((1-q)/(q·200)) ≈ 0.087|g|
    assert torch.allclose(total / 200, g, atol=0.45 * float(g.abs().max()))
    assert float((total / 200 - g).abs().mean()) < 0.1 * float(g.abs().mean())


def test_f_state_resumes_the_stream_and_leaves_the_global_rng_alone():
    params = _grads((6, 6))
    f = ChildTuningF(params, reserve_p=0.3, seed=11)
    rng = torch.get_rng_state()
    f.apply()
    assert torch.equal(torch.get_rng_state(), rng)
    saved = f.state_dict()
    g = params[0].grad.clone()
    f.apply()
    expected = params[0].grad.clone()
    params[0].grad = g.clone()
    other = ChildTuningF(params, reserve_p=0.3, seed=999)
    other.load_state_dict(saved)
    other.apply()
    assert torch.equal(params[0].grad, expected)
    with pytest.raises(ConfigError, match=r"ChildTuning reserve_p=0.3 \(schedule.keep_p\), this run has 0.5"):
        ChildTuningF(params, reserve_p=0.5).load_state_dict(saved)


def _tiny_patterns():
    return {"no_decay": ("bias",), "dps": ("layer",), "sage": ("layer",)}


class Tiny(nn.Module):
    """``h = W x + b`` (the "layer" tensors), ``y = v·h`` (the head), no activation: gradients in
    closed form."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(3, 2)
        self.head = nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            self.layer.weight.copy_(torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.25, -0.5]]))
            self.layer.bias.copy_(torch.tensor([0.1, -0.2]))
            self.head.weight.copy_(torch.tensor([[1.0, -2.0]]))

    def forward(self, x):
        return self.head(self.layer(x)).squeeze(-1)


def test_f_schedule_masks_every_optimizer_tensor_with_the_fast_optimizer():
    model = Tiny()
    schedule = build_schedule({"name": "childtuning_f", "keep_p": 0.5})
    schedule.setup(model, _tiny_patterns(), total_steps=10)
    assert schedule.optimizer.defaults["fused"] is True  # schedule.impl=auto on CPU: fused AdamW
    params = [p for g in schedule.optimizer.param_groups for p in g["params"]]
    assert len(params) == 3
    big = [torch.ones(p.shape) for p in params]
    for p, g in zip(params, big):
        p.grad = g.clone()
    replica = torch.Generator().manual_seed(schedule.child.seed)
    schedule.on_gradients(1)
    for p in params:
        assert torch.equal(p.grad, (torch.rand(p.shape, generator=replica) < 0.5).float() / 0.5)
    for impl, key in (("foreach", "foreach"), ("loop", "foreach")):
        s = build_schedule({"name": "childtuning_f", "impl": impl})
        s.setup(Tiny(), _tiny_patterns(), total_steps=10)
        assert s.optimizer.defaults[key] is (impl == "foreach")


# --------------------------------------------------------------------------- ChildTuning-D
X = [
    np.array([[1.0, 0.0, 2.0], [0.5, -1.0, 1.0]]),
    np.array([[-1.0, 2.0, 0.5], [0.0, 1.0, -1.0]]),
    np.array([[2.0, 1.0, 1.0], [1.0, 1.0, 0.0]]),
]
T = [np.array([1.0, -1.0]), np.array([0.5, 2.0]), np.array([-1.0, 0.0])]


def _hand_fisher(max_norm: float) -> list[np.ndarray]:
    """F for layer.weight and layer.bias of :class:`Tiny` over the batches X/T (mean squared error
    per batch), each tensor's gradient clipped to ``max_norm`` as torch does, in float64."""
    w = np.array([[0.5, -1.0, 2.0], [1.5, 0.25, -0.5]])
    b, v = np.array([0.1, -0.2]), np.array([1.0, -2.0])
    fisher = [np.zeros((2, 3)), np.zeros(2)]
    for x, t in zip(X, T):
        y = (x @ w.T + b) @ v
        dy = 2 * (y - t) / len(t)  # d mean((y-t)^2) / dy
        dh = dy[:, None] * v[None, :]  # (batch, 2)
        for k, g in enumerate((dh.T @ x, dh.sum(0))):
            norm = np.sqrt((g**2).sum())
            g = g * min(1.0, max_norm / (norm + 1e-6))
            fisher[k] += g**2 / len(X)
    return fisher


def _loss_batches(model):
    def loss_of(x, t):
        return lambda: ((model(torch.tensor(x, dtype=torch.float32)) - torch.tensor(t, dtype=torch.float32)) ** 2).mean()

    return [loss_of(x, t) for x, t in zip(X, T)]


@pytest.mark.parametrize("max_norm", [0.8, None])
def test_d_fisher_and_global_percentile_mask(max_norm):
    model = Tiny()
    d = ChildTuningD(model.named_parameters(), reserve_p=0.3, patterns=["layer"])
    assert d.names == ["layer.weight", "layer.bias"]
    d.compute(model, _loss_batches(model), max_grad_norm=max_norm)
    hand = _hand_fisher(max_norm if max_norm else float("inf"))
    flat = np.concatenate([h.reshape(-1) for h in hand])
    threshold = np.percentile(flat, 70)  # 8 entries: index 4.9, between two of them
    assert d.threshold == pytest.approx(threshold, rel=1e-5)
    for mask, h in zip(d.masks, hand):
        assert mask.dtype == torch.bool
        assert torch.equal(mask, torch.from_numpy(h >= threshold))
    assert int(sum(m.sum() for m in d.masks)) == 3 and d.kept == 3 / 8
    assert all(p.grad is None for p in model.parameters())  # the pass leaves no gradient behind
    # percentile_threshold is numpy's on the fp32 scores
    scores = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([[4.0, 10.0]])]
    assert percentile_threshold(scores, 0.3) == pytest.approx(np.percentile([1, 2, 3, 4, 10], 70))


def test_d_mask_is_fixed_and_other_tensors_are_not_masked():
    model = Tiny()
    d = ChildTuningD(model.named_parameters(), reserve_p=0.5, patterns=["layer"])
    d.compute(model, _loss_batches(model), max_grad_norm=1.0)
    masks = [m.clone() for m in d.masks]
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        grads = {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}
        for n, p in model.named_parameters():
            p.grad = grads[n].clone()
        d.apply()
        assert torch.equal(model.layer.weight.grad, grads["layer.weight"] * masks[0])
        assert torch.equal(model.layer.bias.grad, grads["layer.bias"] * masks[1])
        assert torch.equal(model.head.weight.grad, grads["head.weight"])  # no "layer" in its name
    assert all(torch.equal(a, b) for a, b in zip(masks, d.masks))


def test_d_errors_and_state_round_trip():
    model = Tiny()
    with pytest.raises(ConfigError, match=r"schedule.childtuning_patterns=\['blocks'\] matches no parameter"):
        ChildTuningD(model.named_parameters(), patterns=["blocks"])
    d = ChildTuningD(model.named_parameters(), reserve_p=0.3)
    with pytest.raises(RuntimeError, match="no mask yet"):
        d.apply()
    d.compute(model, _loss_batches(model), max_grad_norm=1.0)
    state = d.state_dict()
    fresh = ChildTuningD(model.named_parameters(), reserve_p=0.3)
    fresh.load_state_dict(state)
    assert fresh.threshold == d.threshold and all(torch.equal(a, b) for a, b in zip(fresh.masks, d.masks))
    with pytest.raises(ConfigError, match="different set of tensors"):
        ChildTuningD(model.named_parameters(), reserve_p=0.3, patterns=["layer.weight"]).load_state_dict(state)


def test_d_schedule_pass_keeps_global_rng_and_train_mode():
    model = nn.Sequential()
    model.add_module("layer", nn.Linear(3, 3))
    model.add_module("drop", nn.Dropout(0.5))
    schedule = build_schedule({"name": "childtuning_d"})
    schedule.setup(model, _tiny_patterns(), total_steps=4)
    model.eval()
    rng = torch.get_rng_state()
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    seen = []

    def loss():
        seen.append(model.training)
        return model(x).pow(2).sum()

    schedule.before_training(model, [loss, loss], max_grad_norm=1.0)
    assert seen == [True, True] and not model.training  # dropout on during the pass, mode restored
    assert torch.equal(torch.get_rng_state(), rng)  # training's dropout stays the baseline's
    assert schedule.log_metrics(1)["childtuning/kept_fraction"] == pytest.approx(4 / 12)  # top 30%


# --------------------------------------------------------------------------- through the loop
def _overrides(data, *extra):
    return glue_overrides(
        data,
        "rte",
        "trainer.batch_size=8",
        "trainer.max_steps=4",
        "trainer.save_every=2",
        "trainer.eval_every=4",
        "trainer.log_every=2",
        "schedule.lr=5e-3",
        "schedule.warmup_ratio=0.0",
        "task.model.config_overrides.hidden_dropout_prob=0.1",
        *extra,
    )


def test_d_with_keep_p_1_trains_exactly_like_the_baseline(tmp_path):
    """The Fisher pass (dropout on) draws nothing from the run's RNG and a full mask changes
    nothing: the weights equal the baseline's bit for bit."""
    data = write_glue(tmp_path / "rte", "rte", n_train=32, n_dev=8)
    base = run(compose(_overrides(data, "schedule=baseline")), tmp_path / "base")
    child = run(compose(_overrides(data, "schedule=childtuning_d", "schedule.keep_p=1.0")), tmp_path / "d")
    a = ckpt.load(tmp_path / "base" / "checkpoints" / "last.pt")["model"]
    b = ckpt.load(tmp_path / "d" / "checkpoints" / "last.pt")
    assert all(torch.equal(a[k], b["model"][k]) for k in a)
    assert child["train_loss"] == base["train_loss"]
    assert all(bool(m.all()) for m in b["schedule"]["masks"].values())


def test_d_resume_skips_the_pass_and_restores_the_mask(tmp_path, monkeypatch):
    data = write_glue(tmp_path / "rte", "rte", n_train=32, n_dev=8)
    passes = {"n": 0}
    original_pass = ChildTuningDSchedule.before_training

    def counting(self, *args):
        passes["n"] += 1
        return original_pass(self, *args)

    monkeypatch.setattr(ChildTuningDSchedule, "before_training", counting)
    full = run(compose(_overrides(data, "schedule=childtuning_d")), tmp_path / "full")
    assert passes["n"] == 1 and full["steps"] == 4
    state = ckpt.load(tmp_path / "full" / "checkpoints" / "last.pt")["schedule"]
    assert state["kind"] == "d" and state["threshold"] > 0
    assert {n.split(".layer.")[0] for n in state["masks"]} == {"bert.encoder"}
    kept = sum(int(m.sum()) for m in state["masks"].values()) / sum(m.numel() for m in state["masks"].values())
    assert kept == pytest.approx(0.3, abs=0.01)

    original_step = Trainer._train_step

    def interrupting(self, step, *args):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return original_step(self, step, *args)

    monkeypatch.setattr(Trainer, "_train_step", interrupting)
    with pytest.raises(Interrupted):
        run(compose(_overrides(data, "schedule=childtuning_d")), tmp_path / "cut")
    monkeypatch.setattr(Trainer, "_train_step", original_step)
    assert passes["n"] == 2
    resumed = run(compose(_overrides(data, "schedule=childtuning_d", "resume=true")), tmp_path / "cut")
    assert passes["n"] == 2  # no second pass on resume
    a = ckpt.load(tmp_path / "full" / "checkpoints" / "last.pt")
    b = ckpt.load(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["schedule"]["masks"][k], b["schedule"]["masks"][k]) for k in a["schedule"]["masks"])
    assert resumed["train_loss"] == full["train_loss"]


def test_f_trains_through_the_loop(tmp_path):
    data = write_glue(tmp_path / "rte", "rte", n_train=32, n_dev=8)
    res = run(compose(_overrides(data, "schedule=childtuning_f")), tmp_path / "f")
    base = run(compose(_overrides(data, "schedule=baseline")), tmp_path / "base")
    assert res["steps"] == 4 and res["train_loss"] != base["train_loss"]
    state = ckpt.load(tmp_path / "f" / "checkpoints" / "last.pt")["schedule"]
    assert state["kind"] == "f" and state["device"] == "cpu"
    a = ckpt.load(tmp_path / "f" / "checkpoints" / "last.pt")["model"]
    b = ckpt.load(tmp_path / "base" / "checkpoints" / "last.pt")["model"]
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_fisher_pass_reports_progress_every_tenth(caplog):
    from adaptune.schedules.childtuning.schedule import _fisher_progress

    with caplog.at_level("INFO", logger="adaptune"):
        for done in range(1, 24):
            _fisher_progress(done, 23)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 10 and lines[-1] == "ChildTuning-D Fisher pass: 23 of 23 batches (100%)"
    assert lines[0] == "ChildTuning-D Fisher pass: 3 of 23 batches (13%)"
