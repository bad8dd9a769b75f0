"""The DPS out-of-domain protocol: readers of each set's original format, the 3-way -> 2-way label
mapping, one-line errors for missing data, and an end-to-end tiny run whose results.json holds a
test metric per set equal to a recomputation from the saved model."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import FAST, REPO, TINY_BERT, compose

from adaptune.common.errors import ConfigError
from adaptune.tasks import build_task, ood
from adaptune.tasks.nli_data import load_set, read_scitail_tsv, read_sick, read_snli_jsonl

LABELS = ("entailment", "neutral", "contradiction")
MARK = {"entailment": "yes", "neutral": "maybe", "contradiction": "no"}
SETS = ["mnli", "snli", "sick", "scitail", "rte"]


def _pair(i: int, label: str) -> tuple[str, str]:
    return f"the cat {i} sits on the mat", f"a {MARK[label]} cat {MARK[label]} sits"


# ------------------------------------------------------------------------------ files in the original formats
def write_mnli(d: Path, n_train: int = 48, n_dev: int = 12) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    header = "index\tpromptID\tpairID\tgenre\tsentence1\tsentence2\tlabel1\tgold_label"
    for name, n in (("train.tsv", n_train), ("dev_matched.tsv", n_dev), ("dev_mismatched.tsv", n_dev)):
        rows = [header]
        for i in range(n):
            label = LABELS[i % 3]
            a, b = _pair(i, label)
            rows.append(f"{i}\t{i}\t{i}e\tgov\t{a}\t{b}\t{label}\t{label}")
        (d / name).write_text("\n".join(rows) + "\n")
    return d


def write_snli(d: Path, n: int = 9, n_train: int = 48) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for split in ("train", "dev", "test"):
        rows = []
        for i in range(n_train if split == "train" else n):
            label = LABELS[i % 3]
            a, b = _pair(i, label)
            rows.append(
                json.dumps(
                    {
                        "annotator_labels": [label],
                        "captionID": f"{i}",
                        "gold_label": label,
                        "pairID": f"{i}",
                        "sentence1": a,
                        "sentence2": b,
                        "sentence1_parse": "(ROOT)",
                        "sentence2_parse": "(ROOT)",
                    }
                )
            )
        # no agreement among the annotators: gold label "-", skipped
        rows.append(
            json.dumps(
                {
                    "annotator_labels": ["neutral", "contradiction"],
                    "gold_label": "-",
                    "sentence1": "unlabelled",
                    "sentence2": f"row of {split}",
                }
            )
        )
        (d / f"snli_1.0_{split}.jsonl").write_text("\n".join(rows) + "\n")
    return d


def write_sick(d: Path, n: int = 9) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    rows = [
        (
            "pair_ID\tsentence_A\tsentence_B\tentailment_label\trelatedness_score\tentailment_AB\t"
            "entailment_BA\tsentence_A_original\tsentence_B_original\tsentence_A_dataset\t"
            "sentence_B_dataset\tSemEval_set"
        )
    ]
    k = 0
    for part in ("TRAIN", "TRIAL", "TEST"):
        for i in range(n):
            label = LABELS[i % 3]
            a, b = _pair(i, label)
            k += 1
            rows.append(f"{k}\t{a}\t{b}\t{label.upper()}\t3.5\tA_{label}_B\tB_neutral_A\t{a}\t{b}\tFLICKR\tFLICKR\t{part}")
    (d / "SICK.txt").write_text("\n".join(rows) + "\n")
    return d


def write_scitail(root: Path, n: int = 8) -> Path:
    d = root / "tsv_format"
    d.mkdir(parents=True, exist_ok=True)
    for split in ("train", "dev", "test"):
        rows = []
        for i in range(n):
            label = "entailment" if i % 2 == 0 else "neutral"
            a, b = _pair(i, label)
            rows.append(f"{a}\t{b}\t{'entails' if i % 2 == 0 else 'neutral'}")
        (d / f"scitail_1.0_{split}.tsv").write_text("\n".join(rows) + "\n")
    return root


def write_rte(d: Path, n: int = 8) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    rows = ["index\tsentence1\tsentence2\tlabel"]
    for i in range(n):
        label = "entailment" if i % 2 == 0 else "contradiction"
        a, b = _pair(i, label)
        rows.append(f"{i}\t{a}\t{b}\t{'entailment' if i % 2 == 0 else 'not_entailment'}")
    for name in ("train.tsv", "dev.tsv"):
        (d / name).write_text("\n".join(rows) + "\n")
    return d


@pytest.fixture
def nli_dirs(tmp_path):
    return {
        "mnli": write_mnli(tmp_path / "MNLI"),
        "snli": write_snli(tmp_path / "snli_1.0"),
        "sick": write_sick(tmp_path / "SICK"),
        "scitail": write_scitail(tmp_path / "SciTailV1.1"),
        "rte": write_rte(tmp_path / "RTE"),
    }


def ood_overrides(dirs: dict, *extra: str, sets=SETS) -> list[str]:
    return [
        "task=glue",
        "task.name=mnli",
        f"task.data_dir={dirs['mnli']}",
        *TINY_BERT,
        *FAST,
        f"task.ood.sets=[{','.join(sets)}]",
        *[f"task.ood.data_dirs.{k}={v}" for k, v in dirs.items()],
        *extra,
    ]


# ------------------------------------------------------------------------------ readers
def test_readers_parse_original_formats_and_skip_unlabelled_rows(nli_dirs):
    snli = read_snli_jsonl(nli_dirs["snli"] / "snli_1.0_test.jsonl")
    assert len(snli) == 9 and [ex.label for ex in snli[:3]] == [0, 1, 2]  # the "-" row is skipped
    assert snli[1].text_a == "the cat 1 sits on the mat" and snli[1].text_b == "a maybe cat maybe sits"
    sick_test = read_sick(nli_dirs["sick"] / "SICK.txt", "test")
    sick_dev = read_sick(nli_dirs["sick"] / "SICK.txt", "dev")  # TRIAL
    assert len(sick_test) == len(sick_dev) == 9 and [ex.label for ex in sick_test[:3]] == [0, 1, 2]
    scitail = read_scitail_tsv(nli_dirs["scitail"] / "tsv_format" / "scitail_1.0_test.tsv")
    assert [ex.label for ex in scitail[:4]] == [0, 1, 0, 1]  # entails 0, neutral 1 (not entailment)
    # a directory: SciTailV1.1 or its tsv_format folder; the split picks the file
    assert load_set("scitail", str(nli_dirs["scitail"] / "tsv_format"), "test", "k") == scitail
    assert [ex.label for ex in load_set("rte", str(nli_dirs["rte"]), "dev", "k")][:2] == [0, 1]
    assert [ex.label for ex in load_set("mnli", str(nli_dirs["mnli"]), "test", "k")][:3] == [0, 1, 2]
    assert len(load_set("snli", str(nli_dirs["snli"]), "dev", "k")) == 9


def test_sick_rows_of_other_parts_and_bad_scitail_labels(tmp_path, nli_dirs):
    text = (nli_dirs["sick"] / "SICK.txt").read_text().splitlines()
    assert sum(line.endswith("\tTEST") for line in text) == 9
    bad = tmp_path / "bad.tsv"
    bad.write_text("a premise\ta hypothesis\tcontradiction\n")
    with pytest.raises(ConfigError, match=r"bad.tsv:1: expected premise<TAB>hypothesis<TAB>entails\|neutral"):
        read_scitail_tsv(bad)


# ------------------------------------------------------------------------------ label mapping
def test_three_way_predictions_on_two_way_sets():
    assert ood.to_two_way([0, 1, 2, 0, 2]) == [0, 1, 1, 0, 1]
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 3.0]])
    p = torch.softmax(logits, -1)
    hand = -(math.log(p[0, 0]) + math.log(p[1, 1] + p[1, 2]))  # labels: entailment, not entailment
    assert ood.two_way_nll(logits, torch.tensor([0, 1])).item() == pytest.approx(hand, rel=1e-5)
    assert ood.metric_key("accuracy", "scitail/") == "scitail/accuracy"
    assert ood.metric_key("accuracy", "_m") == "accuracy_m"


class FakeNLI(torch.nn.Module):
    """Predicts class (sum of the attended token ids) mod 3 with logits one-hot."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        return SimpleNamespace(logits=F.one_hot((input_ids * attention_mask).sum(-1) % 3, 3).float() + self.w)


