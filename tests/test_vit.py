"""Tests of the timm image-classification task (tasks/vit.py) with images the tests generate."""

from __future__ import annotations

import gzip
import random
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("timm")
from PIL import Image  # noqa: E402

from adaptune.common.errors import ConfigError  # noqa: E402
from adaptune.tasks import build_task  # noqa: E402
from adaptune.runner.evaluation import evaluate  # noqa: E402
from adaptune.tasks.vit import BatchPlan, ImageClassificationTask, read_idx, topk_correct  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CLASSES = ("checker", "hstripes", "quadrant", "vstripes")  # sorted, as ImageFolder orders them
TINY = {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}


def pattern(label: int, rng: np.random.Generator, size: int = 16) -> np.ndarray:
    """A class-dependent RGB pattern with a random colour, phase and noise."""
    yy, xx = np.mgrid[0:size, 0:size]
    shift = int(rng.integers(0, 4))
    if CLASSES[label] == "checker":
        mask = ((yy + shift) // 2 + (xx + shift) // 2) % 2
    elif CLASSES[label] == "hstripes":
        mask = ((yy + shift) // 2) % 2
    elif CLASSES[label] == "vstripes":
        mask = ((xx + shift) // 2) % 2
    else:  # a bright quadrant at a random corner
        qy, qx = rng.integers(0, 2, size=2)
        mask = ((yy // (size // 2)) == qy) & ((xx // (size // 2)) == qx)
    colour = rng.uniform(0.5, 1.0, size=3)
    img = mask[..., None] * colour[None, None, :] * 255 + rng.normal(0, 20, size=(size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def write_imagefolder(root: Path, per_class: dict[str, int], seed: int = 0) -> dict[str, list[Path]]:
    rng = np.random.default_rng(seed)
    written: dict[str, list[Path]] = {}
    for split, n in per_class.items():
        for label, name in enumerate(CLASSES):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                path = d / f"{i:03d}.png"
                Image.fromarray(pattern(label, rng)).save(path)
                written.setdefault(split, []).append(path)
    return written


def task_cfg(**over) -> dict:
    cfg = {
        "kind": "vit",
        "dataset": "imagefolder",
        "batch_size": 16,
        "eval_batch_size": 64,
        "model": {"name": "vit_tiny_patch16_224", "pretrained": False, "img_size": 16, "kwargs": dict(TINY)},
        "augment": {"scale": [0.8, 1.0], "ratio": [0.9, 1.1], "hflip": 0.5, "crop_pct": 1.0, "interpolation": "bilinear"},
    }
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def make_task(tmp_path: Path, seed: int = 0, **over) -> ImageClassificationTask:
    task = build_task(task_cfg(**over), run_dir=tmp_path / "run", seed=seed)
    assert isinstance(task, ImageClassificationTask)
    return task


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagefolder")
    write_imagefolder(root, {"train": 48, "val": 12})
    return root


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


# ------------------------------------------------------------------------------------ data paths
def test_imagefolder_loads_files_written_by_the_test(folder, tmp_path):
    task = make_task(tmp_path, data_dir=str(folder))
    task.setup()
    assert task.classes == list(CLASSES)
    assert task.main_metric == "top1" and task.greater_is_better
    patterns = task.param_patterns(task.build_model())  # the model's own no_weight_decay() joins the family's
    assert patterns["sage"] == ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    assert {"pos_embed", "cls_token", "bias", "norm"} <= set(patterns["no_decay"])
    assert len(task.splits["train"]) == 4 * 48 and len(task.splits["dev"]) == 4 * 12
    assert task.splits["dev"].name == "validation" and task.splits["test"].name == "validation"
    src = task.splits["train"].source
    for i in range(0, len(src), 37):  # the label is the folder the file sits in
        assert CLASSES[src.labels[i]] == Path(src.paths[i]).parent.name
    assert np.bincount(task.splits["dev"].labels).tolist() == [12] * 4
    batch = task.make_batch(task.train_batches(0)[0])
    assert batch["images"].shape == (16, 3, 16, 16) and batch["images"].dtype == torch.float32
    assert batch["targets"].shape == (16,)
    summary = task.summary()
    assert summary["num_classes"] == 4 and summary["train_size"] == 192
    assert not task.has_test  # val/ only: dev and test are the same split, reported once

    def subsets(seed):
        t = make_task(tmp_path, seed=seed, data_dir=str(folder), train_subset=50, eval_subset=10)
        t.setup()
        return t.splits["train"].index.tolist(), t.splits["dev"].index.tolist()

    (train_a, dev_a), (train_b, dev_b) = subsets(1), subsets(2)
    assert len(train_a) == 50 and len(dev_a) == 10
    assert train_a != train_b and dev_a == dev_b  # training subset follows the seed, eval does not


def test_idx_files_in_fashion_mnist_format(tmp_path):
    rng = np.random.default_rng(1)
    arrays = {}
    for prefix, n in (("train", 30), ("t10k", 10)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels)
        arrays[prefix] = (images, labels)
    np.testing.assert_array_equal(read_idx(tmp_path / "train-images-idx3-ubyte.gz"), arrays["train"][0])

    task = make_task(tmp_path, dataset="fashion_mnist", data_dir=str(tmp_path), model={"img_size": 28})
    task.setup()
    assert task.num_classes == 10 and task.classes[0] == "T-shirt/top"
    np.testing.assert_array_equal(task.splits["train"].source.images, arrays["train"][0])
    np.testing.assert_array_equal(task.splits["train"].labels, arrays["train"][1])
    np.testing.assert_array_equal(task.splits["test"].labels, arrays["t10k"][1])
    assert task.splits["dev"].name == "test"  # no validation split: dev is the test split
    batch = task.make_eval_batch("test", [0, 1])
    assert batch["images"].shape == (2, 3, 28, 28)  # grayscale -> 3 channels
    # no augmentation, crop 1.0: the image is exactly the normalised IDX pixels
    expected = (torch.from_numpy(arrays["t10k"][0][0]).float() / 255 - 0.5) / 0.5
    torch.testing.assert_close(batch["images"][0, 1], expected, atol=1e-5, rtol=0)

    # in_chans=1 keeps one channel
    task1 = make_task(
        tmp_path, dataset="fashion_mnist", data_dir=str(tmp_path), model={"img_size": 28, "kwargs": {**TINY, "in_chans": 1}}
    )
    task1.setup()
    assert task1.make_eval_batch("dev", [0])["images"].shape == (1, 1, 28, 28)

    # a truncated IDX file is named in the error
    bad = tmp_path / "train-labels-idx1-ubyte.gz"
    with gzip.open(bad, "wb") as f:
        f.write(struct.pack(">BBBBI", 0, 0, 8, 1, 30) + b"\x01" * 7)
    with pytest.raises(ConfigError, match="train-labels-idx1-ubyte.gz"):
        make_task(tmp_path, dataset="fashion_mnist", data_dir=str(tmp_path)).setup()


def test_hf_dataset_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(2)

    def split(n):
        labels = [i % 4 for i in range(n)]
        return datasets.Dataset.from_dict(
            {"img": [Image.fromarray(pattern(y, rng)) for y in labels], "label": labels},
            features=datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASSES))}),
        )

    path = tmp_path / "hfdata"
    datasets.DatasetDict({"train": split(12), "test": split(8)}).save_to_disk(str(path))
    task = make_task(tmp_path, dataset="hf", hf_dataset=str(path))
    task.setup()
    assert task.classes == list(CLASSES)
    assert len(task.splits["train"]) == 12 and len(task.splits["dev"]) == 8
    assert task.make_batch(task.train_batches(0)[0])["images"].shape == (12, 3, 16, 16)


# ------------------------------------------------------------------------------------ bad input
def test_corrupt_images_error_or_skip(tmp_path):
    written = write_imagefolder(tmp_path, {"train": 5, "val": 2})
    garbage = tmp_path / "train" / "hstripes" / "garbage.png"
    garbage.write_bytes(b"this is not a png at all")
    truncated = tmp_path / "val" / "checker" / "truncated.png"
    data = written["train"][0].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])

    with pytest.raises(ConfigError) as err:
        make_task(tmp_path, data_dir=str(tmp_path)).setup()
    msg = str(err.value)
    assert "\n" not in msg and "garbage.png" in msg and "2 unreadable" in msg
    assert "task.on_bad_image=skip" in msg

    task = make_task(tmp_path, data_dir=str(tmp_path), on_bad_image="skip")
    with pytest.warns(RuntimeWarning, match="skipped 1 unreadable") as record:
        task.setup()
    assert any("garbage.png" in str(w.message) for w in record)
    assert any("truncated.png" in str(w.message) for w in record)  # full decode catches truncation
    assert len(task.splits["train"]) == 20 and len(task.splits["dev"]) == 8
    assert task.summary()["skipped_images"] == {"train": 1, "dev": 1, "test": 1}

    # a file that breaks after setup is dropped from its batch with a warning, not a crash
    victim = Path(task.splits["train"].source.paths[int(task.splits["train"].index[0])])
    victim.write_bytes(b"broken later")
    plan = next(p for p in task.train_batches(0) if 0 in p.indices)
    with pytest.warns(RuntimeWarning, match="dropping unreadable image"):
        batch = task.make_batch(plan)
    assert batch["images"].shape[0] == len(plan.indices) - 1 == batch["targets"].shape[0]


def test_missing_data_and_bad_keys_are_one_line_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (
            dict(dataset="fashion_mnist", data_dir=str(empty)),
            ["apt-get install dataset-fashion-mnist", "task.data_dir", "cifar10|cifar100|imagefolder|hf"],
        ),
        (dict(dataset="imagefolder", data_dir=str(empty)), ["train", "task.data_dir"]),
        (dict(dataset="cifar10", data_dir=str(empty), download=False), ["task.download=true", "task.data_dir"]),
        (dict(dataset="hf"), ["task.hf_dataset"]),
    ]
    for cfg, needles in cases:
        with pytest.raises(ConfigError) as err:
            make_task(tmp_path, **cfg).setup()
        assert "\n" not in str(err.value)
        for needle in needles:
            assert needle in str(err.value), (cfg, str(err.value))
    with pytest.raises(ConfigError, match="allowed: cifar10, cifar100, imagefolder, hf, fashion_mnist"):
        make_task(tmp_path, dataset="mnist")
    with pytest.raises(ConfigError, match="task.on_bad_image='ignore'.*allowed: error, skip"):
        make_task(tmp_path, on_bad_image="ignore")
    with pytest.raises(ConfigError, match="task.augment.hflp"):
        make_task(tmp_path, augment={"hflp": 0.5})
    with pytest.raises(ConfigError, match="not a timm model"):
        make_task(tmp_path, data_dir=str(empty), model={"name": "vit_nonexistent_model"}).setup()


