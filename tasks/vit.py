"""Image classification with timm models (``task.kind=vit``): ViT fine-tuning or training from scratch.

The shared loop (``runner/loop.py``) drives this task like every other, so baseline, SAGE and DPS
apply unchanged; its parameter patterns are timm ViT's (``param_patterns``, ``common/families.py``):
SAGE and DPS select ``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``; DPS also the ``head``;
no weight decay also for what the model lists in ``no_weight_decay()``.

Model: ``timm.create_model(task.model.name, pretrained=..., num_classes=<from data>,
img_size=task.model.img_size, **task.model.kwargs)``; any timm model name works (``img_size:
null`` for models that take no such argument, e.g. ResNets). ``pretrained=true`` downloads the
weights from the Hugging Face hub (timm's default source); offline that is a one-line
``ConfigError`` pointing at ``task.model.pretrained=false`` or ``task.model.pretrained_file``
(a local weights file that timm adapts to the new number of classes).

LoRA (``task.peft=lora``, :mod:`adaptune.tasks.lora`): the model is wrapped by peft with adapters on
``task.lora.target_modules`` (null: ``adaptune.tasks.timm_models.TIMM_LORA_TARGETS``, the attention ``qkv``) and the classifier
head (the module timm's ``pretrained_cfg["classifier"]`` names: ``head`` for ViT, ``fc`` for ResNets)
kept trainable as a peft ``modules_to_save`` copy; every other weight is frozen and SAGE / DPS act on
the adapters only (``adaptune.common.families.lora_patterns``).

Data (``task.dataset``: cifar10, cifar100, fashion_mnist, imagefolder, hf) is read by
:mod:`adaptune.tasks.vit_data`, which describes each dataset and the check of image files at setup.

Splits: evaluation split ``"dev"`` uses the validation split where the data has one, else the
test split; ``"test"`` uses the test split, else the validation split. ``train_subset`` trains on a
random subset (a function of the seed); ``eval_subset`` caps the evaluation splits (the same
examples for every seed).

Grayscale images (Fashion-MNIST) are converted to 3 channels, so that every timm model and its
pretrained weights apply unchanged; ``task.model.kwargs.in_chans=1`` keeps one channel instead
(only for models trained from scratch).

Determinism: small datasets (CIFAR, Fashion-MNIST) are held in memory as uint8 arrays; files are
read per batch. ``train_batches(epoch)`` is a pure function of (seed, epoch). ``make_batch``
decodes and augments each example under the global Python / NumPy / torch-CPU generators seeded
from (seed, epoch, example position) and restores their states afterwards, so a batch is the same
whenever it is built (resumed runs reproduce exactly) and the loop's own RNG stream is untouched.
Mixup / CutMix draw per batch from (seed, epoch, batch number).

Unreadable images: ``task.verify_images`` / ``task.on_bad_image`` check the files at setup
(:func:`adaptune.tasks.vit_data.verify_images`). A file that passes the check but fails to decode later
(possible with ``quick``, or if it changes during the run) is dropped from its batch with a
warning rather than stopping a long run half-way; the loss is a sum with ``sample_size`` = the
examples actually in the batch, so the step stays correctly normalised.

Metrics (``eval_step`` sums, ``finalize`` divides): ``top1`` and ``top5`` accuracy as fractions
in [0, 1] (``top5`` is top-k with k = min(5, number of classes)) and ``loss``, the mean
cross-entropy per example (without label smoothing).
"""

from __future__ import annotations

import contextlib
import logging
import random
import warnings
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from adaptune.common.errors import ConfigError
from adaptune.common.families import ParamPatterns, family_patterns, lora_patterns

from . import vit_data
from .base import StepLoss, Task
from .config import ViTConfig
from .timm_models import build_timm_model
from .vit_data import abs_path as _abs_path, one_line as _one_line
from .vit_data import DATASETS, FMNIST_DIR, ON_BAD_IMAGE, VERIFY_IMAGES, Source, Split, read_idx  # noqa: F401

log = logging.getLogger("adaptune")


class BatchPlan(NamedTuple):
    """One planned training batch: positions into the training split."""

    epoch: int
    number: int
    indices: tuple[int, ...]


