"""SAGE through timm's ``create_optimizer_v2``: with timm's own groups (layer decay, no-decay) and with
``param_group_fn=sage_param_group_fn(...)``."""

from __future__ import annotations

import copy

import pytest
import torch

timm = pytest.importorskip("timm")

from adaptune.common.errors import ConfigError  # noqa: E402
from adaptune.schedules.integrations.timm import (  # noqa: E402
    TIMM_TESTED,
    adamax_sage,
    adamw_sage,
    register_sage_optimizers,
    sage_param_group_fn,
    sage_split_groups,
)
from adaptune.schedules.sage import AdamaxSAGE, AdamWSAGE, HFAdamW  # noqa: E402


def tiny_vit():
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3
    )


@pytest.mark.parametrize("name,cls", [("adamwsage", AdamWSAGE), ("adamaxsage", AdamaxSAGE)])
def test_create_optimizer_v2_builds_sage_groups(name, cls):
    from timm.optim import create_optimizer_v2

    assert set(register_sage_optimizers()) == {"adamwsage", "adamaxsage"}
    register_sage_optimizers()  # idempotent
    model = tiny_vit()
    opt = create_optimizer_v2(
        model, opt=name, lr=1e-3, weight_decay=0.05, beta3=0.8, param_group_fn=sage_param_group_fn(weight_decay=0.05)
    )
    assert type(opt) is cls and opt.defaults["beta3"] == 0.8
    names = {id(p): n for n, p in model.named_parameters()}
    sage = [names[id(p)] for g in opt.param_groups if g["sage"] for p in g["params"]]
    assert len(sage) == 2 * 8 and all(".attn." in n or ".mlp." in n for n in sage)
    no_decay = [names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]]
    assert "pos_embed" in no_decay and "cls_token" in no_decay and all("weight" not in n or "norm" in n for n in no_decay)
    x = torch.randn(2, 3, 32, 32)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        model(x).logsumexp(-1).sum().backward()
        opt.step()
        opt.zero_grad()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


# ------------------------------------------------------------------ timm's own groups (no param_group_fn)
VIT_SAGE = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def patterned_weight(name: str, patterns=VIT_SAGE) -> bool:
    """What the timm path gives SAGE: the weights (not the biases) the patterns match."""
    return any(p in name for p in patterns) and name.endswith(".weight")


def by_name(model, opt, key):
    """Parameter name -> the value of ``key`` in the group holding it (None if the group has none)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g.get(key) for g in opt.param_groups for p in g["params"]}


def test_registry_is_the_one_behind_create_optimizer_v2():
    """Registration writes into a private timm object; this fails first, and says so, if timm moves it."""
    import timm.optim

    try:
        from timm.optim import OptimizerRegistry
        from timm.optim._optim_factory import default_registry
    except ImportError as err:  # pragma: no cover - only on a timm that moved it
        pytest.fail(
            f"timm {timm.__version__} has no timm.optim._optim_factory.default_registry ({err}): "
            f"moved, or older than the tested range timm{TIMM_TESTED}; register_sage_optimizers() "
            "must follow it"
        )
    assert isinstance(default_registry, OptimizerRegistry)
    register_sage_optimizers()
    assert {"adamwsage", "adamaxsage"} <= set(timm.optim.list_optimizers()), (
        "timm.optim.list_optimizers() no longer reads _optim_factory.default_registry"
    )
    assert timm.optim.get_optimizer_info("adamwsage").opt_class is adamw_sage
    assert timm.optim.get_optimizer_info("adamaxsage").opt_class is adamax_sage


def test_registration_is_idempotent_without_overwrite_warnings(caplog):
    register_sage_optimizers()
    with caplog.at_level("WARNING"):
        register_sage_optimizers()
    assert "already registered" not in caplog.text


@pytest.mark.parametrize("name", ["adamwsage", "adamaxsage"])
@pytest.mark.parametrize("layer_decay", [0.65, None])
def test_timm_groups_lr_scale_and_decay_as_timm_adamw(name, layer_decay):
    """Each tensor gets the lr_scale and weight decay that timm's own adamw gives it, and, under a timm
    scheduler, the same lr; layer decay gives the layers different lrs."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    register_sage_optimizers()
    model = tiny_vit()
    kw = dict(lr=1e-3, weight_decay=0.05, layer_decay=layer_decay)
    ours = create_optimizer_v2(model, name, beta3=0.75, **kw)
    theirs = create_optimizer_v2(model, "adamw", **kw)
    assert type(ours) is {"adamwsage": AdamWSAGE, "adamaxsage": AdamaxSAGE}[name]
    for key in ("lr_scale", "weight_decay"):
        assert by_name(model, ours, key) == by_name(model, theirs, key), key
    for opt in (ours, theirs):
        CosineLRScheduler(opt, t_initial=10)
    lrs = by_name(model, ours, "lr")
    assert lrs == by_name(model, theirs, "lr")
    if layer_decay is None:
        assert set(lrs.values()) == {1e-3}
    else:  # embeddings, block 0, block 1 (+ final norm), head: 0.65^3, 0.65^2, 0.65, 1
        assert lrs["pos_embed"] == pytest.approx(1e-3 * 0.65**3)
        assert lrs["blocks.0.attn.qkv.weight"] == pytest.approx(1e-3 * 0.65**2)
        assert lrs["blocks.1.mlp.fc2.weight"] == pytest.approx(1e-3 * 0.65)
        assert lrs["head.weight"] == pytest.approx(1e-3)