def test_offline_pretrained_is_a_clear_config_error(folder, tmp_path, monkeypatch):
    import huggingface_hub.constants
    from timm.models import get_pretrained_cfg

    hub_id = get_pretrained_cfg("vit_tiny_patch16_224").hf_hub_id
    for filename in ("model.safetensors", "pytorch_model.bin"):
        if isinstance(huggingface_hub.try_to_load_from_cache(hub_id, filename), str):
            pytest.skip("the pretrained weights are in the local cache")
    # Offline mode makes the hub fail at once (instead of after its network retries) with the
    # same exception an unreachable hub gives.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    task = make_task(tmp_path, data_dir=str(folder), model={"pretrained": True, "img_size": None, "kwargs": {}})
    task.setup()
    with pytest.raises(ConfigError) as err:
        task.build_model()
    msg = str(err.value)
    assert "\n" not in msg and "task.model.pretrained=false" in msg and "vit_tiny_patch16_224" in msg


# ------------------------------------------------------------------------------------ batches, metrics
def test_train_batches_and_augmentation_are_deterministic(folder, tmp_path):
    task = make_task(tmp_path, seed=3, data_dir=str(folder), batch_size=20)
    task.setup()
    plans = task.train_batches(1)
    assert plans == task.train_batches(1) and plans != task.train_batches(2)
    assert all(isinstance(p, BatchPlan) for p in plans)
    flat = [i for p in plans for i in p.indices]
    assert sorted(flat) == list(range(len(task.splits["train"])))
    assert [len(p.indices) for p in plans] == [20] * 9 + [12]
    other = make_task(tmp_path, seed=4, data_dir=str(folder), batch_size=20)
    other.setup()
    assert other.train_batches(1) != plans

    torch.manual_seed(0)
    random.seed(0)
    expected_next = (torch.rand(3), random.random())
    torch.manual_seed(0)
    random.seed(0)
    a = task.make_batch(plans[4])
    assert torch.equal(torch.rand(3), expected_next[0]) and random.random() == expected_next[1]
    b = task.make_batch(plans[4])  # e.g. after a resume: bit-identical
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["targets"], b["targets"])
    # augmentation differs between epochs for the same example
    same_example = BatchPlan(2, 0, plans[4].indices)
    assert not torch.equal(task.make_batch(same_example)["images"], a["images"])