# ----------------------------------------------------------------------------- small helpers
def _mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (NumPy's SeedSequence hashing)."""
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


@contextlib.contextmanager
def _private_rngs():
    """Yield a function that reseeds Python/NumPy/torch-CPU global RNGs; restore them on exit.

    timm and torchvision transforms draw from these global generators; seeding them per example
    makes augmentation reproducible without disturbing the training loop's own RNG stream.
    """
    py_state = random.getstate()
    np_state = np.random.get_state()
    torch_state = torch.default_generator.get_state()

    def reseed(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.default_generator.manual_seed(seed)

    try:
        yield reseed
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.default_generator.set_state(torch_state)


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, k: int = 5) -> tuple[int, int]:
    """(top-1 correct, top-min(k, C) correct) counts for ``logits`` [N, C] and class ``targets`` [N]."""
    if logits.shape[0] == 0:
        return 0, 0
    k = min(k, logits.shape[-1])
    pred = logits.topk(k, dim=-1).indices
    hit = pred.eq(targets.view(-1, 1))
    return int(hit[:, :1].any(dim=1).sum()), int(hit.any(dim=1).sum())


# ----------------------------------------------------------------------------- the task
class ImageClassificationTask(Task):
    kind = "vit"
    schema = ViTConfig
    main_metric = "top1"
    greater_is_better = True

    def __init__(self, cfg: Mapping[str, Any], run_dir: Path, seed: int):
        super().__init__(cfg, run_dir, seed)
        c: ViTConfig = self.cfg
        self.dataset = c.dataset
        self.model_cfg, self.aug = c.model, c.augment
        self.on_bad_image, self.verify_images = c.on_bad_image, c.verify_images
        self.batch_size, self.eval_batch_size = c.batch_size, c.eval_batch_size
        self.train_subset, self.eval_subset = c.train_subset, c.eval_subset
        self.drop_last = c.drop_last
        self.label_smoothing = c.label_smoothing
        # null entries (the schema lists the common ones as null) are not passed to timm
        self.model_kwargs = {k: v for k, v in c.model.kwargs.items() if v is not None}
        self.in_chans = int(self.model_kwargs.get("in_chans", 3))
        if self.in_chans not in (1, 3):
            raise ConfigError(f"task.model.kwargs.in_chans must be 1 or 3, got {self.in_chans}")
        self.splits: dict[str, Split] = {}
        self.classes: list[str] = []
        self.skipped: dict[str, int] = {}
        self._runtime_bad: set[str] = set()
        self._mixup = None

    def param_patterns(self, model: torch.nn.Module) -> ParamPatterns:
        """timm ViT names (``adaptune.common.families``); no weight decay also for what the model itself
        lists in ``no_weight_decay()`` (position embeddings, class / distillation tokens); with
        ``task.peft=lora``, SAGE and DPS narrowed to the LoRA adapters (tasks/lora.py)."""
        patterns = dict(family_patterns("vit"))
        base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model  # peft
        own = getattr(base, "no_weight_decay", None)
        if callable(own):
            patterns["no_decay"] = tuple(dict.fromkeys(patterns["no_decay"] + tuple(sorted(own()))))
        return lora_patterns(patterns) if self.cfg.peft == "lora" else patterns

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def has_test(self) -> bool:
        """True when the test split differs from dev (else dev *is* the test split, already reported)."""
        return "test" in self.splits and self.splits["test"].name != self.splits["dev"].name

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        self._check_model_name()
        sources, self.classes = self._load_sources()
        dev_name = "validation" if "validation" in sources else "test"
        test_name = "test" if "test" in sources else "validation"
        splits = {
            "train": Split("train", sources["train"]),
            "dev": Split(dev_name, sources[dev_name]),
            "test": Split(test_name, sources[test_name]),
        }
        if self.train_subset is not None and self.train_subset < len(splits["train"]):
            rng = np.random.default_rng(_mix_seed(self.seed, 0x5B5E7))
            pick = np.sort(rng.permutation(len(splits["train"]))[: self.train_subset])
            splits["train"].index = splits["train"].index[pick]
        if self.eval_subset is not None:
            for key in ("dev", "test"):
                if self.eval_subset < len(splits[key]):
                    rng = np.random.default_rng(0xE7A1)  # the same examples for every seed
                    pick = np.sort(rng.permutation(len(splits[key]))[: self.eval_subset])
                    splits[key].index = splits[key].index[pick]
        self.skipped.update(vit_data.verify_images(splits, self.verify_images, self.on_bad_image))
        self.splits = splits
        if len(self.splits["train"]) == 0:
            raise ConfigError(f"task.dataset={self.dataset}: the training split is empty")
        self._build_transforms()
        log.info(
            "vit task: %s, %d classes, train %d, dev %d (%s), test %d (%s)",
            self.dataset,
            self.num_classes,
            len(self.splits["train"]),
            len(self.splits["dev"]),
            dev_name,
            len(self.splits["test"]),
            test_name,
        )

    def _check_model_name(self) -> None:
        import timm

        name = self.model_cfg.name
        if not timm.is_model(name):
            similar = timm.list_models(f"*{name.split('_')[0]}*")[:5] or ["vit_base_patch16_224"]
            raise ConfigError(f"task.model.name='{name}' is not a timm model; e.g. {', '.join(similar)} (see timm.list_models())")
        pfile = self.model_cfg.pretrained_file
        if pfile and not _abs_path(pfile).is_file():
            raise ConfigError(f"task.model.pretrained_file={pfile} does not exist")

    def _data_dir(self, default: str | None) -> Path | None:
        value = self.cfg.data_dir or default
        return _abs_path(value) if value else None

    def _load_sources(self) -> tuple[dict[str, Source], list[str]]:
        """The dataset's splits (train, and validation and/or test) and its class names."""
        c = self.cfg
        if self.dataset in ("cifar10", "cifar100"):
            return vit_data.load_cifar(self.dataset, self._data_dir(f"data/{self.dataset}"), c.download)
        if self.dataset == "fashion_mnist":
            return vit_data.load_fashion_mnist(self._data_dir(FMNIST_DIR))
        if self.dataset == "imagefolder":
            return vit_data.load_imagefolder(self._data_dir(None))
        return vit_data.load_hf(
            c.hf_dataset,
            c.hf_config,
            cache_dir=self._data_dir(None) if c.data_dir else None,
            image_column=c.hf_image_column,
            label_column=c.hf_label_column,
        )

    def _build_transforms(self) -> None:
        from timm.data import Mixup, create_transform, resolve_data_config
        from timm.models import get_pretrained_cfg

        a = self.aug
        pcfg = get_pretrained_cfg(self.model_cfg.name)
        args: dict[str, Any] = {}
        if self.model_cfg.img_size:
            size = self.model_cfg.img_size
            size = tuple(size) if isinstance(size, (list, tuple)) else (int(size), int(size))
            args["input_size"] = (self.in_chans, *size)
        elif self.in_chans != 3:
            base = pcfg.input_size if pcfg else (3, 224, 224)
            args["input_size"] = (self.in_chans, *base[1:])
        for key in ("interpolation", "crop_pct", "mean", "std"):
            value = getattr(a, key)
            if value is not None:
                args[key] = tuple(value) if isinstance(value, (list, tuple)) else value
        data_cfg = resolve_data_config(args, pretrained_cfg=pcfg.to_dict() if pcfg else None)
        if self.in_chans == 1 and len(data_cfg["mean"]) == 3:  # grayscale: average the RGB statistics
            data_cfg["mean"] = (float(np.mean(data_cfg["mean"])),)
            data_cfg["std"] = (float(np.mean(data_cfg["std"])),)
        self.data_config = data_cfg
        common = {k: data_cfg[k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct")}
        if data_cfg.get("crop_mode"):
            common["crop_mode"] = data_cfg["crop_mode"]
        try:
            self.eval_transform = create_transform(**common, is_training=False)
            self.train_transform = create_transform(
                **common,
                is_training=True,
                no_aug=not a.enabled,
                train_crop_mode=a.train_crop_mode,
                scale=tuple(a.scale),
                ratio=tuple(a.ratio),
                hflip=float(a.hflip),
                vflip=float(a.vflip),
                color_jitter=a.color_jitter or 0.0,
                auto_augment=a.auto_augment or None,
                re_prob=float(a.random_erasing),
                re_mode=a.re_mode,
                re_count=int(a.re_count),
            )
        except (ValueError, AssertionError, KeyError, TypeError) as err:
            raise ConfigError(f"task.augment: timm create_transform rejected the settings ({_one_line(err)})") from None
        self._mixup = None
        if a.enabled and (a.mixup or a.cutmix):
            self._mixup = Mixup(
                mixup_alpha=float(a.mixup),
                cutmix_alpha=float(a.cutmix),
                prob=float(a.mixup_prob),
                switch_prob=float(a.mixup_switch_prob),
                label_smoothing=self.label_smoothing,
                num_classes=self.num_classes,
            )

    # ------------------------------------------------------------------ model
    def build_model(self) -> torch.nn.Module:
        return build_timm_model(self.model_cfg, self.model_kwargs, self.num_classes, self.cfg.peft, self.cfg.lora)

    # ------------------------------------------------------------------ batches
    def train_batches(self, epoch: int) -> Sequence[BatchPlan]:
        n = len(self.splits["train"])
        gen = torch.Generator().manual_seed(_mix_seed(self.seed, epoch, 0xBA7C4))
        order = torch.randperm(n, generator=gen).tolist()
        bs = self.batch_size
        stop = n - n % bs if (self.drop_last and n >= bs) else n
        return [BatchPlan(int(epoch), b, tuple(order[i : i + bs])) for b, i in enumerate(range(0, stop, bs))]

    def _load(self, split: Split, pos: int):
        """The RGB (or L) image at ``pos`` of ``split``, or None if it cannot be decoded (warned once)."""
        i = int(split.index[pos])
        try:
            img = split.source.load(i)
        except Exception as err:
            where = split.source.describe(i)
            if where not in self._runtime_bad:
                self._runtime_bad.add(where)
                msg = f"dropping unreadable image {where} ({_one_line(err)}) from its batch"
                log.warning(msg)
                warnings.warn(msg, RuntimeWarning, stacklevel=2)
            return None
        return img.convert("L" if self.in_chans == 1 else "RGB")

    def _stack(self, images: list[torch.Tensor], labels: list[int]) -> dict[str, torch.Tensor]:
        if images:
            x = torch.stack(images)
        else:
            c, h, w = self.data_config["input_size"]
            x = torch.zeros((0, c, h, w))
        return {"images": x, "targets": torch.tensor(labels, dtype=torch.long)}

    def make_batch(self, plan: BatchPlan) -> dict[str, torch.Tensor]:
        """Decode and augment one planned batch: ``images`` [B, C, H, W] float32, ``targets`` [B]
        class indices (or [B, num_classes] soft targets under Mixup / CutMix)."""
        epoch, number, indices = plan
        split = self.splits["train"]
        images, labels = [], []
        with _private_rngs() as reseed:
            for pos in indices:
                img = self._load(split, pos)
                if img is None:
                    continue
                reseed(_mix_seed(self.seed, epoch, pos))
                images.append(self.train_transform(img))
                labels.append(int(split.source.labels[split.index[pos]]))
            batch = self._stack(images, labels)
            if self._mixup is not None and len(labels) > 0:
                reseed(_mix_seed(self.seed, epoch, number, 0x317))
                batch = self._apply_mixup(batch)
        return batch

    def _apply_mixup(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from timm.data.mixup import mixup_target

        x, y = batch["images"], batch["targets"]
        even = len(y) - len(y) % 2
        soft = mixup_target(y, self.num_classes, lam=1.0, smoothing=self.label_smoothing)
        if even >= 2:
            x_even, soft_even = self._mixup(x[:even].clone(), y[:even])
            x = torch.cat([x_even, x[even:]])
            soft = torch.cat([soft_even, soft[even:]])
        return {"images": x, "targets": soft}

    def eval_batches(self, split: str) -> list[tuple[int, ...]]:
        if split not in ("dev", "test"):
            raise ConfigError(f"evaluation split '{split}' is unknown; allowed: dev, test")
        n = len(self.splits[split])
        bs = self.eval_batch_size
        return [tuple(range(i, min(i + bs, n))) for i in range(0, n, bs)]

    def make_eval_batch(self, split: str, positions: Sequence[int]) -> dict[str, torch.Tensor]:
        s = self.splits[split]
        images, labels = [], []
        for pos in positions:
            img = self._load(s, pos)
            if img is not None:
                images.append(self.eval_transform(img))
                labels.append(int(s.source.labels[s.index[pos]]))
        return self._stack(images, labels)

    # ------------------------------------------------------------------ loss and metrics
    def loss(self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> StepLoss:
        logits = model(batch["images"]).float()
        targets = batch["targets"]
        n = int(targets.shape[0])
        if targets.dim() == 2:  # soft targets (Mixup / CutMix), label smoothing included
            loss_sum = -(targets * F.log_softmax(logits, dim=-1)).sum()
        else:
            loss_sum = F.cross_entropy(logits, targets, reduction="sum", label_smoothing=self.label_smoothing)
        return StepLoss(loss_sum, float(n), n)

    def eval_step(self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """Cross-entropy sum (no label smoothing) and top-1 / top-5 counts of the batch."""
        y = batch["targets"]
        if y.numel() == 0:  # every image of the batch was unreadable
            return {}
        logits = model(batch["images"]).float()
        top1, top5 = topk_correct(logits, y, 5)
        return {"loss": F.cross_entropy(logits, y, reduction="sum"), "top1": top1, "top5": top5, "n": len(y)}

    def finalize(self, split: str, reduced: Mapping[str, Any]) -> dict[str, float]:
        n = reduced.get("n", 0)
        if n == 0:
            return {"top1": 0.0, "top5": 0.0, "loss": float("nan")}
        return {"top1": reduced["top1"] / n, "top5": reduced["top5"] / n, "loss": reduced["loss"] / n}

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "dataset": self.dataset,
            "model": self.model_cfg.name,
            "pretrained": bool(self.model_cfg.pretrained or self.model_cfg.pretrained_file),
            "num_classes": self.num_classes,
            "classes": self.classes[:20] + (["..."] if len(self.classes) > 20 else []),
            "input_size": list(getattr(self, "data_config", {}).get("input_size", ())),
        }
        for key, split in self.splits.items():
            out[f"{key}_size"] = len(split)
            out[f"{key}_split"] = split.name
        if self.skipped:
            out["skipped_images"] = dict(self.skipped)
        if self._runtime_bad:
            out["dropped_at_runtime"] = sorted(self._runtime_bad)[:20]
        return out
