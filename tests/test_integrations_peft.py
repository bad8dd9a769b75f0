"""LoRA (peft): SAGE and DPS touch only the adapters (and the head peft keeps trainable), through
the Trainer integrations and through the runner's ``task.peft=lora``."""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("accelerate")

from transformers import Trainer  # noqa: E402

from adaptune.common.errors import ConfigError  # noqa: E402
from conftest import compose, glue_overrides  # noqa: E402
from adaptune.schedules.integrations import is_lora_model, model_patterns  # noqa: E402
from adaptune.schedules.integrations.hf import DPSCallback, sage_optimizer_cls_and_kwargs  # noqa: E402
from test_integrations_hf import Rows, args, tiny_bert  # noqa: E402

ADAPTER = ("lora_A.", "lora_B.")
HEAD = "classifier.modules_to_save"


def lora_bert():
    model = tiny_bert()
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "value"], task_type="SEQ_CLS")
    return peft.get_peft_model(model, config)


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def check_only_adapters_and_head_moved(model, before):
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved, "nothing trained"
    assert all(any(s in n for s in ADAPTER) or HEAD in n for n in moved), sorted(moved)[:5]
    assert any(any(s in n for s in ADAPTER) for n in moved) and any(HEAD in n for n in moved)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(torch.equal(dict(model.named_parameters())[n], before[n]) for n in frozen)
    return moved


def test_lora_patterns_are_the_adapters():
    model = lora_bert()
    assert is_lora_model(model) and not is_lora_model(tiny_bert())
    pats = model_patterns(model)
    assert pats["sage"] == ("lora_A.",) and pats["dps"] == ADAPTER and "bias" in pats["no_decay"]


def test_sage_never_moves_zero_initialised_lora_b():
    """Why SAGE scales lora_A only: I = |θ ⊙ g| is 0 where θ = 0, so is SAGE's multiplier."""
    from adaptune.schedules.integrations.hf import make_sage_optimizer

    model = lora_bert()
    opt = make_sage_optimizer(model, lr=1e-2, sage_patterns=ADAPTER)
    batch = next(Rows().batches(4))
    for _ in range(3):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    lora_b = [p for n, p in model.named_parameters() if "lora_B." in n]
    assert lora_b and all(bool((p == 0).all()) for p in lora_b)


def test_trainer_sage_and_dps_on_lora_touch_only_adapters_and_head(tmp_path):
    model = lora_bert()
    before = snapshot(model)
    cls, kwargs = sage_optimizer_cls_and_kwargs(model, lr=5e-3, beta3=0.8)
    sage_names = {
        n for g in kwargs["sage_groups"] if g["sage"] for p in g["params"] for n, q in model.named_parameters() if q is p
    }
    assert sage_names and all("lora_A." in n for n in sage_names)
    assert len(sage_names) == 2 * 2  # 2 layers x (query, value)
    cb = DPSCallback(p=0.3, update_ratio=0.25)
    Trainer(
        model=model,
        args=args(tmp_path, max_steps=6),
        train_dataset=Rows(),
        callbacks=[cb],
        optimizer_cls_and_kwargs=(cls, kwargs),
    ).train()
    assert cb.dps.names and all(any(s in n for s in ADAPTER) for n in cb.dps.names)
    assert len(cb.dps.names) == 8 and cb.masked_step == 6
    check_only_adapters_and_head_moved(model, before)


def test_trainer_dps_mix_on_lora(tmp_path):
    model = lora_bert()
    before = snapshot(model)
    cb = DPSCallback(variant="mix", p=0.3, update_ratio=0.34)
    Trainer(model=model, args=args(tmp_path, max_steps=6), train_dataset=Rows(), callbacks=[cb]).train()
    assert all("lora_" in n for n in cb.dps.names)
    # parametrized names differ: compare by the plain names of the state dict
    after = model.state_dict()
    moved = {k for k, v in after.items() if k in before and not torch.equal(v, before[k])}
    assert moved and all("lora_" in k or HEAD in k for k in moved), sorted(moved)[:5]


# ------------------------------------------------------------------------------ the runner
def test_runner_lora_config_composes_and_is_checked(tmp_path):
    from adaptune.runner.validate import validate_config

    cfg = compose(
        glue_overrides(
            tmp_path,
            "rte",
            "task.peft=lora",
            "task.lora.r=4",
            "task.lora.alpha=8",
            "task.lora.dropout=0.0",
            "task.lora.target_modules=[query,value]",
        )
    )
    sections = validate_config(cfg)
    assert sections.task.peft == "lora" and sections.task.lora.r == 4
    assert list(sections.task.lora.target_modules) == ["query", "value"]
    with pytest.raises(ConfigError, match="task.peft"):
        validate_config(compose(glue_overrides(tmp_path, "rte", "task.peft=qlora")))
    with pytest.raises(ConfigError, match="task.lora.r"):
        validate_config(compose(glue_overrides(tmp_path, "rte", "task.peft=lora", "task.lora.r=0")))


@pytest.mark.parametrize(
    "schedule",
    [["schedule=baseline"], ["schedule=sage", "schedule.lr=1e-3"], ["schedule=dps", "schedule.update_ratio=0.25"]],
    ids=["baseline", "sage", "dps"],
)
def test_runner_lora_run_trains_only_adapters(tmp_path, glue_dir, monkeypatch, schedule):
    from adaptune.runner.loop import run
    from adaptune.tasks.glue import GlueTask

    built = {}
    original = GlueTask.build_model

    def capture(self):
        model = original(self)
        built["model"], built["before"] = model, snapshot(model)
        return model

    monkeypatch.setattr(GlueTask, "build_model", capture)
    data = glue_dir("rte", n_train=32, n_dev=8)
    cfg = compose(
        glue_overrides(
            data,
            "rte",
            "task.peft=lora",
            "task.lora.r=4",
            "task.lora.dropout=0.0",
            "trainer.batch_size=8",
            "trainer.max_steps=4",
            "schedule.warmup_ratio=0.0",
            *schedule,
        )
    )
    res = run(cfg, tmp_path / "run")
    assert res["steps"] == 4
    model = built["model"]
    assert isinstance(model, peft.PeftModel)
    check_only_adapters_and_head_moved(model, built["before"])
