"""Image classification with timm models (``task.kind=vit``): ViT fine-tuning or training from scratch.

The shared loop (``runner/loop.py``) drives this task like every other, so baseline, SAGE and DPS
apply unchanged; the model family is ``vit`` (``schedules/patterns.py``: SAGE and DPS select
``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``; DPS also the ``head``).

Model: ``timm.create_model(task.model.name, pretrained=..., num_classes=<from data>,
img_size=task.model.img_size, **task.model.kwargs)``; any timm model name works (``img_size:
null`` for models that take no such argument, e.g. ResNets). ``pretrained=true`` downloads the
weights from the Hugging Face hub (timm's default source); offline that is a one-line
``ConfigError`` pointing at ``task.model.pretrained=false`` or ``task.model.pretrained_file``
(a local weights file that timm adapts to the new number of classes).

Data (``task.dataset``):

- ``cifar10`` / ``cifar100``: torchvision's loaders, from ``task.data_dir`` (default
  ``data/<dataset>``, the directory holding ``cifar-10-batches-py/`` or ``cifar-100-python/``);
  downloaded there when ``task.download=true`` and online. Splits: train / test.
- ``fashion_mnist``: the four IDX files (gzipped or not) of Fashion-MNIST in ``task.data_dir``
  (default ``/usr/share/datasets/fashion-mnist``, where Debian's ``dataset-fashion-mnist``
  installs them). Splits: train / t10k (test).
- ``imagefolder``: ``task.data_dir`` with ``train/`` and ``val/`` and/or ``test/`` subfolders, one
  folder per class (torchvision's ImageFolder layout); class indices from ``train/``.
- ``hf``: a Hugging Face image dataset ``task.hf_name`` (+ ``task.hf_config``), or a directory
  written by ``DatasetDict.save_to_disk``. Image / label columns are ``task.hf_image_column`` /
  ``task.hf_label_column`` or found automatically (the ``Image`` feature; a ``ClassLabel`` or a
  column named label/labels/fine_label).

Splits: ``evaluate(model, "dev")`` uses the validation split where the data has one, else the
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

Unreadable images: at setup every image file is checked (``verify_images``: ``full`` decodes it,
``quick`` runs PIL's header/CRC ``verify()``, ``auto`` = full up to 20,000 files per split, else
quick; ``none`` skips the check). ``on_bad_image=error`` raises a ``ConfigError`` naming the first
bad file and the count; ``skip`` drops them with one warning per split. A file that passes the
check but fails to decode later (possible with ``quick``, or if it changes during the run) is
dropped from its batch with a warning rather than stopping a long run half-way; the loss is a sum
with ``sample_size`` = the examples actually in the batch, so the step stays correctly normalised.

Metrics (``evaluate``): ``top1`` and ``top5`` accuracy as fractions in [0, 1] (``top5`` is top-k
with k = min(5, number of classes)) and ``loss``, the mean cross-entropy per example (without
label smoothing).
"""
from __future__ import annotations

import contextlib
import gzip
import io
import logging
import math
import random
import struct
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from common.errors import ConfigError

from .base import StepLoss, Task

log = logging.getLogger("adaptune")

DATASETS = ("cifar10", "cifar100", "imagefolder", "hf", "fashion_mnist")
ON_BAD_IMAGE = ("error", "skip")
VERIFY_IMAGES = ("auto", "full", "quick", "none")
FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                  "Bag", "Ankle boot")
_VERIFY_FULL_LIMIT = 20_000  # verify_images=auto: decode every file up to this many per split

#: ``task.model`` keys and defaults.
MODEL_DEFAULTS: dict[str, Any] = {
    "name": "vit_base_patch16_224",
    "pretrained": True,
    "pretrained_file": None,   # local weights file (timm pretrained_cfg_overlay file=...)
    "img_size": 224,           # null: do not pass img_size (models without that argument)
    "kwargs": {},              # more create_model arguments: depth, embed_dim, drop_path_rate, ... (null: not passed)
}

