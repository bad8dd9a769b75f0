"""``adaptune export RUN_DIR OUT_DIR``: a trained run's model in its framework's own format.

- GLUE-style runs: a Hugging Face model directory (``save_pretrained``: ``config.json`` with the
  label names, safetensors weights, the tokenizer) that
  ``AutoModelForSequenceClassification.from_pretrained(OUT_DIR)`` loads and that predicts exactly
  what the checkpoint predicts. LoRA runs: the peft adapter directory (``PeftModel.from_pretrained``
  over the base model), or with ``--merge`` the adapters merged into a plain model.
- Image-classification runs: timm's own format (``timm.models.save_for_hf``: ``config.json``
  with the architecture, ``num_classes``, ``model_args`` and ``pretrained_cfg``, and
  ``model.safetensors``), which loads as::

      cfg = json.load(open("OUT_DIR/config.json"))
      model = timm.create_model(cfg["architecture"], pretrained=True, **cfg["model_args"],
                                pretrained_cfg_overlay={"file": "OUT_DIR/model.safetensors",
                                                        "num_classes": cfg["num_classes"]})

  (``num_classes`` in the overlay: without it timm drops a head whose size differs from the
  architecture's default pretrained config.)

The checkpoint is ``best.pt`` (the best dev evaluation) when the run has one, else ``last.pt``
(``--checkpoint`` picks). The model is rebuilt from the run's saved config by its task, the
weights loaded, and saved in eval form (DPS-Mix and Mixout forwards return the raw weights in eval
mode, so the weights are the model's). Translation runs are not exported (their checkpoint is the
model; a one-line error says so).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from adaptune.common.errors import ConfigError

from . import checkpoint as ckpt

log = logging.getLogger("adaptune")


def run_config(run_dir: Path) -> dict:
    """The resolved config a run was trained with (``results.json``, else ``checkpoints/last.pt``)."""
    from .resume import saved_config

    try:
        results = json.loads((run_dir / "results.json").read_text())
    except (OSError, json.JSONDecodeError):
        results = None
    config = saved_config(run_dir, results if isinstance(results, dict) else None)
    if config is not None:
        return config
    raise ConfigError(f"{run_dir} holds no run config (results.json or checkpoints/last.pt); is it a run directory?")


def checkpoint_path(run_dir: Path, which: str) -> Path:
    ckpts = run_dir / "checkpoints"
    order = {"best": (ckpt.BEST,), "last": (ckpt.LAST, ckpt.PREVIOUS), "auto": (ckpt.BEST, ckpt.LAST, ckpt.PREVIOUS)}[which]
    for name in order:
        if (ckpts / name).is_file() and ckpt.damage(ckpts / name) is None:
            return ckpts / name
    raise ConfigError(f"{ckpts} has no intact {' or '.join(order)}; train the run first (or pick --checkpoint)")


def build_model(config: dict, run_dir: Path, weights: Path):
    """(task, model in eval mode with the checkpoint's weights) rebuilt from the run's config."""
    import torch

    from adaptune.tasks import build_task

    torch.manual_seed(int(config.get("seed", 0)))
    task = build_task(config["task"], run_dir, seed=int(config.get("seed", 0)))
    task.setup()  # the tokenizer and label names (GLUE); the data's classes (images)
    model = task.build_model()
    ckpt.load_weights(model, ckpt.load(weights), weights)
    return task, model.eval()


def _export_hf(task, model, out: Path, merge: bool) -> str:
    is_peft = hasattr(model, "peft_config")
    labels = getattr(getattr(task, "spec", None), "labels", None)
    base = model.get_base_model() if is_peft else model
    if labels:
        base.config.id2label = dict(enumerate(labels))
        base.config.label2id = {name: i for i, name in enumerate(labels)}
    if is_peft and merge:
        model, is_peft = model.merge_and_unload(), False
    model.save_pretrained(str(out))
    task.tokenizer.save_pretrained(str(out))
    kind = (
        "a peft LoRA adapter (PeftModel.from_pretrained over the base model)"
        if is_peft
        else "a Hugging Face model directory (AutoModelForSequenceClassification.from_pretrained)"
    )
    return kind


def _export_timm(model, out: Path) -> str:
    from timm.models import save_for_hf

    save_for_hf(model, str(out), safe_serialization=True)
    return "timm's format (config.json + model.safetensors)"


def export(run_dir: Path, out: Path, which: str = "auto", merge: bool = False) -> Path:
    run_dir, out = Path(run_dir), Path(out)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is not a directory")
    config = run_config(run_dir)
    kind = (config.get("task") or {}).get("kind")
    if kind not in ("glue", "vit"):
        raise ConfigError(
            f"adaptune export supports GLUE-style and image-classification runs; {run_dir} is "
            f"task.kind={kind} (a translation run's checkpoint is its model)"
        )
    weights = checkpoint_path(run_dir, which)
    task, model = build_model(config, run_dir, weights)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; choose a new directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        what = _export_hf(task, model, out, merge) if kind == "glue" else _export_timm(model, out)
    except OSError as err:
        raise ckpt.WriteFailed(out, ckpt.describe_os_error(err)) from err
    print(f"adaptune export: {weights} -> {out}: {what}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adaptune export", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run directory (holding results.json / checkpoints/)")
    parser.add_argument("out_dir", help="a new directory for the exported model")
    parser.add_argument(
        "--checkpoint", choices=["auto", "best", "last"], default="auto", help="auto: best.pt when the run has one, else last.pt"
    )
    parser.add_argument("--merge", action="store_true", help="LoRA runs: merge the adapters into a plain model")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        export(Path(args.run_dir), Path(args.out_dir), args.checkpoint, args.merge)
    except ConfigError as err:
        print(f"adaptune export: error: {err}", file=sys.stderr)
        return 2
    return 0