def test_topk_metrics_on_hand_computed_logits():
    logits = torch.tensor(
        [
            [9.0, 1, 2, 3, 4, 5, 6],  # target 0: top-1 hit
            [9.0, 1, 2, 3, 4, 5, 6],  # target 4: rank 3 -> top-5 hit only
            [9.0, 1, 2, 3, 4, 5, 6],  # target 1: rank 7 -> miss
            [0.0, 0, 0, 0, 0, 0, 8],  # target 6: top-1 hit
        ]
    )
    targets = torch.tensor([0, 4, 1, 6])
    assert topk_correct(logits, targets, 5) == (2, 3)
    # fewer than 5 classes: top-5 is top-C, always 1.0
    assert topk_correct(logits[:3, :3], torch.tensor([0, 1, 2]), 5) == (1, 3)

    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x):
            return logits[x[:, 0].long()] + self.w  # x carries the example's position

    task = ImageClassificationTask(task_cfg(eval_batch_size=3), run_dir=Path("."), seed=0)
    task.classes = [str(i) for i in range(7)]
    task.splits = {"dev": object()}
    task.eval_batches = lambda split: [(0, 1, 2), (3,)]
    task.make_eval_batch = lambda split, pos: {
        "images": torch.tensor(pos, dtype=torch.float32)[:, None],
        "targets": targets[list(pos)],
    }
    metrics = evaluate(task, Fixed(), "dev")
    expected_loss = float(torch.nn.functional.cross_entropy(logits, targets))
    assert metrics["top1"] == 0.5 and metrics["top5"] == 0.75
    assert metrics["loss"] == pytest.approx(expected_loss, rel=1e-6)