def test_no_weight_decay_on_biases_norms_and_embeddings():
    from timm.optim import create_optimizer_v2

    register_sage_optimizers()
    model = tiny_vit()
    wd = by_name(model, create_optimizer_v2(model, "adamwsage", lr=1e-3, weight_decay=0.05, layer_decay=0.65), "weight_decay")
    for n, value in wd.items():
        no_decay = n.endswith(".bias") or "norm" in n or n in ("pos_embed", "cls_token")
        assert value == (0.0 if no_decay else 0.05), n
    assert wd["blocks.0.attn.qkv.weight"] == wd["head.weight"] == wd["patch_embed.proj.weight"] == 0.05


@pytest.mark.parametrize(
    "kw,expect",
    [
        ({"layer_decay": 0.65}, patterned_weight),
        ({}, patterned_weight),
        ({"weight_decay": 0.0}, patterned_weight),  # timm puts every tensor in one no-decay group
        ({"filter_bias_and_bn": False}, patterned_weight),  # biases decay, still no SAGE
        (
            {"layer_decay": 0.65, "fallback_list": ("blocks.0.*",)},  # fallback groups: plain maths
            lambda n: patterned_weight(n) and n.startswith("blocks.1."),
        ),
        ({"sage_patterns": "attn.qkv"}, lambda n: patterned_weight(n, ("attn.qkv",))),
        ({"sage_patterns": ("mlp.fc1",), "layer_decay": 0.65}, lambda n: patterned_weight(n, ("mlp.fc1",))),
    ],
)
def test_sage_flag_on_exactly_the_patterned_tensors(kw, expect):
    import inspect

    from timm.optim import create_optimizer_v2

    if "fallback_list" in kw and "fallback_list" not in inspect.signature(create_optimizer_v2).parameters:
        pytest.skip(f"timm {timm.__version__} has no fallback_list")
    register_sage_optimizers()
    model = tiny_vit()
    flags = by_name(model, create_optimizer_v2(model, "adamwsage", lr=1e-3, **{"weight_decay": 0.05, **kw}), "sage")
    assert flags == {n: expect(n) for n, _ in model.named_parameters()}


def test_patterns_matching_nothing_are_an_error():
    from timm.optim import create_optimizer_v2

    register_sage_optimizers()
    with pytest.raises(ConfigError, match="sage_patterns"):
        create_optimizer_v2(tiny_vit(), "adamwsage", lr=1e-3, family="bert")


