"""Image data for the timm image-classification task (``tasks/vit.py``): datasets as random-access
sources of PIL images, their loaders and the check of image files.

Datasets (``task.dataset``):

- ``cifar10`` / ``cifar100``: torchvision's loaders, from ``task.data_dir`` (default
  ``data/<dataset>``, the directory holding ``cifar-10-batches-py/`` or ``cifar-100-python/``);
  downloaded there when ``task.download=true`` and online. Splits: train / test.
- ``fashion_mnist``: the four IDX files (gzipped or not) of Fashion-MNIST in ``task.data_dir``
  (default ``/usr/share/datasets/fashion-mnist``, where Debian's ``dataset-fashion-mnist``
  installs them). Splits: train / t10k (test).
- ``imagefolder``: ``task.data_dir`` with ``train/`` and ``val/`` and/or ``test/`` subfolders, one
  folder per class (torchvision's ImageFolder layout); class indices from ``train/``.
- ``hf``: a Hugging Face image dataset ``task.hf_dataset`` (+ ``task.hf_config``), or a directory
  written by ``DatasetDict.save_to_disk``. Image / label columns are ``task.hf_image_column`` /
  ``task.hf_label_column`` or found automatically (the ``Image`` feature; a ``ClassLabel`` or a
  column named label/labels/fine_label).

Each loader takes explicit arguments and returns ``(sources, classes)``: ``sources`` maps
``train`` and ``validation`` and/or ``test`` to a :class:`Source`. Small datasets (CIFAR,
Fashion-MNIST) are held in memory as uint8 arrays; files are read when an example is loaded.

Unreadable images (:func:`verify_images`): every image file is checked once (``full`` decodes it,
``quick`` runs PIL's header/CRC ``verify()``, ``auto`` = full up to 20,000 files per split, else
quick; ``none`` skips the check). ``on_bad_image=error`` raises a ``ConfigError`` naming the first
bad file and the count; ``skip`` drops them with one warning per split.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import logging
import math
import struct
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from adaptune.common.errors import ConfigError

log = logging.getLogger("adaptune")

DATASETS = ("cifar10", "cifar100", "imagefolder", "hf", "fashion_mnist")
ON_BAD_IMAGE = ("error", "skip")
VERIFY_IMAGES = ("auto", "full", "quick", "none")
FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_VERIFY_FULL_LIMIT = 20_000  # verify_images=auto: decode every file up to this many per split


def one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def abs_path(path: str | Path) -> Path:
    """Absolute path; relative paths are taken from Hydra's original working directory if any."""
    p = Path(str(path)).expanduser()
    if p.is_absolute():
        return p
    try:
        from hydra.utils import to_absolute_path

        return Path(to_absolute_path(str(p)))
    except Exception:  # Hydra not initialised (tests, library use)
        return p.resolve()


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
        raise ConfigError(f"cannot read IDX file {path} ({one_line(err)})") from None
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
            f"IDX file {path} has {len(data) - header} data bytes, expected {count * dtype.itemsize} for shape {tuple(dims)}"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _find_file(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


# ----------------------------------------------------------------------------- image sources
class Source:
    """Random access to the examples of one split: ``load(i)`` -> PIL image, ``labels[i]``."""

    labels: np.ndarray
    files: bool = False  # True: examples are encoded files worth verifying

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, i: int):
        raise NotImplementedError

    def describe(self, i: int) -> str:
        raise NotImplementedError


