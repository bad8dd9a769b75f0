"""``adaptune analyze``: sensitivity maths on hand-built numbers, pruning, histograms, the cache, the
DPS selection record, the training-time sensitivity quantiles, and the command on a tiny sweep."""

from __future__ import annotations

import csv
import json
from types import SimpleNamespace

import pytest
import torch
from conftest import compose, glue_overrides, write_glue
from torch import nn

from adaptune.runner import analyze
from adaptune.runner.analyze import compute
from adaptune.runner.analyze import scores as S
from adaptune.runner.loop import run
from adaptune.runner.resume import config_diff
from adaptune.runner.sensitivity_log import SensitivityQuantiles
from adaptune.schedules.dps import DPS
from adaptune.tasks.base import StepLoss, Task


# ------------------------------------------------------------------------------ hand-built numbers
class LinearTask(Task):
    """loss of batch x = sum(W * x): the gradient is x, so the sensitivity is |W * x|."""

    kind = "hand"

    def __init__(self, xs):
        self.xs = xs

    def eval_batches(self, split):
        return list(range(len(self.xs)))

    def make_eval_batch(self, split, plan):
        return self.xs[plan]

    def loss(self, model, batch):
        return StepLoss((model.weight * batch).sum(), 1.0, 1)


def test_sensitivity_is_the_mean_of_per_batch_abs_theta_times_grad_and_orders_entries():
    model = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.0, -4.0]]))
    xs = [torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]), torch.tensor([[-3.0, 1.0, 0.0], [2.0, 5.0, 1.0]])]
    weights = {"weight": model.weight}
    sens, used = S.sensitivity(LinearTask(xs), model, weights, "dev", max_batches=5)
    expected = (model.weight.detach() * xs[0]).abs() / 2 + (model.weight.detach() * xs[1]).abs() / 2
    assert used == 2 and torch.equal(sens["weight"], expected)  # [[2, 2, 1.5], [0.75, 0, 4]]
    # not |θ ⊙ mean g|: entry (0, 0) has gradients 1 and -3, mean -1, but sensitivity (1 + 3) / 2
    assert sens["weight"][0, 0] == 2.0
    order = S.prune_orders(sens, "layer")["weight"].tolist()
    assert order == [4, 3, 2, 0, 1, 5]  # 0, 0.75, 1.5, 2, 2 (a tie: by position), 4
    assert S.sensitivity(LinearTask(xs), model, weights, "dev", max_batches=1)[1] == 1


def test_pruning_zeroes_the_lowest_entries_per_layer_or_globally():
    a, b = torch.arange(1.0, 7.0).reshape(2, 3), torch.tensor([[10.0, 0.5], [20.0, 30.0]])
    weights = {"a": a.clone(), "b": b.clone()}
    scores = S.magnitude(weights)
    assert S.apply_pruning(weights, S.prune_orders(scores, "layer"), 0.5) == 5  # 3 of a + 2 of b
    assert weights["a"].tolist() == [[0, 0, 0], [4, 5, 6]] and weights["b"].tolist() == [[0, 0], [20, 30]]
    weights = {"a": a.clone(), "b": b.clone()}
    assert S.apply_pruning(weights, S.prune_orders(scores, "global"), 0.4) == 4  # 0.5, 1, 2, 3
    assert weights["a"].tolist() == [[0, 0, 0], [4, 5, 6]] and weights["b"].tolist() == [[10, 0], [20, 30]]
    one = {"a": a.clone()}
    S.apply_pruning(one, S.prune_orders(S.magnitude(one), "layer"), 1.0)
    assert torch.count_nonzero(one["a"]) == 0  # 100% of a layer


def test_histogram_counts_every_entry_and_its_fractions():
    values = torch.cat([torch.zeros(7), torch.full((5,), 1e-20), torch.full((3,), 1e9), torch.logspace(-12, 2, 985)])
    counts = S.histogram(values)
    assert len(counts) == S.N_BINS + 2 and sum(counts) == values.numel() == 1000
    assert counts[0] == 12 and counts[-1] == 3  # zeros and underflow; overflow
    assert S.fraction_below(counts, 1e-3) == pytest.approx((12 + 985 * 9 / 14) / 1000, abs=0.01)
    assert S.layer_of("bert.encoder.layer.3.attention.self.key.weight") == ("enc 3", "key")
    assert S.layer_of("bert.encoder.layer.3.output.dense.weight") == ("enc 3", "ffn-out")
    assert S.layer_of("decoder.layers.1.encoder_attn.v_proj.weight") == ("dec 1", "x-value")
    assert S.layer_of("blocks.2.attn.qkv.weight") == ("2", "qkv")
    assert S.layer_of("odd.thing.weight") == ("-", "odd.thing")