#: ``task.augment`` keys and defaults (training transform; timm ``create_transform`` arguments).
AUGMENT_DEFAULTS: dict[str, Any] = {
    "enabled": True,           # false: the evaluation transform for training too (timm no_aug)
    "train_crop_mode": None,   # timm: rrc (RandomResizedCrop, default) | rkrc | rkrr
    "scale": [0.08, 1.0],      # RandomResizedCrop area range
    "ratio": [0.75, 1.3333333],
    "hflip": 0.5,
    "vflip": 0.0,
    "color_jitter": 0.0,       # e.g. 0.4
    "auto_augment": None,      # e.g. rand-m9-mstd0.5-inc1 (RandAugment) or augmix-m5-w4-d2
    "random_erasing": 0.0,     # probability (timm re_prob)
    "re_mode": "pixel",
    "re_count": 1,
    "mixup": 0.0,              # Mixup alpha (0: off)
    "cutmix": 0.0,             # CutMix alpha (0: off)
    "mixup_prob": 1.0,
    "mixup_switch_prob": 0.5,
    "interpolation": None,     # null: the model's pretrained config (e.g. bicubic)
    "crop_pct": None,          # evaluation centre-crop fraction; null: the model's (0.9 for ViT)
    "mean": None,              # null: the model's pretrained normalisation
    "std": None,
}


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


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def _abs_path(path: str | Path) -> Path:
    """Absolute path; relative paths are taken from Hydra's original working directory if any."""
    p = Path(str(path)).expanduser()
    if p.is_absolute():
        return p
    try:
        from hydra.utils import to_absolute_path

        return Path(to_absolute_path(str(p)))
    except Exception:  # Hydra not initialised (tests, library use)
        return p.resolve()


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, k: int = 5) -> tuple[int, int]:
    """(top-1 correct, top-min(k, C) correct) counts for ``logits`` [N, C] and class ``targets`` [N]."""
    if logits.shape[0] == 0:
        return 0, 0
    k = min(k, logits.shape[-1])
    pred = logits.topk(k, dim=-1).indices
    hit = pred.eq(targets.view(-1, 1))
    return int(hit[:, :1].any(dim=1).sum()), int(hit.any(dim=1).sum())


# ----------------------------------------------------------------------------- IDX files
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (MNIST / Fashion-MNIST format), gzipped (``.gz``) or not."""
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise ConfigError(f"cannot read IDX file {path} ({_one_line(err)})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ConfigError(f"{path} is not an IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ConfigError(f"IDX file {path} is truncated (header)")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    count = math.prod(dims)
    if len(data) - header != count * dtype.itemsize:
        raise ConfigError(
            f"IDX file {path} has {len(data) - header} data bytes, expected {count * dtype.itemsize} "
            f"for shape {tuple(dims)}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _find_file(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


# ----------------------------------------------------------------------------- image sources
class _Source:
    """Random access to the examples of one split: ``load(i)`` -> PIL image, ``labels[i]``."""

    labels: np.ndarray
    files: bool = False  # True: examples are encoded files worth verifying

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, i: int):
        raise NotImplementedError

    def describe(self, i: int) -> str:
        raise NotImplementedError


class _ArraySource(_Source):
    """Decoded uint8 images in memory: [N, H, W] (grayscale) or [N, H, W, C]."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, origin: str):
        self.images, self.labels, self.origin = images, np.asarray(labels, dtype=np.int64), origin

    def load(self, i: int):
        from PIL import Image

        return Image.fromarray(self.images[i])

    def describe(self, i: int) -> str:
        return f"{self.origin}[{i}]"


class _FileSource(_Source):
    files = True

    def __init__(self, paths: Sequence[str], labels: Sequence[int]):
        self.paths, self.labels = list(paths), np.asarray(labels, dtype=np.int64)

    def load(self, i: int):
        from PIL import Image

        with Image.open(self.paths[i]) as img:
            img.load()
            return img

    def verify(self, i: int, full: bool) -> None:
        from PIL import Image

        with Image.open(self.paths[i]) as img:
            img.load() if full else img.verify()

    def describe(self, i: int) -> str:
        return self.paths[i]


