"""The shared evaluator (runner/evaluation.py): reduction rules, metrics equal to a hand computation,
DataLoader workers and DDP shards that change nothing."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from conftest import REPO, compose, glue_overrides, write_glue
from adaptune.runner.evaluation import evaluate, reduce_partials
from adaptune.tasks import build_task
from adaptune.tasks.base import Task


# ------------------------------------------------------------------------------ reduction
def test_reduce_sums_in_plan_order_and_merges_mappings():
    # given out of order: summing as given (-1e16 + 1e16 + 0.25) would keep the 0.25; plan order
    # (1e16 + 0.25 - 1e16) loses it, as one process evaluating the plans in turn does
    parts = [
        (2, {"loss": -1e16, "n": 1, "preds": {7: 0}}),
        (0, {"loss": 1e16, "n": 2, "preds": {0: 1, 3: 1}}),
        (1, {"loss": 0.25, "n": 4, "preds": {5: 2}}),
    ]
    reduced = reduce_partials(parts)
    assert reduced["loss"] == 0.0
    assert reduced["n"] == 7 and isinstance(reduced["n"], int)
    assert reduced["preds"] == {0: 1, 3: 1, 5: 2, 7: 0}
    assert reduce_partials([]) == {}
    with pytest.raises(ValueError, match="example 3 occurs in two evaluation batches"):
        reduce_partials([(0, {"preds": {3: 1}}), (1, {"preds": {3: 0}})])
    with pytest.raises(TypeError, match="'preds' is a number in one batch, a mapping in another"):
        reduce_partials([(0, {"preds": 1}), (1, {"preds": {3: 0}})])


class ToyTask(Task):
    """Linear classification of 22 points in batches of 5: loss / count sums and predictions."""

    kind = "toy"
    main_metric = "accuracy"

    def __init__(self):
        super().__init__({}, Path("."), 0)
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(22, 4, generator=g)
        self.y = torch.randint(0, 3, (22,), generator=g)

    def eval_batches(self, split):
        return [list(range(i, min(i + 5, 22))) for i in range(0, 22, 5)]

    def make_eval_batch(self, split, plan):
        return {"x": self.x[plan], "y": self.y[plan], "ids": plan}

    def eval_step(self, model, batch):
        logits = model(batch["x"])
        return {
            "loss": F.cross_entropy(logits, batch["y"], reduction="sum"),
            "n": len(batch["ids"]),
            "correct": (logits.argmax(-1) == batch["y"]).sum(),
            "preds": dict(zip(batch["ids"], logits.argmax(-1).tolist())),
        }

    def finalize(self, split, reduced):
        preds = [reduced["preds"][i] for i in sorted(reduced["preds"])]
        return {
            "accuracy": reduced["correct"] / reduced["n"],
            "loss": reduced["loss"] / reduced["n"],
            "ones": float(sum(p == 1 for p in preds)),
        }


def test_toy_task_metrics_equal_a_hand_computation():
    task = ToyTask()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Dropout(0.5))
    model.train()
    with torch.no_grad():
        model.eval()
        logits = model(task.x)
    model.train()
    rng = torch.get_rng_state()
    for workers in (0, 2):
        metrics = evaluate(task, model, "dev", num_workers=workers)
        assert metrics["accuracy"] == int((logits.argmax(-1) == task.y).sum()) / 22
        assert metrics["loss"] == pytest.approx(float(F.cross_entropy(logits, task.y)), rel=1e-6)
        assert metrics["ones"] == float((logits.argmax(-1) == 1).sum())
        assert model.training  # the train/eval mode is restored (dropout was off while evaluating)
        assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is untouched

    task.eval_step = lambda model, batch: {"logits": model(batch["x"])}
    with pytest.raises(TypeError, match=r"eval_step\(\)\['logits'\]: a tensor partial result must be 0-dim"):
        evaluate(task, model, "dev")


# ------------------------------------------------------------------------------ GLUE, hand computed
def _write_mnli(directory: Path, n_train: int = 12, n_dev: int = 20) -> Path:
    rng = random.Random(0)
    words = "the cat dog bird house tree car road river town sees likes".split()
    labels = ("entailment", "neutral", "contradiction")
    directory.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.tsv", n_train), ("dev_matched.tsv", n_dev), ("dev_mismatched.tsv", n_dev + 3)):
        rows = ["index\tsentence1\tsentence2\tgold_label"]
        rows += [
            f"{i}\t{' '.join(rng.choices(words, k=rng.randint(3, 9)))}\t"
            f"{' '.join(rng.choices(words, k=rng.randint(2, 6)))}\t{labels[i % 3]}"
            for i in range(n)
        ]
        (directory / name).write_text("\n".join(rows) + "\n")
    return directory


def _glue(tmp_path: Path, name: str, data: Path, *extra: str):
    cfg = compose(glue_overrides(data, name, "trainer.eval_batch_size=8", *extra))
    task = build_task(OmegaConf.to_container(cfg.task, resolve=True), tmp_path / "run", seed=0)
    task.setup()
    torch.manual_seed(0)
    return task, task.build_model()


def _logits_one_by_one(model, data) -> torch.Tensor:
    """Each dev example alone (no padding, no batching)."""
    out = []
    with torch.inference_mode():
        for i, ids in enumerate(data["input_ids"]):
            inputs = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
            if data["token_type_ids"]:
                inputs["token_type_ids"] = torch.tensor([data["token_type_ids"][i]])
            out.append(model(**inputs).logits[0].float())
    return torch.stack(out)


@pytest.mark.e2e
def test_glue_cola_and_mnli_metrics_equal_a_hand_computation(tmp_path):
    from sklearn.metrics import matthews_corrcoef

    # CoLA: Matthews needs every prediction. A random tiny model predicts one class for almost
    # everything, so shift the classifier bias to split the predictions at a wide gap near the middle.
    task, model = _glue(tmp_path, "cola", write_glue(tmp_path / "cola", "cola", n_train=8, n_dev=43))
    model.eval()
    logits = _logits_one_by_one(model, task.eval_sets["dev"][0][0])
    diff, _ = torch.sort(logits[:, 1] - logits[:, 0])
    k = max(range(14, 29), key=lambda j: float(diff[j + 1] - diff[j]))
    with torch.no_grad():
        model.classifier.bias[1] -= float(diff[k] + diff[k + 1]) / 2
    logits = _logits_one_by_one(model, task.eval_sets["dev"][0][0])
    labels = torch.tensor(task.eval_sets["dev"][0][0]["labels"])
    preds = logits.argmax(-1)
    assert 14 <= int(preds.sum()) <= 29
    model.train()
    metrics = evaluate(task, model, "dev")
    assert model.training  # restored
    assert set(metrics) == {"matthews", "accuracy", "loss", "pred_frac_0", "pred_frac_1", "pred_classes"}
    assert metrics["pred_frac_1"] == int(preds.sum()) / len(preds) and metrics["pred_classes"] == 2
    assert metrics["matthews"] == pytest.approx(matthews_corrcoef(labels.numpy(), preds.numpy()), abs=1e-12)
    assert metrics["matthews"] != 0.0
    assert metrics["accuracy"] == int((preds == labels).sum()) / len(labels)
    assert metrics["loss"] == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-5)

    # MNLI: two dev sets, metric names with their suffixes
    task, model = _glue(tmp_path, "mnli", _write_mnli(tmp_path / "mnli"))
    model.eval()
    metrics = evaluate(task, model, "dev")
    spread = {
        f"{k}{s}"
        for k in ("pred_frac_entailment", "pred_frac_neutral", "pred_frac_contradiction", "pred_classes")
        for s in ("_m", "_mm")
    }
    assert set(metrics) == {"accuracy_m", "loss_m", "accuracy_mm", "loss_mm"} | spread
    for (data, _), suffix in zip(task.eval_sets["dev"], ("_m", "_mm")):
        logits = _logits_one_by_one(model, data)
        labels = torch.tensor(data["labels"])
        assert metrics[f"accuracy{suffix}"] == int((logits.argmax(-1) == labels).sum()) / len(labels)
        assert metrics[f"loss{suffix}"] == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-5)
    from adaptune.common.errors import ConfigError

    with pytest.raises(ConfigError, match="GLUE test labels are not public"):
        evaluate(task, model, "test")


def test_dataloader_workers_give_identical_metrics(tmp_path):
    task, model = _glue(tmp_path, "stsb", write_glue(tmp_path / "stsb", "stsb", n_train=8, n_dev=37))
    pids: list[int] = []
    make, step = task.make_eval_batch, task.eval_step
    task.make_eval_batch = lambda split, plan: {**make(split, plan), "pid": os.getpid()}

    def recording_step(model, batch):
        pids.append(batch["pid"])
        return step(model, batch)

    task.eval_step = recording_step
    rng = torch.get_rng_state()
    inline = evaluate(task, model, "dev", num_workers=0)
    assert set(pids) == {os.getpid()} and len(pids) == 5  # ceil(37 / 8) batches
    pids.clear()
    workers = evaluate(task, model, "dev", num_workers=2)
    assert len(pids) == 5 and os.getpid() not in pids and len(set(pids)) == 2
    assert workers == inline  # bit-identical
    assert set(inline) == {"pearson", "spearman", "loss", "pred_std"} and inline["loss"] > 0
    assert torch.equal(torch.get_rng_state(), rng)


# ------------------------------------------------------------------------------ DDP
# The script sets the task and model up once, evaluates them in one process, then forks two gloo
# ranks that inherit both (cheaper than two processes importing and setting up everything anew).
_DDP_SCRIPT = """
import json, os, socket, sys
from pathlib import Path
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from adaptune.runner.distributed import DistInfo
from adaptune.runner.evaluation import evaluate
from adaptune.tasks import build_task