# ------------------------------------------------------------------------------ DPS selection record
def test_dps_counts_and_overlaps_in_the_state_dict():
    w = nn.Parameter(torch.ones(2, 2))
    dps = DPS([("layer.weight", w)], total_steps=8, p=0.5, update_ratio=0.125)  # U = 1: odd steps explore
    grads = {1: [[4.0, 3.0], [2.0, 1.0]], 3: [[4.0, 1.0], [3.0, 2.0]], 5: [[1.0, 2.0], [3.0, 4.0]]}
    for step in range(1, 7):
        w.grad = torch.tensor(grads.get(step, [[1.0, 1.0], [1.0, 1.0]]))
        dps.on_step_begin(step)
        dps.on_gradients(step)
    state = dps.state_dict()
    # masks: step 2 keeps the top row, step 4 the left column, step 6 the bottom row
    assert state["selected"]["layer.weight"].dtype == torch.uint8
    assert state["selected"]["layer.weight"].tolist() == [[2, 1], [2, 1]]
    assert state["selections"] == 3 and state["overlaps"] == [0.5, 0.5]
    other = DPS([("layer.weight", nn.Parameter(torch.ones(2, 2)))], total_steps=8, p=0.5, update_ratio=0.125)
    other.load_state_dict(state)
    assert other.selected[0].tolist() == [[2, 1], [2, 1]] and other.overlaps == [0.5, 0.5]
    old = {k: v for k, v in state.items() if k not in ("selected", "prev_masks", "selections", "overlaps")}
    other.load_state_dict(old)  # a checkpoint from before the record: starts empty
    assert other.selections == 0 and other.selected == [None]
    many = DPS([("layer.weight", nn.Parameter(torch.ones(2, 2)))], total_steps=2000, p=0.5, update_ratio=0.001)
    assert many.count_dtype == torch.int16  # up to 1000 selection phases


# ------------------------------------------------------------------------------ training-time quantiles
class Recorder:
    def __init__(self):
        self.logged = []

    def log(self, metrics, step):
        self.logged.append((step, dict(metrics)))


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 2)


def test_sensitivity_quantiles_are_logged_every_n_steps_without_touching_the_rng():
    torch.manual_seed(0)  # the weights and gradients below: the same values whatever ran before
    model = TwoLayers()
    trainer = SimpleNamespace(model=model, patterns={"sage": ("fc",)}, dist=SimpleNamespace(is_main=True), logger=Recorder())
    cb = SensitivityQuantiles(every=5, sample=64)
    rng = torch.get_rng_state()
    cb.on_fit_start(trainer)
    assert torch.equal(rng, torch.get_rng_state()) and cb.labels == ["ffn-in", "ffn-out"]
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    cb.on_gradients(trainer, 4)
    assert trainer.logger.logged == []
    cb.on_gradients(trainer, 5)
    step, metrics = trainer.logger.logged[0]
    w = model.fc1.weight.detach()
    sampled = (w.reshape(-1)[cb.index[0]] * model.fc1.weight.grad.reshape(-1)[cb.index[0]]).abs()
    assert step == 5 and metrics["sens/ffn-in/q50"] == pytest.approx(float(sampled.median().item()), rel=0.1)
    assert metrics["sens/ffn-in/q50"] == pytest.approx(float(torch.quantile(sampled, 0.5)), rel=1e-6)
    assert set(metrics) == {f"sens/{n}/q{q}" for n in ("all", "ffn-in", "ffn-out") for q in (10, 50, 90)}


def test_the_sensitivity_callback_never_blocks_a_resume():
    sens = {"_target_": "adaptune.runner.sensitivity_log.SensitivityQuantiles", "every": 20, "sample": 1024}
    base = {"seed": 1, "callbacks": {"logging": {"_target_": "adaptune.runner.callbacks.Logging", "every": 5}}}
    new = {"seed": 1, "callbacks": {**base["callbacks"], "sensitivity": sens}}
    assert config_diff(new, base) == [] and config_diff(base, new) == []
    assert config_diff({"seed": 1, "callbacks": {**base["callbacks"], "sensitivity": {**sens, "every": 5}}}, new) == []


