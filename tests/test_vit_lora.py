"""``task.peft=lora`` on the timm image-classification task (tasks/vit.py): LoRA adapters on the
attention ``qkv`` and the classifier head train, every other weight stays bit-identical; SAGE scales
``lora_A``, DPS selects from ``lora_A`` / ``lora_B``; bad target modules are a one-line error."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("timm")
peft = pytest.importorskip("peft")

from adaptune.common.errors import ConfigError  # noqa: E402
from conftest import REPO, compose  # noqa: E402
from adaptune.runner import checkpoint as ckpt  # noqa: E402
from adaptune.runner.loop import Interrupted, Trainer, run  # noqa: E402
from adaptune.tasks.timm_models import classifier_names  # noqa: E402
from adaptune.tasks.vit import ImageClassificationTask  # noqa: E402
from test_vit import CLASSES, TINY, task_cfg, write_imagefolder  # noqa: E402

ADAPTER = ("lora_A.", "lora_B.")
HEAD = "head.modules_to_save."
SCHEDULES = {"sage": ["schedule=sage", "schedule.base=adamw"], "dps": ["schedule=dps", "schedule.update_ratio=0.34"]}
STEPS = 6


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagefolder")
    write_imagefolder(root, {"train": 8, "val": 4})
    return root


def overrides(folder: Path, schedule: str, *extra: str) -> list[str]:
    kwargs = ",".join(f"{k}:{v}" for k, v in TINY.items())
    return [
        "task=vit",
        "trainer=cpu_fast",
        "logger=none",
        "task.dataset=imagefolder",
        f"task.data_dir={folder}",
        "task.model.name=vit_tiny_patch16_224",
        "task.model.pretrained=false",
        "task.model.img_size=16",
        f"task.model.kwargs={{{kwargs}}}",
        "task.augment.scale=[0.8,1.0]",
        "task.augment.crop_pct=1.0",
        "trainer.batch_size=8",
        "trainer.eval_batch_size=16",
        f"trainer.max_steps={STEPS}",
        "trainer.save_every=3",
        "trainer.progress=false",
        "trainer.num_threads=1",
        "task.peft=lora",
        "task.lora.r=4",
        "schedule.lr=3e-3",
        "schedule.warmup_ratio=0.0",
        *SCHEDULES[schedule],
        *extra,
    ]


def names_of(model: torch.nn.Module, params) -> set[str]:
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


@pytest.fixture(scope="module")
def lora_run(folder, tmp_path_factory):
    """``lora_run(schedule)``: (trainer, initial state dict, results, run dir) of one runner run,
    cached per schedule (tests (a) and (b) share it; the resume test compares against it)."""
    cache: dict[str, tuple] = {}

    def get(schedule: str):
        if schedule not in cache:
            seen = {}
            original = Trainer.fit

            def capture(self, *args, **kwargs):  # after build_model / schedule setup, before step 1
                seen["trainer"] = self
                seen["initial"] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
                return original(self, *args, **kwargs)

            run_dir = tmp_path_factory.mktemp(f"lora_{schedule}")
            with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mp.setattr(Trainer, "fit", capture)
                results = run(compose(overrides(folder, schedule)), run_dir)
            cache[schedule] = (seen["trainer"], seen["initial"], results, run_dir)
        return cache[schedule]

    return get


# ----------------------------------------------------------------------------- (a) frozen base
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_lora_run_keeps_base_weights_bit_identical(lora_run, schedule):
    trainer, initial, results, run_dir = lora_run(schedule)
    assert results["status"] == "completed" and results["steps"] == STEPS
    model = trainer.model
    assert isinstance(model, peft.PeftModel)
    # peft froze everything but the adapters and the head's trainable copy
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in initial if any(s in n for s in ADAPTER) or HEAD in n}
    assert len([n for n in trainable if "lora_A." in n]) == TINY["depth"]  # one qkv per block
    assert {n for n in trainable if HEAD in n} == {
        "base_model.model.head.modules_to_save.default.weight",
        "base_model.model.head.modules_to_save.default.bias",
    }

    final = ckpt.load(run_dir / "checkpoints" / ckpt.LAST)["model"]
    assert final.keys() == initial.keys()
    base = [k for k in initial if not any(s in k for s in ADAPTER) and HEAD not in k]
    assert any(".qkv.base_layer.weight" in k for k in base) and any("head.original_module" in k for k in base)
    assert any("pos_embed" in k for k in base) and any("mlp.fc1.weight" in k for k in base)
    for k in base:
        assert torch.equal(final[k], initial[k]), k
    moved = {k for k in initial if not torch.equal(final[k], initial[k])}
    lora_b = {k for k in initial if "lora_B." in k}
    assert lora_b <= moved and all(bool(final[k].abs().sum() > 0) for k in lora_b)  # zero-initialised
    assert any("lora_A." in k for k in moved)
    assert {k for k in initial if HEAD in k} <= moved


# ----------------------------------------------------------------------------- (b) SAGE / DPS sets
def test_sage_scales_lora_a_and_dps_selects_lora_a_and_b(lora_run):
    sage, initial, _, _ = lora_run("sage")
    model = sage.model
    lora_a = {n for n, _ in model.named_parameters() if "lora_A." in n}
    lora_b = {n for n, _ in model.named_parameters() if "lora_B." in n}
    assert len(lora_a) == len(lora_b) == TINY["depth"]
    assert sage.patterns["sage"] == ("lora_A.",) and sage.patterns["dps"] == ADAPTER
    groups = sage.optimizer.param_groups
    flagged = names_of(model, [p for g in groups if g["sage"] for p in g["params"]])
    plain = names_of(model, [p for g in groups if not g["sage"] for p in g["params"]])
    assert flagged == lora_a
    assert plain == lora_b | {n for n in initial if HEAD in n}

    dps = lora_run("dps")[0]
    assert set(dps.schedule.dps.names) == lora_a | lora_b
    # every trainable parameter is in the optimizer, no frozen one is
    in_opt = names_of(dps.model, [p for g in dps.optimizer.param_groups for p in g["params"]])
    assert in_opt == {n for n, p in dps.model.named_parameters() if p.requires_grad}


def test_param_patterns_and_head_through_the_wrapper(tmp_path):
    def task(**over):
        t = ImageClassificationTask(task_cfg(peft="lora", **over), run_dir=tmp_path, seed=0)
        t.classes = list(CLASSES)
        return t

    t = task()
    model = t.build_model()
    pats = t.param_patterns(model)
    assert pats["sage"] == ("lora_A.",) and pats["dps"] == ADAPTER
    # the ViT's own no_weight_decay() (dist_token is not in the family's list) is read through peft
    assert {"pos_embed", "cls_token", "dist_token", "bias", "norm"} <= set(pats["no_decay"])
    assert model.pretrained_cfg["classifier"] == "head" and model(torch.zeros(2, 3, 16, 16)).shape == (2, 4)
    # full fine-tuning keeps the family's patterns
    full = ImageClassificationTask(task_cfg(), run_dir=tmp_path, seed=0)
    assert full.param_patterns(model)["sage"] == ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")

    # ResNets: the head is fc; null targets ([qkv]) match nothing there: one line naming the key
    import timm

    assert classifier_names(timm.create_model("resnet10t", num_classes=4)) == ["fc"]
    resnet = {"name": "resnet10t", "img_size": None, "kwargs": {}}
    with pytest.raises(ConfigError) as err:
        task(model=resnet).build_model()
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("task.lora.target_modules=['qkv']") and "null means" in msg
    wrapped = task(model=resnet, lora={"target_modules": ["conv2"]}).build_model()  # Conv2d adapters
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert {n for n in trainable if "lora_" not in n} == {
        "base_model.model.fc.modules_to_save.default.weight",
        "base_model.model.fc.modules_to_save.default.bias",
    }


# ----------------------------------------------------------------------------- (c) CLI error
@pytest.mark.e2e
def test_cli_bad_target_modules_is_one_line(folder, tmp_path):
    args = [*overrides(folder, "sage"), "task.lora.target_modules=[nope]", f"hydra.run.dir={tmp_path / 'run'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "adaptune", *args], cwd=REPO, capture_output=True, text=True, timeout=300, env=env
    )
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("adaptune: error: task.lora.target_modules=['nope']: "), out.stderr
    assert "Traceback" not in out.stderr


# ----------------------------------------------------------------------------- (d) resume
def test_resumed_lora_dps_run_is_bit_identical(lora_run, folder, tmp_path, monkeypatch):
    _, _, full, full_dir = lora_run("dps")
    original = Trainer._train_step

    def interrupting(self, step, *args):
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, step, *args)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        monkeypatch.setattr(Trainer, "_train_step", interrupting)
        with pytest.raises(Interrupted, match=f"interrupted at step 4/{STEPS}"):
            run(compose(overrides(folder, "dps")), tmp_path / "cut")
        assert ckpt.load(tmp_path / "cut" / "checkpoints" / ckpt.LAST)["state"]["step"] == 4
        monkeypatch.setattr(Trainer, "_train_step", original)
        resumed = run(compose(overrides(folder, "dps", "resume=true")), tmp_path / "cut")
    assert resumed["steps"] == STEPS
    a = ckpt.load(full_dir / "checkpoints" / ckpt.LAST)["model"]
    b = ckpt.load(tmp_path / "cut" / "checkpoints" / ckpt.LAST)["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed["final"] == full["final"] and resumed["train_loss"] == full["train_loss"]
