"""``schedule.impl``: the fast optimizer paths compute what the single-tensor loop computes."""

from __future__ import annotations

import pytest
import torch

from adaptune.common.errors import ConfigError
from adaptune.schedules import build_schedule

PATTERNS = {"sage": ("body",), "dps": ("body",), "no_decay": ("bias", "norm")}


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential()
    model.add_module("body", torch.nn.Linear(16, 32))
    model.add_module("norm", torch.nn.LayerNorm(32))
    model.add_module("head", torch.nn.Linear(32, 3))
    return model


def _train(name: str, impl: str, steps: int = 50, **cfg) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = _model()
    schedule = build_schedule({"name": name, "impl": impl, "lr": 1e-2, **cfg})
    schedule.setup(model, PATTERNS, total_steps=steps)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, 16, generator=gen)
        y = torch.randint(0, 3, (8,), generator=gen)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        schedule.optimizer.step()
        schedule.lr_scheduler.step()
        schedule.optimizer.zero_grad(set_to_none=True)
    return model, schedule.optimizer


@pytest.mark.parametrize(
    "optimizer,impl", [("adamw", "fused"), ("adamw", "foreach"), ("adamw", "auto"), ("adamax", "foreach"), ("adamax", "auto")]
)
def test_fast_paths_equal_the_single_tensor_loop_over_50_steps(optimizer, impl):
    reference, ref_opt = _train("baseline", "loop", optimizer=optimizer)
    fast, opt = _train("baseline", impl, optimizer=optimizer)
    group = opt.param_groups[0]
    assert ref_opt.param_groups[0]["foreach"] in (False, None) and not ref_opt.param_groups[0].get("fused")
    if impl == "fused" or (impl == "auto" and optimizer == "adamw"):
        assert group["fused"] is True
    else:
        assert group["foreach"] is True
    moved = 0.0
    for (name, a), b in zip(reference.named_parameters(), fast.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
        moved = max(moved, float((a - _model().get_parameter(name)).detach().abs().max()))
    assert moved > 1e-2  # the 50 steps really trained


def test_dps_uses_the_fast_base_optimizer():
    _, opt = _train("dps", "auto", steps=20)
    assert all(g["fused"] is True for g in opt.param_groups)


def test_an_implementation_the_optimizer_lacks_is_a_config_error():
    with pytest.raises(
        ConfigError, match="schedule.impl=fused: Adamax has no fused implementation; allowed: auto, foreach, loop"
    ):
        _train("baseline", "fused", optimizer="adamax", steps=1)
    with pytest.raises(ConfigError, match="schedule.impl='nope' is unknown; allowed: auto, fused, foreach, loop"):
        build_schedule({"name": "baseline", "impl": "nope"})


def test_warmup_linear_ppb_is_pytorch_pretrained_berts_warmup_linear():
    """Factors at progress 0, w, 0.5 and 1 (T = 1000, w = 0.1) against ``x/w if x < w else 1 - x``,
    through LambdaLR as the loop drives it (lr of the update after s completed updates)."""
    import torch

    from adaptune.schedules.lr import build_lr_scheduler

    def reference(x, w=0.1):
        return x / w if x < w else 1.0 - x

    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=2.0)
    sched = build_lr_scheduler(opt, "warmup_linear_ppb", warmup=100, total_steps=1000)
    lrs = []
    for _ in range(1001):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    for s in (0, 50, 100, 500, 999, 1000):
        assert lrs[s] == pytest.approx(2.0 * reference(s / 1000)), s
    assert lrs[100] == pytest.approx(1.8) and lrs[99] == pytest.approx(1.98)  # 0.9 after warmup, not 1.0
    linear = build_lr_scheduler(torch.optim.SGD([param], lr=2.0), "linear", warmup=100, total_steps=1000)
    factor = linear.lr_lambdas[0]
    assert factor(500) / reference(0.5) == pytest.approx(1 / 0.9)  # linear is 1.11x higher after warmup