# ------------------------------------------------------------------------------ a tiny sweep
@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Two baseline seeds and a DPS run (U = 1 step; sensitivity quantiles every 2 steps) of a 2-layer
    BERT, 8 steps each."""
    root = tmp_path_factory.mktemp("sweep")
    data = write_glue(root.parent / "rte_data", "rte", n_train=48, n_dev=16)
    dps_extra = ["schedule.update_ratio=0.125", "callbacks.sensitivity.every=2"]
    for sched, seed, extra in (("baseline", 1, []), ("baseline", 2, []), ("dps", 1, dps_extra)):
        over = glue_overrides(
            data,
            "rte",
            f"schedule={sched}",
            f"seed={seed}",
            "trainer.max_steps=8",
            "trainer.batch_size=8",
            "trainer.eval_every=4",
            "schedule.lr=1e-3",
            "trainer.num_threads=1",
            *extra,
        )
        run(compose(over), root / f"{sched}_{seed}")
    return root


@pytest.mark.e2e
def test_analyze_end_to_end_and_cache(sweep, monkeypatch):
    assert analyze.main([str(sweep), "--sparsities", "0,50,90", "--max-batches", "2", "--no-progress"]) == 0
    out = sweep / "analysis"
    for name in (
        "analysis.md",
        "sensitivity_hist.png",
        "sensitivity_hist.csv",
        "sensitivity_below.csv",
        "pruning.png",
        "pruning.csv",
        "layers.png",
        "layers.csv",
        "dps_selection.png",
        "dps_selection.csv",
        "dps_overlap.csv",
    ):
        assert (out / name).is_file(), name
    md = (out / "analysis.md").read_text()
    assert "![pruning](pruning.png)" in md and "| dps | 1 | 4 |" in md
    # pruning at 0% is the run's best dev evaluation, to the last bit
    for run_dir in sorted(sweep.glob("*_*")):
        results = json.loads((run_dir / "results.json").read_text())
        dense = json.loads((out / "cache" / run_dir.name / "dense.json").read_text())
        assert dense["metrics"] == results["best"] and dense["main_metric"] == "accuracy"
    # every entry is in the histogram, once
    entries = {}
    with open(out / "layers.csv") as f:
        for row in csv.DictReader(f):
            entries[row["seed"], row["schedule"]] = entries.get((row["seed"], row["schedule"]), 0) + int(row["entries"])
    with open(out / "sensitivity_hist.csv") as f:
        counted = {}
        for row in csv.DictReader(f):
            counted[row["seed"], row["schedule"]] = counted.get((row["seed"], row["schedule"]), 0) + int(row["count"])
    assert counted == entries and len(entries) == 3
    with open(out / "pruning.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 2 * 3  # runs x criteria x sparsities
    # a re-run with everything cached builds no model; a new sparsity computes only its points
    built = []
    real = compute.rebuild

    def counting(*args, **kw):
        built.append(args[0].key)
        return real(*args, **kw)

    monkeypatch.setattr(compute, "rebuild", counting)
    assert analyze.main([str(sweep), "--sparsities", "0,50,90", "--max-batches", "2", "--no-progress"]) == 0
    assert built == []
    evaluated, real_save = [], compute.RunAnalysis._save

    def recording(self, name, value):
        evaluated.append(name)
        real_save(self, name, value)

    monkeypatch.setattr(compute.RunAnalysis, "_save", recording)
    assert (
        analyze.main([str(sweep), "--sparsities", "0,30", "--max-batches", "2", "--criteria", "magnitude", "--no-progress"]) == 0
    )
    assert sorted(built) == ["baseline_1", "baseline_2", "dps_1"] and evaluated == ["prune_magnitude_30"] * 3


def test_user_mistakes_are_one_line_errors(tmp_path, capsys, sweep):
    (tmp_path / "empty").mkdir()
    assert analyze.main([str(tmp_path / "empty")]) == 2
    assert capsys.readouterr().out.strip() == (
        f"adaptune analyze: error: no run with a checkpoint (checkpoints/best.pt or last.pt) under {tmp_path / 'empty'}"
    )
    assert analyze.main([str(sweep), "--sparsities", "10,200"]) == 2
    assert "each value must be a percentage in [0, 100]" in capsys.readouterr().out
    assert analyze.main([str(sweep), "--criteria", "random"]) == 2
    assert "'random' is unknown; allowed: sensitivity, magnitude" in capsys.readouterr().out
