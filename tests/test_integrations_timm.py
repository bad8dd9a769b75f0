"""SAGE groups through timm's ``create_optimizer_v2(param_group_fn=...)`` and registry names."""
from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm")

from adaptune.schedules.integrations.timm import register_sage_optimizers, sage_param_group_fn  # noqa: E402
from adaptune.schedules.sage import AdamaxSAGE, AdamWSAGE  # noqa: E402


def tiny_vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                             depth=2, num_heads=2, num_classes=3)


@pytest.mark.parametrize("name,cls", [("adamwsage", AdamWSAGE), ("adamaxsage", AdamaxSAGE)])
def test_create_optimizer_v2_builds_sage_groups(name, cls):
    from timm.optim import create_optimizer_v2

    assert set(register_sage_optimizers()) == {"adamwsage", "adamaxsage"}
    register_sage_optimizers()   # idempotent
    model = tiny_vit()
    opt = create_optimizer_v2(model, opt=name, lr=1e-3, weight_decay=0.05, beta3=0.8,
                              param_group_fn=sage_param_group_fn(weight_decay=0.05))
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