class ArraySource(Source):
    """Decoded uint8 images in memory: [N, H, W] (grayscale) or [N, H, W, C]."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, origin: str):
        self.images, self.labels, self.origin = images, np.asarray(labels, dtype=np.int64), origin

    def load(self, i: int):
        from PIL import Image

        return Image.fromarray(self.images[i])

    def describe(self, i: int) -> str:
        return f"{self.origin}[{i}]"


class FileSource(Source):
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


class HFSource(Source):
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


class Split:
    """The examples of one split in use: positions ``index`` into ``source``."""

    def __init__(self, name: str, source: Source, index: np.ndarray | None = None):
        self.name, self.source = name, source
        self.index = np.arange(len(source)) if index is None else np.asarray(index, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def labels(self) -> np.ndarray:
        return self.source.labels[self.index]


def _missing(dataset: str, what: str) -> ConfigError:
    others = "|".join(d for d in DATASETS if d != dataset)
    return ConfigError(f"task.dataset={dataset}: {what}; or choose task.dataset={others}")


# ----------------------------------------------------------------------------- loaders
def load_cifar(dataset: str, root: Path, download: bool) -> tuple[dict[str, Source], list[str]]:
    """CIFAR-10 / CIFAR-100 (``dataset``) from ``root`` through torchvision, downloaded there if
    ``download``."""
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if dataset == "cifar10" else CIFAR100
    existing = next(p for p in (root, *root.parents) if p.exists())  # dirs below it are ours
    sources, classes = {}, []
    for split, train in (("train", True), ("test", False)):
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # torchvision prints "Files already downloaded"
                ds = cls(root=str(root), train=train, download=download)
        except RuntimeError as err:  # "Dataset not found or corrupted"
            raise _missing(
                dataset,
                f"no usable copy in {root} ({cls.base_folder}/ expected; {one_line(err)}); "
                f"set task.download=true (needs internet) or task.data_dir=<directory holding {cls.base_folder}/>",
            ) from None
        except Exception as err:  # URLError, socket errors, ... while downloading
            # leave no empty directory behind (torchvision makes root before downloading)
            with contextlib.suppress(OSError):
                for d in (root, *root.parents):
                    if d == existing:
                        break
                    d.rmdir()  # fails (and stops) at the first non-empty one
            raise _missing(
                dataset,
                f"download to {root} failed ({one_line(err)}); copy the data there or set "
                f"task.data_dir=<directory holding {cls.base_folder}/>",
            ) from None
        sources[split] = ArraySource(np.asarray(ds.data), np.asarray(ds.targets), f"{dataset}:{split}")
        classes = list(ds.classes)
    return sources, classes


def load_fashion_mnist(root: Path) -> tuple[dict[str, Source], list[str]]:
    """The Fashion-MNIST IDX files in ``root`` (or ``root/FashionMNIST/raw``, torchvision's layout)."""
    candidates = [root, root / "FashionMNIST" / "raw"]
    for directory in candidates:
        found = {split: [_find_file(directory, stem) for stem in stems] for split, stems in FMNIST_FILES.items()}
        if all(p is not None for paths in found.values() for p in paths):
            break
    else:
        names = ", ".join(s + ".gz" for stems in FMNIST_FILES.values() for s in stems)
        raise _missing(
            "fashion_mnist",
            f"the IDX files ({names}) are not in {root}; install them with "
            f"'apt-get install dataset-fashion-mnist' (into {FMNIST_DIR}) or set task.data_dir=<their directory>",
        )
    sources = {}
    for split, (images_path, labels_path) in found.items():
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or images.dtype != np.uint8:
            raise ConfigError(f"{images_path}: expected uint8 images [N, H, W], got {images.dtype} {images.shape}")
        if labels.ndim != 1 or len(labels) != len(images):
            raise ConfigError(f"{labels_path}: expected {len(images)} labels, got shape {labels.shape}")
        if labels.size and (labels.min() < 0 or labels.max() >= len(FMNIST_CLASSES)):
            raise ConfigError(f"{labels_path}: labels outside 0..{len(FMNIST_CLASSES) - 1}")
        sources[split] = ArraySource(images, labels, f"{images_path.name}")
    return sources, list(FMNIST_CLASSES)


def load_imagefolder(root: Path | None) -> tuple[dict[str, Source], list[str]]:
    """``root/train`` and ``root/val`` (or ``valid``) and/or ``root/test``, one folder per class."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    if root is None:
        raise ConfigError("task.dataset=imagefolder needs task.data_dir=<directory with train/ and val/ or test/>")
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise _missing("imagefolder", f"{train_dir} does not exist (task.data_dir needs train/ and val/ or test/ subfolders)")
    try:
        classes, class_to_idx = find_classes(str(train_dir))
    except FileNotFoundError as err:
        raise ConfigError(f"task.data_dir={root}: {one_line(err)}") from None
    sources: dict[str, Source] = {}
    for split, folder in (("train", "train"), ("validation", "val"), ("validation", "valid"), ("test", "test")):
        directory = root / folder
        if split in sources or not directory.is_dir():
            continue
        extra = sorted(d.name for d in directory.iterdir() if d.is_dir() and d.name not in class_to_idx)
        if extra:
            raise ConfigError(f"{directory} has class folder '{extra[0]}' that {train_dir} lacks")
        try:
            samples = make_dataset(str(directory), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=split != "train")
        except FileNotFoundError as err:  # a class folder of train/ without image files
            raise ConfigError(f"{directory}: {one_line(err)}") from None
        sources[split] = FileSource([p for p, _ in samples], [y for _, y in samples])
    if len(sources) == 1:
        raise _missing("imagefolder", f"{root} has train/ but neither val/ nor test/ for evaluation")
    return sources, list(classes)


def load_hf(
    name: str | None,
    config: str | None = None,
    cache_dir: Path | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
) -> tuple[dict[str, Source], list[str]]:
    """A Hugging Face image dataset: hub ``name`` (+ ``config``, cached in ``cache_dir``) or a
    ``save_to_disk`` directory; columns given or found from the features."""
    import datasets

    if not name:
        raise ConfigError("task.dataset=hf needs task.hf_dataset=<hub dataset name or save_to_disk directory>")
    local = abs_path(name)
    try:
        if local.is_dir() and ((local / "dataset_dict.json").exists() or (local / "state.json").exists()):
            dd = datasets.load_from_disk(str(local))
        else:
            dd = datasets.load_dataset(name, config, cache_dir=str(cache_dir) if cache_dir else None)
    except Exception as err:
        raise _missing(
            "hf",
            f"cannot load Hugging Face dataset task.hf_dataset={name} ({one_line(err)}); check the name and "
            f"network, or give a directory written by DatasetDict.save_to_disk",
        ) from None
    if not isinstance(dd, datasets.DatasetDict):
        raise ConfigError(f"task.hf_dataset={name} is a single split; a DatasetDict with train and test/validation is needed")
    split_names = {"train": ("train",), "validation": ("validation", "valid", "val"), "test": ("test",)}
    chosen = {key: next((s for s in names if s in dd), None) for key, names in split_names.items()}
    if chosen["train"] is None or (chosen["validation"] is None and chosen["test"] is None):
        raise ConfigError(f"task.hf_dataset={name} has splits {list(dd)}; needed: train and validation or test")
    features = dd[chosen["train"]].features
    image_col = image_column or next((k for k, f in features.items() if isinstance(f, datasets.Image)), None)
    if image_col not in features:
        raise ConfigError(f"task.hf_image_column={image_col!r} is not a column of {name}; columns: {', '.join(features)}")
    label_col = label_column or next(
        (k for k, f in features.items() if isinstance(f, datasets.ClassLabel)),
        next((k for k in ("label", "labels", "fine_label") if k in features), None),
    )
    if label_col not in features:
        raise ConfigError(f"task.hf_label_column={label_col!r} is not a column of {name}; columns: {', '.join(features)}")
    feature = features[label_col]
    if isinstance(feature, datasets.ClassLabel):
        classes = list(feature.names)
        to_index = None
    else:
        values = sorted({v for s in chosen.values() if s for v in dd[s][label_col]})
        classes = [str(v) for v in values]
        to_index = {v: i for i, v in enumerate(values)}
    sources: dict[str, Source] = {}
    for key, split in chosen.items():
        if split is None:
            continue
        raw = dd[split][label_col]
        labels = np.asarray([to_index[v] for v in raw] if to_index else raw, dtype=np.int64)
        ds = dd[split]
        valid = (labels >= 0) & (labels < len(classes))
        if not valid.all():  # e.g. unlabelled test splits (label -1)
            if not valid.any() and key != "train":
                log.warning("%s split '%s' has no labels; not used for evaluation", name, split)
                continue
            warnings.warn(
                f"task.hf_dataset={name}: dropped {int((~valid).sum())} example(s) of split '{split}' without a valid label",
                RuntimeWarning,
                stacklevel=3,
            )
            keep = np.flatnonzero(valid)
            ds, labels = ds.select(keep), labels[keep]
        sources[key] = HFSource(ds, image_col, labels, f"{name}:{split}")
    if "validation" not in sources and "test" not in sources:
        raise ConfigError(f"task.hf_dataset={name}: neither a validation nor a test split has labels")
    return sources, classes


# ----------------------------------------------------------------------------- verification
def verify_images(splits: dict[str, Split], mode: str, on_bad_image: str) -> dict[str, int]:
    """Check every image file of ``splits`` once (dev and test may share one source) with
    ``mode`` (auto | full | quick | none); with ``on_bad_image=skip`` drop the bad ones from the
    splits' indices (in place) and return how many each split lost, else raise."""
    skipped: dict[str, int] = {}
    if mode == "none":
        return skipped
    errors: dict[int, dict[int, str]] = {}  # id(source) -> {example: error}
    checked: dict[int, set[int]] = {}
    first_bad: tuple[str, str] | None = None
    for split in splits.values():
        source = split.source
        if not source.files:
            continue
        full = mode == "full" or (mode == "auto" and len(split) <= _VERIFY_FULL_LIMIT)
        done, bad = checked.setdefault(id(source), set()), errors.setdefault(id(source), {})
        for i in map(int, split.index):
            if i in done:
                continue
            done.add(i)
            try:
                source.verify(i, full)
            except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
                bad[i] = one_line(err)
                if first_bad is None:
                    first_bad = (source.describe(i), bad[i])
    total_bad = sum(len(b) for b in errors.values())
    if total_bad and on_bad_image == "error":
        path, why = first_bad
        raise ConfigError(
            f"cannot read image {path} ({why}); {total_bad} unreadable image(s) in all; fix or remove them, "
            f"or set task.on_bad_image=skip to drop them"
        )
    for key, split in splits.items():
        bad = errors.get(id(split.source))
        if not bad:
            continue
        keep = np.asarray([i not in bad for i in map(int, split.index)], dtype=bool)
        dropped = int((~keep).sum())
        if dropped:
            example = split.source.describe(int(split.index[~keep][0]))
            split.index = split.index[keep]
            skipped[key] = dropped
            msg = (
                f"task.on_bad_image=skip: skipped {dropped} unreadable image(s) of the {key} split ({split.name}), e.g. {example}"
            )
            log.warning(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
    return skipped
