"""``adaptune export``: a run's model as a Hugging Face directory that predicts exactly what the
checkpoint predicts on the dev set; LoRA adapters merged or not; one-line errors."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest
import torch

from conftest import compose, glue_overrides, write_glue

from adaptune.runner.export import build_model, export, run_config
from adaptune.runner.loop import run

pytestmark = pytest.mark.e2e


def _dev_texts(data):
    with open(data / "dev.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [(r["sentence1"], r["sentence2"]) for r in rows]


def _predict(model, tokenizer, pairs):
    enc = tokenizer(
        [a for a, _ in pairs], [b for _, b in pairs], padding=True, truncation=True, max_length=32, return_tensors="pt"
    )
    with torch.no_grad():
        return model(**enc).logits


@pytest.mark.parametrize("extra", [[], ["task.peft=lora"]], ids=["full", "lora"])
def test_exported_model_predicts_what_the_checkpoint_predicts(tmp_path, extra):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    data = write_glue(tmp_path / "rte", "rte", n_train=32, n_dev=12)
    run_dir = tmp_path / "run"
    run(
        compose(
            glue_overrides(
                data, "rte", "trainer.batch_size=8", "trainer.max_steps=4", "trainer.eval_every=2", "schedule.lr=5e-3", *extra
            )
        ),
        run_dir,
    )
    out = tmp_path / "export"
    export(run_dir, out, merge=bool(extra))
    task, reference = build_model(run_config(run_dir), run_dir, run_dir / "checkpoints" / "best.pt")
    if extra:
        reference = reference.merge_and_unload()
    exported = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    pairs = _dev_texts(data)
    mine, ref = _predict(exported, tokenizer, pairs), _predict(reference, task.tokenizer, pairs)
    torch.testing.assert_close(mine, ref, rtol=0, atol=1e-6)
    assert torch.equal(mine.argmax(-1), ref.argmax(-1))
    assert exported.config.id2label == {0: "entailment", 1: "not_entailment"}
    # and the weights are the trained ones, not the pretrained / initial head
    trained = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)["model"]
    head = [k for k in trained if k.endswith("classifier.weight") or k.endswith("classifier.modules_to_save.default.weight")]
    assert head and torch.equal(exported.classifier.weight, trained[head[0]])


def test_lora_run_exports_the_adapter_without_merge(tmp_path):
    data = write_glue(tmp_path / "rte", "rte", n_train=16, n_dev=8)
    run(compose(glue_overrides(data, "rte", "trainer.batch_size=8", "trainer.max_steps=2", "task.peft=lora")), tmp_path / "run")
    export(tmp_path / "run", tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_export_mistakes_are_one_line_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    out = subprocess.run(
        [sys.executable, "-m", "adaptune", "export", str(tmp_path / "empty"), str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        f"adaptune export: error: {tmp_path / 'empty'} holds no run config (results.json or checkpoints/last.pt); "
        "is it a run directory?"
    ]


def test_image_classification_run_exports_in_timms_format(tmp_path):
    """timm's own format: create_model(arch, pretrained=True, pretrained_cfg_overlay={file: ...})
    loads it and gives the checkpoint's logits."""
    import timm
    from test_vit import TINY, write_imagefolder

    write_imagefolder(tmp_path / "images", {"train": 8, "val": 4})
    over = [
        "task=vit",
        "task.dataset=imagefolder",
        f"task.data_dir={tmp_path / 'images'}",
        "task.model.name=vit_tiny_patch16_224",
        "task.model.pretrained=false",
        "task.model.img_size=16",
        *[f"+task.model.kwargs.{k}={v}" if k not in ("depth",) else f"task.model.kwargs.{k}={v}" for k, v in TINY.items()],
        "logger=none",
        "trainer.progress=false",
        "trainer.precision=fp32",
        "trainer.batch_size=8",
        "trainer.max_steps=2",
        "trainer.num_threads=2",
    ]
    run_dir = tmp_path / "run"
    run(compose(over), run_dir)
    out = export(run_dir, tmp_path / "timm_export")
    import json

    cfg = json.loads((out / "config.json").read_text())
    overlay = {"file": str(out / "model.safetensors"), "num_classes": cfg["num_classes"]}
    model = timm.create_model(cfg["architecture"], pretrained=True, pretrained_cfg_overlay=overlay, **cfg["model_args"]).eval()
    _, reference = build_model(run_config(run_dir), run_dir, run_dir / "checkpoints" / "best.pt")
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=1e-6)