@pytest.mark.parametrize("kind,name", [("adamw", "adamwsage"), ("adamax", "adamaxsage")])
def test_steps_match_the_spec_per_tensor(kind, name):
    """Three float64 steps under a timm scheduler with layer decay: every tensor moves as the spec
    transcription of its own (SAGE flag, lr × lr_scale, weight decay) says; at step 1 the SAGE
    tensors and the plain ones differ (AdamW-SAGE: a SAGE tensor only decays)."""
    from test_sage import SpecSAGE
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    register_sage_optimizers()
    model = tiny_vit().double()
    hyper = dict(betas=(0.9, 0.98), eps=1e-6)
    kw = dict(lr=1e-2, weight_decay=0.05, layer_decay=0.65)
    opt = create_optimizer_v2(model, name, beta3=0.75, **hyper, **kw)
    ref = create_optimizer_v2(model, "adamw", **kw)  # timm's own lr_scale / decay per tensor
    scheds = [CosineLRScheduler(o, t_initial=6) for o in (opt, ref)]
    named = list(model.named_parameters())
    sage = {n: patterned_weight(n) for n, _ in named}
    wd = by_name(model, ref, "weight_decay")
    spec = {n: SpecSAGE(kind, [p], [(sage[n], wd[n])], lr=None, beta3=0.75, **hyper) for n, p in named}
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    start = {n: p.detach().clone() for n, p in named}
    for step in range(3):
        for s in scheds:
            s.step(step)
        lrs = by_name(model, ref, "lr")
        opt.zero_grad()
        model(x).logsumexp(-1).sum().backward()
        for n, p in named:
            spec[n].step([p.grad], lrs[n])
        opt.step()
        if step == 0 and kind == "adamw":
            for n, p in named:
                decayed_only = start[n] * (1 - lrs[n] * wd[n])
                assert torch.allclose(p, decayed_only, rtol=0, atol=1e-15) == sage[n], n
    for n, p in named:
        torch.testing.assert_close(p.detach(), spec[n].theta[0], rtol=0, atol=1e-10, msg=n)
    moved = {n: (p - start[n]).abs().max().item() for n, p in named}
    assert all(v > 0 for v in moved.values())


def test_plain_tensors_move_like_hf_adamw_sage_tensors_do_not():
    """The non-SAGE tensors take the plain AdamW maths (HFAdamW, the sage=False update) with their
    group's lr × lr_scale and decay; the SAGE tensors do not."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    register_sage_optimizers()
    model = tiny_vit().double()
    twin = copy.deepcopy(model)
    kw = dict(lr=1e-2, weight_decay=0.05, layer_decay=0.65, eps=1e-6)
    opt = create_optimizer_v2(model, "adamwsage", beta3=0.75, **kw)
    CosineLRScheduler(opt, t_initial=6)
    lrs, wds = by_name(model, opt, "lr"), by_name(model, opt, "weight_decay")
    plain = {n: HFAdamW([p], lr=lrs[n], weight_decay=wds[n], eps=1e-6) for n, p in twin.named_parameters()}
    ours, theirs = dict(model.named_parameters()), dict(twin.named_parameters())
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for _ in range(3):
        opt.zero_grad()
        model(x).logsumexp(-1).sum().backward()
        for n, p in theirs.items():  # the same gradients for both
            p.grad = ours[n].grad.clone()
        opt.step()
        for o in plain.values():
            o.step()
    for n in ours:
        same = torch.allclose(ours[n], theirs[n], rtol=0, atol=1e-12)
        assert same != patterned_weight(n), n


@pytest.mark.parametrize("name", ["adamwsage", "adamaxsage"])
def test_state_dict_round_trip(name, tmp_path):
    from timm.optim import create_optimizer_v2

    register_sage_optimizers()
    model = tiny_vit()
    kw = dict(lr=1e-3, weight_decay=0.05, layer_decay=0.65, beta3=0.75)
    opt = create_optimizer_v2(model, name, **kw)
    x = torch.randn(2, 3, 32, 32)

    def step(m, o):
        o.zero_grad()
        m(x).logsumexp(-1).sum().backward()
        o.step()

    for _ in range(2):
        step(model, opt)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    twin = copy.deepcopy(model)
    restored = create_optimizer_v2(twin, name, **kw)
    restored.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    strip = lambda o: [{k: v for k, v in g.items() if k != "params"} for g in o.param_groups]  # noqa: E731
    assert strip(restored) == strip(opt)
    assert sum("exp_avg_sens" in s for s in restored.state.values()) == 2 * 4
    step(model, opt)
    step(twin, restored)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_named_parameters_and_lookahead():
    """(name, tensor) pairs carry their own names; the groups keep them as ``param_names``."""
    from timm.optim import create_optimizer_v2

    register_sage_optimizers()
    model = tiny_vit()
    opt = create_optimizer_v2(model.named_parameters(), "lookahead_adamwsage", lr=1e-3, beta3=0.8)
    assert type(opt).__name__ == "Lookahead"
    flags = {n: g["sage"] for g in opt.param_groups for n in g["param_names"]}
    assert flags == {n: patterned_weight(n) for n, _ in model.named_parameters()}


def test_tensors_without_names_keep_sage_everywhere():
    """Plain tensors (no model, no names) keep the optimizers' default, as before."""
    from timm.optim import create_optimizer_v2

    register_sage_optimizers()
    opt = create_optimizer_v2(list(tiny_vit().parameters()), "adamwsage", lr=1e-3)
    assert [g["sage"] for g in opt.param_groups] == [True]