def test_fake_model_scores_equal_hand_computation(tmp_path, nli_dirs):
    from adaptune.runner.evaluation import evaluate

    cfg = compose(ood_overrides(nli_dirs, "task.ood.split=test"))
    task = build_task(cfg.task, tmp_path, seed=1)
    task.setup()
    metrics = evaluate(task, FakeNLI(), "test")
    assert {f"{name}/accuracy" for name in SETS} <= set(metrics)
    for name, directory in nli_dirs.items():
        examples = load_set(name, str(directory), "test", "k")
        preds = [sum(task.tokenizer(ex.text_a, ex.text_b, truncation=True, max_length=32)["input_ids"]) % 3 for ex in examples]
        if name in ("scitail", "rte"):  # 2-way: neutral or contradiction -> not entailment
            scored = [0 if p == 0 else 1 for p in preds]
            e, o = math.e, 1.0
            nll = [
                -math.log((e if p == 0 else o) / (e + 2)) if ex.label == 0 else -math.log((e + 1 if p != 0 else 2) / (e + 2))
                for p, ex in zip(preds, examples)
            ]
        else:
            scored = preds
            nll = [-math.log((math.e if p == ex.label else 1.0) / (math.e + 2)) for p, ex in zip(preds, examples)]
        acc = sum(s == ex.label for s, ex in zip(scored, examples)) / len(examples)
        assert metrics[f"{name}/accuracy"] == pytest.approx(acc), name
        assert metrics[f"{name}/loss"] == pytest.approx(sum(nll) / len(nll), rel=1e-5), name
        assert metrics[f"{name}/pred_frac_contradiction"] == pytest.approx(preds.count(2) / len(preds))


