"""Mixout (docs/algorithms.md §3) against the spec on a small Linear, and through the shared loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adaptune.common.errors import ConfigError
from conftest import compose, glue_overrides, write_glue
from adaptune.runner import checkpoint as ckpt
from adaptune.runner.loop import run
from adaptune.schedules import build_schedule
from adaptune.schedules.mixout import Mixout


class Net(nn.Module):
    def __init__(self, width: int = 5):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.mixed = nn.Linear(width, 3)
        self.plain = nn.Linear(3, 2)
        self.drop = nn.Dropout(0.1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))

    def forward(self, x):
        return self.plain(self.drop(self.mixed(x)))


def _moved(net: Net) -> torch.Tensor:
    """Training moved the mixed weight away from its target: W = W_tgt + delta."""
    delta = torch.randn(net.mixed.weight.shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        net.mixed.parametrizations.weight.original.add_(delta)
    return net.mixed.parametrizations.weight.original.detach().clone()


def test_forward_formula_gradient_without_rescaling_and_eval_reads_w():
    p = 0.6
    net = Net()
    net.drop.p = 0.0
    target = net.mixed.weight.detach().clone()
    mixout = Mixout(net, p, patterns=["mixed"], seed=21)
    w = _moved(net)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(2))
    c = torch.randn(4, 3, generator=torch.Generator().manual_seed(3))

    replica = torch.Generator().manual_seed(21)
    captured = {}
    hook = net.mixed.register_forward_hook(lambda m, i, o: captured.update(out=o))
    net.train()
    net(x)
    n = (torch.rand(5, generator=replica) < 1 - p).float().reshape(1, 5)  # one draw per input column
    w_eff = ((1 - n) * target + n * w - p * target) / (1 - p)
    assert torch.allclose(captured["out"], x @ w_eff.T + net.mixed.bias, atol=1e-5)
    # the gradient to W is dL/dW_eff ⊙ N, without the 1/(1-p) of true autograd
    (captured["out"] * c).sum().backward()
    grad_w_eff = c.T @ x
    assert torch.allclose(net.mixed.parametrizations.weight.original.grad, grad_w_eff * n, atol=1e-6)
    assert torch.equal(mixout.wrappers[0].mask.float(), n)

    net.eval()  # eval: W itself, and no draw
    state = mixout.generator.get_state()
    net(x)
    assert torch.allclose(captured["out"], x @ w.T + net.mixed.bias, atol=1e-6)
    assert torch.equal(mixout.generator.get_state(), state)
    hook.remove()
    assert torch.equal(net.plain.weight, Net().plain.weight)  # not selected: a plain Linear
    assert not hasattr(net.plain, "parametrizations")


def test_mask_is_per_input_column_redrawn_every_forward_at_rate_1_minus_p():
    net = Net(width=400)
    mixout = Mixout(net, 0.7, patterns=["mixed"], seed=4)
    net.train()
    x = torch.randn(2, 400)
    masks = []
    for _ in range(50):
        net(x)
        masks.append(mixout.wrappers[0].mask.clone())
    assert all(m.shape == (1, 400) and m.dtype == torch.bool for m in masks)
    assert not torch.equal(masks[0], masks[1])
    rate = torch.stack(masks).float().mean()
    assert float(rate) == pytest.approx(0.3, abs=0.02)
    assert mixout.kept == pytest.approx(float(masks[-1].float().mean()))
    # shared by every row: in each column, every row reads W_tgt (N = 0) or every row is mixed
    _moved(net)
    net(x)
    w_eff = net.mixed.weight.detach()
    same_as_target = torch.isclose(w_eff, mixout.targets[0], atol=1e-6).all(dim=0)  # columns with N = 0
    assert torch.equal(same_as_target, ~mixout.wrappers[0].mask[0])


def test_state_dict_keys_stay_plain_and_state_resumes():
    net = Net()
    mixout = Mixout(net, 0.5, patterns=["mixed"], seed=8)
    assert "mixed.weight" in net.state_dict() and all("parametrizations" not in k for k in net.state_dict())
    net.train()
    net(torch.randn(2, 5))
    saved = {k: v.clone() if torch.is_tensor(v) else v for k, v in mixout.state_dict().items()}
    target = mixout.targets[0].clone()
    net(torch.randn(2, 5))
    expected = mixout.wrappers[0].mask.clone()

    other = Net()
    with torch.no_grad():
        other.mixed.weight.add_(1.0)  # a resumed model starts from other weights
    restored = Mixout(other, 0.5, patterns=["mixed"], seed=123)
    restored.load_state_dict(saved)
    assert torch.equal(restored.targets[0], target)
    other.train()
    other(torch.randn(2, 5))
    assert torch.equal(restored.wrappers[0].mask, expected)
    with pytest.raises(ConfigError, match=r"Mixout p=0.5 \(schedule.mix_p\), this run has 0.9"):
        Mixout(Net(), 0.9, patterns=["mixed"]).load_state_dict(saved)
    with pytest.raises(ValueError, match=r"^p must be in \[0, 1\), got 1.0"):
        Mixout(Net(), 1.0)


def test_schedule_disables_dropout_and_uses_the_models_linear_patterns():
    patterns = {"no_decay": ("bias",), "dps": ("mixed",), "sage": ("mixed",)}
    net = Net()
    schedule = build_schedule({"name": "mixout"})
    schedule.prepare_model(net, patterns)
    assert net.drop.p == 0.0
    schedule.setup(net, patterns, total_steps=5)
    assert schedule.mixout.names == ["mixed.weight"] and schedule.mixout.p == 0.9
    assert schedule.optimizer.defaults["fused"] is True
    keep = build_schedule({"name": "mixout", "disable_dropout": False, "mixout_patterns": ["plain"]})
    net2 = Net()
    keep.prepare_model(net2, patterns)
    keep.setup(net2, patterns, total_steps=5)
    assert net2.drop.p == 0.1 and keep.mixout.names == ["plain.weight"]
    with pytest.raises(ConfigError, match=r"schedule.mixout_patterns=\['nothing'\] matches no parameter"):
        build_schedule({"name": "mixout", "mixout_patterns": ["nothing"]}).prepare_model(Net(), patterns)


def test_mixout_trains_through_the_loop_and_resumes_its_targets(tmp_path):
    data = write_glue(tmp_path / "rte", "rte", n_train=32, n_dev=8)
    over = glue_overrides(
        data,
        "rte",
        "trainer.batch_size=8",
        "trainer.max_steps=4",
        "trainer.eval_every=4",
        "trainer.log_every=2",
        "schedule.lr=5e-3",
        "schedule=mixout",
        "schedule.mix_p=0.5",
    )
    res = run(compose(over), tmp_path / "m")
    assert res["steps"] == 4
    last = ckpt.load(tmp_path / "m" / "checkpoints" / "last.pt")
    state, model = last["schedule"], last["model"]
    assert state["p"] == 0.5 and "bert.encoder.layer.0.attention.self.query.weight" in state["targets"]
    assert "classifier.weight" in state["targets"]
    name = "bert.encoder.layer.0.attention.self.query.weight"
    assert name in model and not torch.equal(model[name], state["targets"][name])  # trained away from W_tgt