def test_timm_groups_without_their_model_are_an_error():
    """Groups timm built from a model, handed over where the model cannot be found: an error, not SAGE everywhere."""
    from timm.optim import param_groups_layer_decay

    groups = param_groups_layer_decay(tiny_vit(), weight_decay=0.05, layer_decay=0.65)
    with pytest.raises(RuntimeError, match="param_group_fn=sage_param_group_fn"):
        adamw_sage(groups, lr=1e-3)
    model = tiny_vit()
    names = {id(p): n for n, p in model.named_parameters()}
    split = sage_split_groups(param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.65), names=names)
    assert {names[id(p)]: g["sage"] for g in split for p in g["params"]} == {n: patterned_weight(n) for n in names.values()}


TRAIN_PY = """
import argparse, json
import timm
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.utils import ParseKwargs
p = argparse.ArgumentParser()
p.add_argument("--opt", default="sgd"); p.add_argument("--lr", type=float, default=None)
p.add_argument("--weight-decay", type=float, default=2e-5); p.add_argument("--momentum", type=float, default=0.9)
p.add_argument("--layer-decay", type=float, default=None)
p.add_argument("--opt-kwargs", nargs="*", default={}, action=ParseKwargs)
args = p.parse_args()
model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                          depth=2, num_heads=2, num_classes=3)
opt = create_optimizer_v2(model, **optimizer_kwargs(cfg=args), **args.opt_kwargs)
names = {id(p): n for n, p in model.named_parameters()}
print(json.dumps({"cls": type(opt).__name__, "beta3": opt.defaults["beta3"],
                  "sage": sorted(names[id(p)] for g in opt.param_groups if g["sage"] for p in g["params"]),
                  "scales": sorted({g["lr_scale"] for g in opt.param_groups})}))
"""


@pytest.mark.e2e
def test_module_runs_a_train_py_with_the_names_registered(tmp_path):
    """``python -m adaptune.schedules.integrations.timm train.py --opt adamwsage ...``: a stand-in for
    timm's train.py (its argument names and its create_optimizer_v2 call) gets SAGE and layer decay."""
    import json
    import subprocess
    import sys

    script = tmp_path / "train.py"
    script.write_text(TRAIN_PY)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "adaptune.schedules.integrations.timm",
            str(script),
            "--opt",
            "adamwsage",
            "--lr",
            "1e-3",
            "--weight-decay",
            "0.05",
            "--layer-decay",
            "0.65",
            "--opt-kwargs",
            "beta3=0.75",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["cls"] == "AdamWSAGE" and got["beta3"] == 0.75
    assert got["sage"] == sorted(n for n, _ in tiny_vit().named_parameters() if patterned_weight(n))
    assert got["scales"] == pytest.approx(sorted(0.65**k for k in range(4)))