# ------------------------------------------------------------------------------ errors
def test_missing_file_is_one_line_naming_dataset_and_key(tmp_path, nli_dirs):
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = compose(ood_overrides({**nli_dirs, "sick": empty}))
    task = build_task(cfg.task, tmp_path, seed=1)
    with pytest.raises(ConfigError) as err:
        task.setup()
    msg = str(err.value)
    assert "\n" not in msg and "SICK" in msg and "task.ood.data_dirs.sick" in msg and "SICK.zip" in msg, msg


def test_offline_without_a_directory_names_what_to_get(tmp_path, nli_dirs, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    dirs = {k: v for k, v in nli_dirs.items() if k != "scitail"}
    task = build_task(compose(ood_overrides(dirs)).task, tmp_path, seed=1)
    with pytest.raises(
        ConfigError,
        match=r"could not load SciTail 1.1 \(dev\) from the Hugging Face hub .*"
        r"SciTailV1.1.zip\) and set task.ood.data_dirs.scitail=/path/to/it",
    ):
        task.setup()


def test_ood_sets_need_a_three_way_training_set(tmp_path, nli_dirs):
    cfg = compose(ood_overrides(nli_dirs, "task.name=rte", f"task.data_dir={nli_dirs['rte']}"))
    with pytest.raises(ConfigError, match=r"task.ood.sets needs a 3-way NLI training set .*not task.name=rte"):
        build_task(cfg.task, tmp_path, seed=1)
    with pytest.raises(ConfigError, match=r"task.ood.sets must be distinct names among mnli, mnli_mm, snli"):
        build_task(compose(ood_overrides(nli_dirs, sets=["mnli", "hans"])).task, tmp_path, seed=1)


@pytest.mark.e2e
def test_cli_missing_data_prints_one_line(tmp_path, nli_dirs):
    args = [
        *ood_overrides({**nli_dirs, "snli": tmp_path / "nowhere"}),
        "trainer.max_steps=1",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    out = subprocess.run(
        [sys.executable, "-m", "adaptune", *args], check=False, cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("adaptune: error: task.ood.data_dirs.snli="), out.stderr
    assert "SNLI 1.0" in lines[0] and "snli_1.0.zip" in lines[0], out.stderr


# ------------------------------------------------------------------------------ end to end
@pytest.mark.parametrize("train_on", ["mnli", "snli"])
def test_tiny_run_writes_a_test_metric_per_set(tmp_path, nli_dirs, train_on):
    from adaptune.runner.checkpoint import load
    from adaptune.runner.loop import run

    extra = ["trainer.max_steps=6", "trainer.batch_size=8", "schedule.lr=5e-3", "task.train_subset=24"]
    if train_on == "snli":  # the preset's way: the training set's directory is its OOD entry
        extra += ["task.name=snli", f"task.data_dir={nli_dirs['snli']}"]
    cfg = compose(ood_overrides(nli_dirs, *extra))
    res = run(cfg, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["test"] == pytest.approx(res["test"])
    assert {f"{name}/accuracy" for name in SETS} <= set(saved["test"])
    assert saved["task_summary"]["train_examples"] == 24
    # recompute every set's accuracy from the saved final model, one example at a time
    task = build_task(cfg.task, tmp_path / "re", seed=cfg.seed)
    task.setup()
    model = task.build_model()
    model.load_state_dict(load(tmp_path / "run" / "checkpoints" / "last.pt")["model"])
    model.eval()
    for name, directory in nli_dirs.items():
        examples = load_set(name, str(directory), "dev", "k")
        correct = 0
        for ex in examples:
            enc = task.tokenizer(ex.text_a, ex.text_b, truncation=True, max_length=32, return_tensors="pt")
            with torch.no_grad():
                pred = int(model(**enc).logits.argmax(-1))
            correct += (min(pred, 1) if name in ("scitail", "rte") else pred) == ex.label
        assert saved["test"][f"{name}/accuracy"] == pytest.approx(correct / len(examples)), name


def test_preset_is_the_reference_setting(tmp_path):
    cfg = compose(["experiment=dps_out_of_domain", "task.ood.data_dirs.mnli=/data/MNLI"])
    assert cfg.task.name == "mnli" and cfg.task.train_subset == 8000 and cfg.trainer.max_steps == 1500
    assert list(cfg.task.ood.sets) == ["mnli", "mnli_mm", *SETS[1:]] and cfg.task.ood.split == "dev"
    assert cfg.task.data_dir == "/data/MNLI"
    assert cfg.task.model.name == "bert-large-cased" and cfg.schedule.lr == 2e-5
    assert cfg.trainer.batch_size == 16 and cfg.task.max_seq_length == 128 and cfg.trainer.precision == "fp16"
    assert cfg.schedule.warmup_ratio == 0.1 and cfg.schedule.weight_decay == 0.01
    snli = compose(["experiment=dps_out_of_domain", "task.name=snli", "task.ood.data_dirs.snli=/data/snli_1.0"])
    assert snli.task.data_dir == "/data/snli_1.0" and snli.trainer.max_steps == 1500


def test_report_shows_named_test_sets(tmp_path):
    from adaptune.runner.report import report

    values = {("baseline", 1): 0.5, ("baseline", 2): 0.7, ("dps", 1): 0.6, ("dps", 2): 0.9}
    for (sched, seed), v in values.items():
        d = tmp_path / f"schedule={sched},seed={seed}"
        d.mkdir()
        test = {"mnli/accuracy": v, "snli/accuracy": v / 2, "snli/loss": 1.0, "snli/pred_frac_neutral": 0.3}
        (d / "results.json").write_text(
            json.dumps(
                {
                    "status": "completed",
                    "degenerate": None,
                    "task": "glue",
                    "task_name": "mnli",
                    "schedule": sched,
                    "seed": seed,
                    "main_metric": "accuracy_m",
                    "greater_is_better": True,
                    "final": {"accuracy_m": v},
                    "best": {"accuracy_m": v},
                    "test": test,
                    "config": {
                        "task": {"kind": "glue", "name": "mnli", "selection_split": None},
                        "schedule": {"name": sched, "lr": 2e-5},
                        "seed": seed,
                    },
                }
            )
        )
    text, _ = report(tmp_path)
    assert "## Named test sets" in text
    assert "| schedule | mnli/accuracy | snli/accuracy | average |" in text
    assert "| baseline | 60.00 ± 14.14 (n=2) | 30.00 ± 7.07 (n=2) | 45.00 |" in text
    assert "| dps | 75.00 ± 21.21 (n=2) | 37.50 ± 10.61 (n=2) | 56.25 |" in text
    data = json.loads((tmp_path / "report.json").read_text())["named_test_sets"]
    assert data[0]["sets"]["snli/accuracy"]["dps"]["mean"] == pytest.approx(0.375)
    rows = (tmp_path / "report.csv").read_text().splitlines()
    assert any(r.startswith("dps,glue/mnli,snli/accuracy,0.375000") and ",test," in r for r in rows)


def test_mnli_mismatched_is_a_set_read_from_mnlis_directory(tmp_path, nli_dirs):
    """``mnli_mm`` reads dev_mismatched.tsv of the MNLI directory (task.ood.data_dirs.mnli, or
    task.data_dir when training on MNLI), not the matched file."""
    mm = nli_dirs["mnli"] / "dev_mismatched.tsv"
    mm.write_text(mm.read_text().replace("\tgov\t", "\tfiction\t"))
    rows = load_set("mnli_mm", str(nli_dirs["mnli"]), "test", "task.ood.data_dirs.mnli")
    matched = load_set("mnli", str(nli_dirs["mnli"]), "test", "task.ood.data_dirs.mnli")
    assert len(rows) == len(matched) == 12 and [ex.label for ex in rows[:3]] == [0, 1, 2]
    from adaptune.tasks import ood

    cfg = compose(ood_overrides(nli_dirs, sets=["mnli", "mnli_mm"])).task
    loaded = ood.load_sets(cfg.ood, "mnli", str(nli_dirs["mnli"]))
    assert [(suffix, len(ex)) for ex, suffix, _ in loaded] == [("mnli/", 12), ("mnli_mm/", 12)]


def test_scitail_dgem_format_is_read_first_and_gives_the_same_pairs(tmp_path, nli_dirs):
    """The reference's dgem_format files (a fourth column: the hypothesis graph) are preferred
    when present and read to the same (premise, hypothesis, label) examples."""
    root = nli_dirs["scitail"]
    plain = load_set("scitail", str(root), "test", "k")
    dgem = root / "dgem_format"
    dgem.mkdir()
    rows = [f"{ex.text_a}\t{ex.text_b}\t{'entails' if ex.label == 0 else 'neutral'}\t<graph {i}>" for i, ex in enumerate(plain)]
    (dgem / "scitail_1.0_structure_test.tsv").write_text("\n".join(rows[:-1]) + "\n")  # one row fewer
    from_dgem = load_set("scitail", str(root), "test", "k")
    assert from_dgem == plain[:-1]  # read from dgem_format (its own rows)