def rank_main(rank, world, port, task, model, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    seen, step = [], task.eval_step

    def recording(model, batch):  # (rank 1 builds its batches in a DataLoader worker)
        seen.extend(batch["ids"])
        return step(model, batch)

    task.eval_step = recording
    metrics = evaluate(task, model, "dev", dist=DistInfo(rank, world), num_workers=rank)
    (out / f"rank{{rank}}.json").write_text(json.dumps({{"metrics": metrics, "ids": seen}}))
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    out = Path({out!r})
    task = build_task(json.loads((out / "task.json").read_text()), out, seed=0)
    task.setup()
    torch.manual_seed(0)
    model = task.build_model()
    (out / "single.json").write_text(json.dumps(evaluate(task, model, "dev")))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(rank_main, args=(2, port, task, model, out), nprocs=2, start_method="fork")
"""


@pytest.mark.e2e
def test_two_gloo_ranks_evaluate_disjoint_shards_with_the_metrics_of_one_process(tmp_path):
    data = write_glue(tmp_path / "cola", "cola", n_train=8, n_dev=45)
    cfg = compose(glue_overrides(data, "cola", "trainer.eval_batch_size=8"))
    (tmp_path / "task.json").write_text(json.dumps(OmegaConf.to_container(cfg.task, resolve=True)))
    script = tmp_path / "ddp_eval.py"
    script.write_text(_DDP_SCRIPT.format(repo=str(REPO), out=str(tmp_path)))
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = json.loads((tmp_path / "single.json").read_text())
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    # 45 examples in 6 batches of <= 8: plans 0, 2, 4 on rank 0 and 1, 3, 5 on rank 1
    assert len(r0["ids"]) == 24 and len(r1["ids"]) == 21
    assert not set(r0["ids"]) & set(r1["ids"])
    assert sorted(r0["ids"] + r1["ids"]) == list(range(45))
    assert set(single) == {"matthews", "accuracy", "loss", "pred_frac_0", "pred_frac_1", "pred_classes"}
    assert r0["metrics"] == r1["metrics"] == single  # identical, not merely close