def test_mixup_gives_soft_targets(folder, tmp_path):
    task = make_task(tmp_path, data_dir=str(folder), batch_size=7, label_smoothing=0.1, augment={"mixup": 0.8, "cutmix": 1.0})
    task.setup()
    batch = task.make_batch(task.train_batches(0)[0])
    assert batch["targets"].shape == (7, 4)
    torch.testing.assert_close(batch["targets"].sum(1), torch.ones(7))
    model = task.build_model()
    out = task.loss(model, batch)
    assert out.sample_size == 7 and out.n_samples == 7 and torch.isfinite(out.loss_sum)


# ------------------------------------------------------------------------------------ training
@pytest.mark.e2e
def test_tiny_vit_learns_class_patterns_above_chance(folder, tmp_path):
    torch.manual_seed(0)
    task = make_task(tmp_path, data_dir=str(folder), batch_size=32)
    task.setup()
    model = task.build_model()
    before = evaluate(task, model, "dev")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    model.train()
    step = 0
    for epoch in range(12):  # 6 batches per epoch: 72 steps
        for plan in task.train_batches(epoch):
            out = task.loss(model, task.make_batch(plan))
            (out.loss_sum / out.sample_size).backward()
            opt.step()
            opt.zero_grad()
            step += 1
    after = evaluate(task, model, "dev")
    assert step == 72
    assert set(after) == {"top1", "top5", "loss"}
    assert after["top1"] >= 0.7, (before, after)  # chance is 0.25 (seeds 0-4 gave 0.875-1.0)
    assert after["loss"] < before["loss"]
    assert after["top5"] == 1.0  # 4 classes: top-5 = top-4


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@pytest.mark.parametrize("schedule", ["baseline", "sage", "dps"])
def test_runs_through_the_shared_loop(folder, tmp_path, schedule):
    loop = pytest.importorskip("adaptune.runner.loop")
    if not (REPO / "conf" / "schedule" / f"{schedule}.yaml").is_file():
        pytest.skip(f"conf/schedule/{schedule}.yaml is not there yet")
    cfg = _compose(
        [
            "task=vit",
            f"schedule={schedule}",
            "trainer=cpu_fast",
            "logger=none",
            "task.dataset=imagefolder",
            f"task.data_dir={folder}",
            "task.model.name=vit_tiny_patch16_224",
            "task.model.pretrained=false",
            "task.model.img_size=16",
            "task.model.kwargs={patch_size:4,embed_dim:32,depth:2,num_heads:2,mlp_ratio:2.0}",
            "task.augment.scale=[0.8,1.0]",
            "task.augment.crop_pct=1.0",
            "trainer.batch_size=32",
            "trainer.eval_batch_size=64",
            "trainer.max_steps=12",
            "trainer.save_every=6",
            "trainer.progress=false",
            "trainer.num_threads=1",
            "schedule.lr=3e-3",
            "name=vit_test",
        ]
        + {"sage": ["schedule.base=adamw"], "dps": ["schedule.update_ratio=0.25"]}.get(schedule, [])
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = loop.run(cfg, tmp_path / "run")
    assert results["status"] == "completed" and results["steps"] == 12
    assert results["main_metric"] == "top1" and set(results["final"]) >= {"top1", "top5", "loss"}
    assert results["final"]["top1"] > 0.25 or schedule != "baseline"
    assert results["task_summary"]["num_classes"] == 4