class _HFSource(_Source):
    """A Hugging Face dataset split whose image column is read undecoded (bytes or path)."""

    files = True

    def __init__(self, ds, image_column: str, labels: np.ndarray, origin: str):
        from datasets import Image as HFImage

        self.ds = ds.cast_column(image_column, HFImage(decode=False))
        self.column, self.labels, self.origin = image_column, np.asarray(labels, dtype=np.int64), origin

    def _open(self, i: int):
        from PIL import Image

        item = self.ds[int(i)][self.column]
        if item is None:
            raise ValueError("no image")
        if item.get("bytes"):
            return Image.open(io.BytesIO(item["bytes"]))
        return Image.open(item["path"])

    def load(self, i: int):
        img = self._open(i)
        img.load()
        return img

    def verify(self, i: int, full: bool) -> None:
        img = self._open(i)
        img.load() if full else img.verify()

    def describe(self, i: int) -> str:
        try:
            path = self.ds[int(i)][self.column].get("path")
        except Exception:
            path = None
        return f"{self.origin}[{i}]" + (f" ({path})" if path else "")


class _Split:
    """The examples of one split in use: positions ``index`` into ``source``."""

    def __init__(self, name: str, source: _Source, index: np.ndarray | None = None):
        self.name, self.source = name, source
        self.index = np.arange(len(source)) if index is None else np.asarray(index, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def labels(self) -> np.ndarray:
        return self.source.labels[self.index]


# ----------------------------------------------------------------------------- the task
class ImageClassificationTask(Task):
    kind = "vit"
    main_metric = "top1"
    greater_is_better = True

    def __init__(self, cfg: Mapping[str, Any], run_dir: Path, seed: int):
        if not isinstance(cfg, dict):
            try:
                from omegaconf import DictConfig, OmegaConf

                if isinstance(cfg, DictConfig):
                    cfg = OmegaConf.to_container(cfg, resolve=True)
            except ImportError:  # pragma: no cover
                pass
        super().__init__(cfg, run_dir, seed)
        c = self.cfg
        self.dataset = c.get("dataset", "cifar100")
        if self.dataset not in DATASETS:
            raise ConfigError(f"task.dataset='{self.dataset}' is unknown; allowed: {', '.join(DATASETS)}")
        self.model_cfg = self._section("model", MODEL_DEFAULTS)
        self.aug = self._section("augment", AUGMENT_DEFAULTS)
        if not isinstance(self.model_cfg["name"], str) or not self.model_cfg["name"]:
            raise ConfigError(f"task.model.name must be a timm model name, got {self.model_cfg['name']!r}")
        self.model_cfg["kwargs"] = self.model_cfg["kwargs"] or {}
        if not isinstance(self.model_cfg["kwargs"], Mapping):
            raise ConfigError(f"task.model.kwargs must be a mapping, got {self.model_cfg['kwargs']!r}")
        self.on_bad_image = c.get("on_bad_image", "error")
        if self.on_bad_image not in ON_BAD_IMAGE:
            raise ConfigError(
                f"task.on_bad_image='{self.on_bad_image}' is unknown; allowed: {', '.join(ON_BAD_IMAGE)}")
        self.verify_images = c.get("verify_images", "auto")
        if self.verify_images not in VERIFY_IMAGES:
            raise ConfigError(
                f"task.verify_images='{self.verify_images}' is unknown; allowed: {', '.join(VERIFY_IMAGES)}")
        self.batch_size = self._int("batch_size", 32)
        self.eval_batch_size = self._int("eval_batch_size", 64)
        self.train_subset = self._int("train_subset", None, allow_none=True)
        self.eval_subset = self._int("eval_subset", None, allow_none=True)
        self.drop_last = bool(c.get("drop_last", False))
        self.label_smoothing = float(c.get("label_smoothing") or 0.0)
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"task.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        # null entries (conf/task/vit.yaml lists the common ones as null) are not passed to timm
        self.model_cfg["kwargs"] = {k: v for k, v in self.model_cfg["kwargs"].items() if v is not None}
        self.in_chans = int(self.model_cfg["kwargs"].get("in_chans", 3))
        if self.in_chans not in (1, 3):
            raise ConfigError(f"task.model.kwargs.in_chans must be 1 or 3, got {self.in_chans}")
        self.splits: dict[str, _Split] = {}
        self.classes: list[str] = []
        self.skipped: dict[str, int] = {}
        self._runtime_bad: set[str] = set()
        self._mixup = None

    # ------------------------------------------------------------------ config helpers
    def _section(self, key: str, defaults: Mapping[str, Any]) -> dict[str, Any]:
        given = self.cfg.get(key) or {}
        if not isinstance(given, Mapping):
            raise ConfigError(f"task.{key} must be a mapping, got {given!r}")
        unknown = sorted(set(given) - set(defaults))
        if unknown:
            raise ConfigError(f"task.{key}.{unknown[0]} is not a known key; allowed: {', '.join(defaults)}")
        return {**defaults, **given}

    def _int(self, key: str, default: int | None, allow_none: bool = False) -> int | None:
        value = self.cfg.get(key, default)
        if value is None and allow_none:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"task.{key} must be a positive integer{' or null' if allow_none else ''}, got {value!r}")
        return value

    @property
    def family(self) -> str:
        return "vit"

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
        loaders: dict[str, Callable[[], dict[str, _Source]]] = {
            "cifar10": self._load_cifar, "cifar100": self._load_cifar, "fashion_mnist": self._load_fmnist,
            "imagefolder": self._load_imagefolder, "hf": self._load_hf,
        }
        sources = loaders[self.dataset]()
        dev_name = "validation" if "validation" in sources else "test"
        test_name = "test" if "test" in sources else "validation"
        splits = {"train": _Split("train", sources["train"]),
                  "dev": _Split(dev_name, sources[dev_name]),
                  "test": _Split(test_name, sources[test_name])}
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
        self._verify(splits)
        self.splits = splits
        if len(self.splits["train"]) == 0:
            raise ConfigError(f"task.dataset={self.dataset}: the training split is empty")
        self._build_transforms()
        log.info("vit task: %s, %d classes, train %d, dev %d (%s), test %d (%s)", self.dataset,
                 self.num_classes, len(self.splits["train"]), len(self.splits["dev"]), dev_name,
                 len(self.splits["test"]), test_name)

    def _check_model_name(self) -> None:
        import timm

        name = self.model_cfg["name"]
        if not timm.is_model(name):
            similar = timm.list_models(f"*{name.split('_')[0]}*")[:5] or ["vit_base_patch16_224"]
            raise ConfigError(
                f"task.model.name='{name}' is not a timm model; e.g. {', '.join(similar)} (see timm.list_models())")
        pfile = self.model_cfg["pretrained_file"]
        if pfile and not _abs_path(pfile).is_file():
            raise ConfigError(f"task.model.pretrained_file={pfile} does not exist")

    def _data_dir(self, default: str | None) -> Path | None:
        value = self.cfg.get("data_dir") or default
        return _abs_path(value) if value else None

    def _missing(self, what: str) -> ConfigError:
        others = "|".join(d for d in DATASETS if d != self.dataset)
        return ConfigError(f"task.dataset={self.dataset}: {what}; or choose task.dataset={others}")

    def _load_cifar(self) -> dict[str, _Source]:
        from torchvision.datasets import CIFAR10, CIFAR100

        cls = CIFAR10 if self.dataset == "cifar10" else CIFAR100
        root = self._data_dir(f"data/{self.dataset}")
        download = bool(self.cfg.get("download", True))
        existing = next(p for p in (root, *root.parents) if p.exists())  # dirs below it are ours
        sources = {}
        for split, train in (("train", True), ("test", False)):
            try:
                with contextlib.redirect_stdout(io.StringIO()):  # torchvision prints "Files already downloaded"
                    ds = cls(root=str(root), train=train, download=download)
            except RuntimeError as err:  # "Dataset not found or corrupted"
                raise self._missing(
                    f"no usable copy in {root} ({cls.base_folder}/ expected; {_one_line(err)}); "
                    f"set task.download=true (needs internet) or task.data_dir=<directory holding {cls.base_folder}/>"
                ) from None
            except Exception as err:  # URLError, socket errors, ... while downloading
                # leave no empty directory behind (torchvision makes root before downloading)
                with contextlib.suppress(OSError):
                    for d in (root, *root.parents):
                        if d == existing:
                            break
                        d.rmdir()  # fails (and stops) at the first non-empty one
                raise self._missing(
                    f"download to {root} failed ({_one_line(err)}); copy the data there or set "
                    f"task.data_dir=<directory holding {cls.base_folder}/>") from None
            sources[split] = _ArraySource(np.asarray(ds.data), np.asarray(ds.targets), f"{self.dataset}:{split}")
            self.classes = list(ds.classes)
        return sources

    def _load_fmnist(self) -> dict[str, _Source]:
        root = self._data_dir(FMNIST_DIR)
        candidates = [root, root / "FashionMNIST" / "raw"]
        for directory in candidates:
            found = {split: [_find_file(directory, stem) for stem in stems] for split, stems in FMNIST_FILES.items()}
            if all(p is not None for paths in found.values() for p in paths):
                break
        else:
            names = ", ".join(s + ".gz" for stems in FMNIST_FILES.values() for s in stems)
            raise self._missing(
                f"the IDX files ({names}) are not in {root}; install them with "
                f"'apt-get install dataset-fashion-mnist' (into {FMNIST_DIR}) or set task.data_dir=<their directory>")
        sources = {}
        for split, (images_path, labels_path) in found.items():
            images, labels = read_idx(images_path), read_idx(labels_path)
            if images.ndim != 3 or images.dtype != np.uint8:
                raise ConfigError(f"{images_path}: expected uint8 images [N, H, W], got {images.dtype} {images.shape}")
            if labels.ndim != 1 or len(labels) != len(images):
                raise ConfigError(f"{labels_path}: expected {len(images)} labels, got shape {labels.shape}")
            if labels.size and (labels.min() < 0 or labels.max() >= len(FMNIST_CLASSES)):
                raise ConfigError(f"{labels_path}: labels outside 0..{len(FMNIST_CLASSES) - 1}")
            sources[split] = _ArraySource(images, labels, f"{images_path.name}")
        self.classes = list(FMNIST_CLASSES)
        return sources

    def _load_imagefolder(self) -> dict[str, _Source]:
        from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

        root = self._data_dir(None)
        if root is None:
            raise ConfigError("task.dataset=imagefolder needs task.data_dir=<directory with train/ and val/ or test/>")
        train_dir = root / "train"
        if not train_dir.is_dir():
            raise self._missing(f"{train_dir} does not exist (task.data_dir needs train/ and val/ or test/ subfolders)")
        try:
            self.classes, class_to_idx = find_classes(str(train_dir))
        except FileNotFoundError as err:
            raise ConfigError(f"task.data_dir={root}: {_one_line(err)}") from None
        sources: dict[str, _Source] = {}
        for split, folder in (("train", "train"), ("validation", "val"), ("validation", "valid"), ("test", "test")):
            directory = root / folder
            if split in sources or not directory.is_dir():
                continue
            extra = sorted(d.name for d in directory.iterdir() if d.is_dir() and d.name not in class_to_idx)
            if extra:
                raise ConfigError(f"{directory} has class folder '{extra[0]}' that {train_dir} lacks")
            try:
                samples = make_dataset(str(directory), class_to_idx, extensions=IMG_EXTENSIONS,
                                       allow_empty=split != "train")
            except FileNotFoundError as err:  # a class folder of train/ without image files
                raise ConfigError(f"{directory}: {_one_line(err)}") from None
            sources[split] = _FileSource([p for p, _ in samples], [y for _, y in samples])
        if len(sources) == 1:
            raise self._missing(f"{root} has train/ but neither val/ nor test/ for evaluation")
        return sources

    def _load_hf(self) -> dict[str, _Source]:
        import datasets

        name = self.cfg.get("hf_name")
        if not name:
            raise ConfigError("task.dataset=hf needs task.hf_name=<hub dataset name or save_to_disk directory>")
        local = _abs_path(name)
        try:
            if local.is_dir() and ((local / "dataset_dict.json").exists() or (local / "state.json").exists()):
                dd = datasets.load_from_disk(str(local))
            else:
                dd = datasets.load_dataset(name, self.cfg.get("hf_config"),
                                           cache_dir=str(self._data_dir(None)) if self.cfg.get("data_dir") else None)
        except Exception as err:
            raise self._missing(
                f"cannot load Hugging Face dataset task.hf_name={name} ({_one_line(err)}); check the name and "
                f"network, or give a directory written by DatasetDict.save_to_disk") from None
        if not isinstance(dd, datasets.DatasetDict):
            raise ConfigError(f"task.hf_name={name} is a single split; a DatasetDict with train and test/validation is needed")
        split_names = {"train": ("train",), "validation": ("validation", "valid", "val"), "test": ("test",)}
        chosen = {key: next((s for s in names if s in dd), None) for key, names in split_names.items()}
        if chosen["train"] is None or (chosen["validation"] is None and chosen["test"] is None):
            raise ConfigError(
                f"task.hf_name={name} has splits {list(dd)}; needed: train and validation or test")
        features = dd[chosen["train"]].features
        image_col = self.cfg.get("hf_image_column") or next(
            (k for k, f in features.items() if isinstance(f, datasets.Image)), None)
        if image_col not in features:
            raise ConfigError(f"task.hf_image_column={image_col!r} is not a column of {name}; columns: {', '.join(features)}")
        label_col = self.cfg.get("hf_label_column") or next(
            (k for k, f in features.items() if isinstance(f, datasets.ClassLabel)),
            next((k for k in ("label", "labels", "fine_label") if k in features), None))
        if label_col not in features:
            raise ConfigError(f"task.hf_label_column={label_col!r} is not a column of {name}; columns: {', '.join(features)}")
        feature = features[label_col]
        if isinstance(feature, datasets.ClassLabel):
            self.classes = list(feature.names)
            to_index = None
        else:
            values = sorted({v for s in chosen.values() if s for v in dd[s][label_col]})
            self.classes = [str(v) for v in values]
            to_index = {v: i for i, v in enumerate(values)}
        sources: dict[str, _Source] = {}
        for key, split in chosen.items():
            if split is None:
                continue
            raw = dd[split][label_col]
            labels = np.asarray([to_index[v] for v in raw] if to_index else raw, dtype=np.int64)
            ds = dd[split]
            valid = (labels >= 0) & (labels < len(self.classes))
            if not valid.all():  # e.g. unlabelled test splits (label -1)
                if not valid.any() and key != "train":
                    log.warning("%s split '%s' has no labels; not used for evaluation", name, split)
                    continue
                warnings.warn(f"task.hf_name={name}: dropped {int((~valid).sum())} example(s) of split "
                              f"'{split}' without a valid label", RuntimeWarning, stacklevel=2)
                keep = np.flatnonzero(valid)
                ds, labels = ds.select(keep), labels[keep]
            sources[key] = _HFSource(ds, image_col, labels, f"{name}:{split}")
        if "validation" not in sources and "test" not in sources:
            raise ConfigError(f"task.hf_name={name}: neither a validation nor a test split has labels")
        return sources

    def _verify(self, splits: dict[str, _Split]) -> None:
        """Check every image file once (dev and test may share one source); drop or report bad ones."""
        if self.verify_images == "none":
            return
        errors: dict[int, dict[int, str]] = {}  # id(source) -> {example: error}
        checked: dict[int, set[int]] = {}
        first_bad: tuple[str, str] | None = None
        for split in splits.values():
            source = split.source
            if not source.files:
                continue
            full = self.verify_images == "full" or (self.verify_images == "auto" and len(split) <= _VERIFY_FULL_LIMIT)
            done, bad = checked.setdefault(id(source), set()), errors.setdefault(id(source), {})
            for i in map(int, split.index):
                if i in done:
                    continue
                done.add(i)
                try:
                    source.verify(i, full)
                except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
                    bad[i] = _one_line(err)
                    if first_bad is None:
                        first_bad = (source.describe(i), bad[i])
        total_bad = sum(len(b) for b in errors.values())
        if total_bad and self.on_bad_image == "error":
            path, why = first_bad
            raise ConfigError(
                f"cannot read image {path} ({why}); {total_bad} unreadable image(s) in all; fix or remove them, "
                f"or set task.on_bad_image=skip to drop them")
        for key, split in splits.items():
            bad = errors.get(id(split.source))
            if not bad:
                continue
            keep = np.asarray([i not in bad for i in map(int, split.index)], dtype=bool)
            dropped = int((~keep).sum())
            if dropped:
                example = split.source.describe(int(split.index[~keep][0]))
                split.index = split.index[keep]
                self.skipped[key] = dropped
                msg = (f"task.on_bad_image=skip: skipped {dropped} unreadable image(s) of the {key} split "
                       f"({split.name}), e.g. {example}")
                log.warning(msg)
                warnings.warn(msg, RuntimeWarning, stacklevel=3)

    def _build_transforms(self) -> None:
        from timm.data import Mixup, create_transform, resolve_data_config
        from timm.models import get_pretrained_cfg

        a = self.aug
        pcfg = get_pretrained_cfg(self.model_cfg["name"])
        args: dict[str, Any] = {}
        if self.model_cfg["img_size"]:
            size = self.model_cfg["img_size"]
            size = tuple(size) if isinstance(size, (list, tuple)) else (int(size), int(size))
            args["input_size"] = (self.in_chans, *size)
        elif self.in_chans != 3:
            base = pcfg.input_size if pcfg else (3, 224, 224)
            args["input_size"] = (self.in_chans, *base[1:])
        for key in ("interpolation", "crop_pct", "mean", "std"):
            if a[key] is not None:
                args[key] = tuple(a[key]) if isinstance(a[key], (list, tuple)) else a[key]
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
                **common, is_training=True, no_aug=not a["enabled"],
                train_crop_mode=a["train_crop_mode"], scale=tuple(a["scale"]), ratio=tuple(a["ratio"]),
                hflip=float(a["hflip"]), vflip=float(a["vflip"]), color_jitter=a["color_jitter"] or 0.0,
                auto_augment=a["auto_augment"] or None, re_prob=float(a["random_erasing"]),
                re_mode=a["re_mode"], re_count=int(a["re_count"]))
        except (ValueError, AssertionError, KeyError, TypeError) as err:
            raise ConfigError(f"task.augment: timm create_transform rejected the settings ({_one_line(err)})") from None
        self._mixup = None
        if a["enabled"] and (a["mixup"] or a["cutmix"]):
            self._mixup = Mixup(mixup_alpha=float(a["mixup"]), cutmix_alpha=float(a["cutmix"]),
                                prob=float(a["mixup_prob"]), switch_prob=float(a["mixup_switch_prob"]),
                                label_smoothing=self.label_smoothing, num_classes=self.num_classes)

    # ------------------------------------------------------------------ model
    def build_model(self) -> torch.nn.Module:
        import timm

        m = self.model_cfg
        kwargs = dict(m["kwargs"])
        if m["img_size"]:
            kwargs["img_size"] = tuple(m["img_size"]) if isinstance(m["img_size"], (list, tuple)) else int(m["img_size"])
        pretrained = bool(m["pretrained"]) or bool(m["pretrained_file"])
        if m["pretrained_file"]:
            kwargs["pretrained_cfg_overlay"] = {"file": str(_abs_path(m["pretrained_file"]))}
        try:
            model = timm.create_model(m["name"], pretrained=pretrained, num_classes=self.num_classes, **kwargs)
        except TypeError as err:  # an argument the model does not take
            raise ConfigError(
                f"timm model '{m['name']}' rejected task.model.img_size/kwargs ({_one_line(err)}); "
                f"e.g. set task.model.img_size=null for models without img_size") from None
        except Exception as err:
            if pretrained and not m["pretrained_file"] and _is_network_error(err):
                raise ConfigError(
                    f"task.model.pretrained=true: cannot download the pretrained weights of '{m['name']}' "
                    f"({_one_line(err)}); go online, set task.model.pretrained_file=<local weights>, or train "
                    f"from scratch with task.model.pretrained=false") from None
            if m["pretrained_file"] and isinstance(err, (OSError, RuntimeError, KeyError)):
                raise ConfigError(
                    f"task.model.pretrained_file={m['pretrained_file']}: cannot load it into '{m['name']}' "
                    f"({_one_line(err)})") from None
            raise
        return model

    # ------------------------------------------------------------------ batches
    def train_batches(self, epoch: int) -> Sequence[BatchPlan]:
        n = len(self.splits["train"])
        gen = torch.Generator().manual_seed(_mix_seed(self.seed, epoch, 0xBA7C4))
        order = torch.randperm(n, generator=gen).tolist()
        bs = self.batch_size
        stop = n - n % bs if (self.drop_last and n >= bs) else n
        return [BatchPlan(int(epoch), b, tuple(order[i:i + bs])) for b, i in enumerate(range(0, stop, bs))]

    def _load(self, split: _Split, pos: int):
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

    def evaluate(self, model: torch.nn.Module, split: str = "dev") -> dict[str, float]:
        if split not in ("dev", "test"):
            raise ConfigError(f"evaluation split '{split}' is unknown; allowed: dev, test")
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        loss_sum, top1, topk, n = 0.0, 0, 0, 0
        try:
            with torch.inference_mode():
                for positions in self.eval_batches(split):
                    batch = self.make_eval_batch(split, positions)
                    if batch["targets"].numel() == 0:
                        continue
                    x = batch["images"].to(device, non_blocking=True)
                    y = batch["targets"].to(device, non_blocking=True)
                    logits = model(x).float()
                    loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
                    c1, ck = topk_correct(logits, y, 5)
                    top1, topk, n = top1 + c1, topk + ck, n + len(y)
        finally:
            model.train(was_training)
        if n == 0:
            return {"top1": 0.0, "top5": 0.0, "loss": float("nan")}
        return {"top1": top1 / n, "top5": topk / n, "loss": loss_sum / n}

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "dataset": self.dataset,
            "model": self.model_cfg["name"],
            "pretrained": bool(self.model_cfg["pretrained"] or self.model_cfg["pretrained_file"]),
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


def _is_network_error(err: BaseException) -> bool:
    """True for errors of a failed download (offline, DNS, HTTP), as raised by urllib, requests,
    httpx or huggingface_hub."""
    import urllib.error

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        module = type(err).__module__ or ""
        if isinstance(err, (urllib.error.URLError, ConnectionError, TimeoutError)) or module.split(".")[0] in (
                "huggingface_hub", "requests", "httpx", "urllib3", "socket"):
            return True
        if isinstance(err, OSError) and ("connect" in str(err).lower() or "offline" in str(err).lower()
                                         or "resolve" in str(err).lower()):
            return True
        err = err.__cause__ or err.__context__
    return False
