"""``adaptune report`` on generated results.json files: per-schedule selection over a grid, paired
statistics against hand-computed values, degenerate and failed runs, the selection-split protocol."""

from __future__ import annotations

import csv
import json
import math

import pytest

from adaptune.runner import report


def write_run(
    root,
    schedule,
    seed,
    value,
    *,
    setting=None,
    task=("glue", "rte", "accuracy"),
    status="completed",
    degenerate=None,
    test=None,
    split=None,
    greater=True,
    evals=None,
    extra=(),
):
    """A run directory as a Hydra multirun leaves it: .hydra/overrides.yaml and results.json
    (``value`` None: a run without metrics; status None: no results.json at all)."""
    setting = setting or {}
    overrides = [f"schedule={schedule}", *[f"schedule.{k}={v}" for k, v in setting.items()], f"seed={seed}", *extra]
    run = root / ",".join(sorted(overrides))
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    config = {
        "seed": seed,
        "task": {"kind": task[0], "name": task[1], "selection_split": split},
        "schedule": {"name": schedule, "lr": float(setting.get("lr", 5e-5))},
    }
    if status is None:
        (run / ".hydra" / "config.yaml").write_text(json.dumps(config))
        return run
    metrics = {task[2]: value} if value is not None else {}
    res = {
        "status": status,
        "task": task[0],
        "task_name": task[1],
        "schedule": schedule,
        "seed": seed,
        "main_metric": task[2],
        "greater_is_better": greater,
        "final": metrics,
        "best": metrics,
        "test": {task[2]: test} if test is not None else None,
        "config": config,
        "evals": evals or [],
        "train_loss": [[1, 0.7], [2, 0.6]],
    }
    if degenerate:
        res["degenerate"] = degenerate
    (run / "results.json").write_text(json.dumps(res))
    return run


def run_report(root, *args):
    assert report.main([str(root), *args]) == 0
    return (root / "report.md").read_text(), json.loads((root / "report.json").read_text())


def main_rows(md):
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| schedule"))
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("| "):
            break
        rows[line.split("|")[1].strip()] = line
    return rows


def schedules(data, task=0):
    return {s["schedule"]: s for s in data["tasks"][task]["schedules"]}


def test_each_schedule_gets_its_best_setting_and_the_grid_is_shown(tmp_path):
    for lr, values in (("1e-5", (0.60, 0.62)), ("2e-5", (0.70, 0.72))):
        for seed, v in zip((1, 2), values):
            write_run(tmp_path, "baseline", seed, v, setting={"lr": lr})
    for lr, beta3, values in (
        ("1e-4", "0.75", (0.70, 0.74)),
        ("1e-4", "0.85", (0.76, 0.80)),
        ("2e-4", "0.75", (0.74, 0.76)),
        ("2e-4", "0.85", (0.50, 0.52)),
    ):
        for seed, v in zip((1, 2), values):
            write_run(tmp_path, "sage", seed, v, setting={"lr": lr, "beta3": beta3})
    md, data = run_report(tmp_path)
    rows = main_rows(md)
    assert list(rows) == ["baseline", "sage"]
    assert "| 71.00 ± 1.41 (n=2) |" in rows["baseline"]
    assert "| 78.00 ± 2.83 (n=2) |" in rows["sage"]
    sched = schedules(data)
    assert sched["baseline"]["selected"] == "lr=2e-5"
    assert sched["sage"]["selected"] == "beta3=0.85, lr=1e-4"
    assert sched["sage"]["selected_setting"] == {"schedule.beta3": 0.85, "schedule.lr": 1e-4}
    assert len(sched["sage"]["grid"]) == 4
    grid = md.split("## Grid")[1]
    assert "| glue/rte | sage | beta3=0.85, lr=1e-4 | 78.00 ± 2.83 (n=2) | 78.00 ± 2.83 (n=2) | ✓ |" in grid
    assert "| glue/rte | sage | beta3=0.85, lr=2e-4 | 51.00 ± 1.41 (n=2) | 51.00 ± 1.41 (n=2) |  |" in grid
    assert "## Selected settings" in md and "dev (final: selected and reported on dev)" in md
    # paired: sage (0.76, 0.80) − baseline (0.70, 0.72) = (+6, +8)
    (pair,) = data["tasks"][0]["paired"]
    assert pair["seeds"] == [1, 2] and pair["differences"] == pytest.approx([0.06, 0.08])


def test_failed_or_missing_seed_never_wins_selection(tmp_path):
    (tmp_path / "compare.json").write_text(
        json.dumps({"seeds": [1, 2], "grids": {"sage": {"schedule.lr": ["1e-4", "5e-4", "1e-3"]}}})
    )
    for seed in (1, 2):
        write_run(tmp_path, "baseline", seed, 0.70)
        write_run(tmp_path, "sage", seed, 0.75, setting={"lr": "1e-4"})
    write_run(tmp_path, "sage", 1, 0.95, setting={"lr": "5e-4"})  # the best mean ...
    write_run(tmp_path, "sage", 2, None, setting={"lr": "5e-4"}, status="failed")  # ... on one seed
    write_run(tmp_path, "sage", 1, 0.99, setting={"lr": "1e-3"})  # seed 2 never started
    md, data = run_report(tmp_path)
    sage = schedules(data)["sage"]
    assert sage["selected"] == "lr=1e-4"
    grid = {p["label"]: p for p in sage["grid"]}
    assert grid["lr=5e-4"]["failed"] == 1 and grid["lr=5e-4"]["selection"]["n"] == 1
    assert grid["lr=1e-3"]["missing_seeds"] == [2]
    table = md.split("## Grid")[1]
    assert "| glue/rte | sage | lr=5e-4 | 95.00 ± 0.00 (n=1, 1 failed) | 95.00 ± 0.00 (n=1, 1 failed) | not eligible |" in table
    assert "| glue/rte | sage | lr=1e-3 | 99.00 ± 0.00 (n=1, 1 missing) |" in table
    assert "schedule.lr=5e-4" in md.split("Incomplete runs")[1]
    assert "| 75.00 ± 0.00 (n=2) |" in main_rows(md)["sage"]


def test_no_complete_setting_falls_back_to_the_most_seeds_and_says_so(tmp_path):
    for seed in (1, 2, 3):
        write_run(tmp_path, "baseline", seed, 0.7)
    write_run(tmp_path, "sage", 1, 0.9, setting={"lr": "1e-4"})
    write_run(tmp_path, "sage", 1, 0.7, setting={"lr": "2e-4"})
    write_run(tmp_path, "sage", 2, 0.7, setting={"lr": "2e-4"})
    md, data = run_report(tmp_path)
    sage = schedules(data)["sage"]
    assert sage["selected"] == "lr=2e-4"
    assert sage["note"] == (
        "no setting has all 3 seeds: chosen among those with 2; lr=0.0002 is the grid's largest: "
        "widen the grid towards larger values (a 2-value grid cannot show an optimum)"
    )
    assert "| 70.00 ± 0.00 (n=2, 1 missing) |" in main_rows(md)["sage"]


def test_ties_go_to_the_lower_std_then_the_smaller_lr(tmp_path):
    write_run(tmp_path, "sage", 1, 0.6, setting={"lr": "1e-4"})
    write_run(tmp_path, "sage", 2, 0.8, setting={"lr": "1e-4"})  # mean 0.7, std 0.14
    for lr in ("3e-4", "2e-4"):  # mean 0.7, std 0
        write_run(tmp_path, "sage", 1, 0.7, setting={"lr": lr})
        write_run(tmp_path, "sage", 2, 0.7, setting={"lr": lr})
    _, data = run_report(tmp_path)
    sage = schedules(data)["sage"]
    assert sage["selected"] == "lr=2e-4"
    assert sage["note"].startswith("tied mean with 2 other setting(s)")


def test_lower_is_better_metrics_select_the_minimum(tmp_path):
    for lr, loss in (("1e-4", 2.5), ("2e-4", 1.5)):
        for seed in (1, 2):
            write_run(tmp_path, "sage", seed, loss, setting={"lr": lr}, task=("nmt", "demo", "loss"), greater=False)
    _, data = run_report(tmp_path)
    assert schedules(data)["sage"]["selected"] == "lr=2e-4"


# the Student t quantile for 2 degrees of freedom in closed form: F(t) = 1/2 + t / (2 sqrt(2 + t²))
T975_DF2 = 0.95 / math.sqrt((1 - 0.95**2) / 2)


def test_paired_statistics_by_hand():
    stats = report.paired([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    assert stats["mean"] == 2.0 and stats["sd"] == 1.0 and stats["n"] == 3
    half = T975_DF2 * 1.0 / math.sqrt(3)  # 4.3027 / 1.7321 = 2.4841
    assert stats["ci95"] == pytest.approx([2 - half, 2 + half])
    assert stats["ci95"] == pytest.approx([-0.4841, 4.4841], abs=1e-4)
    # t = 2 / (1 / sqrt 3) = sqrt 12; two-sided p = 1 - t / sqrt(2 + t²) = 1 - sqrt(6 / 7)
    assert stats["p_ttest_rel"] == pytest.approx(1 - math.sqrt(6 / 7))
    assert stats["p_wilcoxon"] is None  # n < 6
    assert (stats["wins"], stats["losses"], stats["ties"]) == (3, 0, 0)
    # six positive differences: the exact signed-rank p is 2 / 2**6
    six = report.paired([1, 2, 3, 4, 5, 6], [0] * 6)
    assert six["p_wilcoxon"] == pytest.approx(2 / 64)
    # a loss: lower is better, so a positive difference is a loss; zero differences are ties
    lower = report.paired([1.0, 0.0, -2.0], [0.0, 0.0, 0.0], greater=False)
    assert (lower["wins"], lower["losses"], lower["ties"]) == (1, 1, 1)
    same = report.paired([0.5, 0.5], [0.5, 0.5])
    assert same["p_ttest_rel"] == 1.0 and same["ci95"] == [0.0, 0.0]
    one = report.paired([1.0], [0.0])
    assert one["ci95"] is None and one["p_ttest_rel"] is None


def test_paired_statistics_in_the_report_files(tmp_path):
    task = ("nmt", "demo", "bleu")  # BLEU: not scaled, so differences are 1, 2, 3
    for seed, base, sage in ((1, 20.0, 21.0), (2, 22.0, 24.0), (3, 21.0, 24.0)):
        write_run(tmp_path, "baseline", seed, base, task=task)
        write_run(tmp_path, "sage", seed, sage, task=task)
    write_run(tmp_path, "sage", 4, 30.0, task=task)  # no baseline for seed 4: not paired
    md, data = run_report(tmp_path)
    (pair,) = data["tasks"][0]["paired"]
    assert pair["seeds"] == [1, 2, 3] and pair["differences"] == [1.0, 2.0, 3.0]
    assert pair["mean"] == 2.0 and pair["p_ttest_rel"] == pytest.approx(1 - math.sqrt(6 / 7))
    assert pair["schedule_values"] == [21.0, 24.0, 24.0] and pair["baseline_values"] == [20.0, 22.0, 21.0]
    row = next(line for line in md.splitlines() if "sage − baseline" in line)
    assert row == (
        "| nmt/demo | sage − baseline | 3 | +2.00 | [-0.48, 4.48] | 0.074 | — | 3/0/0 | 1: +1.00, 2: +2.00, 3: +3.00 |"
    )
    assert "Student t" in md and "scipy.stats.ttest_rel" in md
    with open(tmp_path / "report.csv") as f:
        rows = list(csv.DictReader(f))
    sage = next(r for r in rows if r["schedule"] == "sage" and r["metric"] == "bleu")
    assert sage["selected"] == "1" and sage["n"] == "4" and float(sage["diff_mean"]) == 2.0
    assert float(sage["diff_ci95_low"]) == pytest.approx(2 - T975_DF2 / math.sqrt(3), abs=1e-6)
    assert (sage["wins"], sage["losses"], sage["ties"]) == ("3", "0", "0")
    assert "## Grid" not in md  # one setting per schedule: no grid table


def test_degenerate_runs_are_averaged_in_counted_and_noted(tmp_path):
    task = ("glue", "cola", "matthews_corr")
    for seed in (1, 2, 3):
        write_run(tmp_path, "baseline", seed, 0.0, task=task, degenerate="predicts one class for every dev example")
        write_run(
            tmp_path, "sage", seed, 0.3 if seed < 3 else 0.0, task=task, degenerate="constant predictions" if seed == 3 else None
        )
    write_run(tmp_path, "dps", 1, 0.4, task=task)
    write_run(tmp_path, "dps", 2, 0.5, task=task)
    write_run(tmp_path, "dps", 3, None, task=task, status="diverged", degenerate="diverged: loss nan")
    md, data = run_report(tmp_path)
    rows = main_rows(md)
    assert "| 0.00 ± 0.00 (n=3, 3 degenerate) |" in rows["baseline"]
    assert "| 20.00 ± 17.32 (n=3, 1 degenerate) |" in rows["sage"]
    assert "| 45.00 ± 7.07 (n=2, 1 failed) |" in rows["dps"]
    note = md.split("## Degenerate runs")[1]
    assert md.rstrip().endswith(note.rstrip())  # the report ends with the note
    assert "glue/cola, baseline, seed 2: predicts one class for every dev example" in note
    assert "glue/cola, dps, seed 3: diverged: loss nan (diverged;" in note
    assert "lower the learning rate" in note and "train longer" in note
    assert len(data["degenerate"]) == 5
    assert {d["reason"] for d in data["degenerate"]} == {
        "predicts one class for every dev example",
        "constant predictions",
        "diverged: loss nan",
    }
    grid = schedules(data)["baseline"]["grid"][0]
    assert grid["degenerate"] == 3 and grid["reported"] == {"mean": 0.0, "std": 0.0, "n": 3}


def test_selection_split_selects_on_the_slice_and_reports_test(tmp_path):
    """Selecting on ``test`` would pick lr=2e-4 (official dev 0.91); the slice picks lr=1e-4."""
    for seed, sel, test in ((1, 0.80, 0.60), (2, 0.82, 0.62)):
        write_run(tmp_path, "sage", seed, sel, setting={"lr": "1e-4"}, test=test, split=0.1)
    for seed, sel, test in ((1, 0.70, 0.90), (2, 0.72, 0.92)):
        write_run(tmp_path, "sage", seed, sel, setting={"lr": "2e-4"}, test=test, split=0.1)
    for seed, sel, test in ((1, 0.75, 0.50), (2, 0.75, 0.55)):
        write_run(tmp_path, "baseline", seed, sel, test=test, split=0.1)
    md, data = run_report(tmp_path)
    task = data["tasks"][0]
    assert task["protocol"] == "selection_split" and task["selection_split"] == 0.1
    sage = schedules(data)["sage"]
    assert sage["selected"] == "lr=1e-4"
    chosen = next(p for p in sage["grid"] if p["selected"])
    assert chosen["selection"]["mean"] == pytest.approx(0.81)
    assert chosen["reported"]["mean"] == pytest.approx(0.61)
    assert main_rows(md)["sage"].startswith("| sage | 61.00 ± 1.41 (n=2) |")
    assert "glue/rte (accuracy) †" in md and "Selection-split protocol" in md
    assert "selection split (final on task.selection_split=0.1; reported: test = official dev)" in md
    (pair,) = task["paired"]
    assert pair["differences"] == pytest.approx([0.10, 0.07])  # test values: 0.60-0.50, 0.62-0.55
    with open(tmp_path / "report.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["schedule"] == "sage" and r["selected"] == "1"]
    assert {(r["block"], r["mean"]) for r in rows} == {("final", "0.810000"), ("test", "0.610000")}


def test_dev_curves_plot_the_selected_settings(tmp_path):
    for lr, top in (("1e-4", 0.6), ("2e-4", 0.8)):
        for seed in (1, 2):
            evals = [{"step": s, "accuracy": top * s / 30 + 0.01 * seed, "loss": 1.0} for s in (10, 20, 30)]
            write_run(tmp_path, "sage", seed, evals[-1]["accuracy"], setting={"lr": lr}, evals=evals)
            write_run(tmp_path, "baseline", seed, 0.5 + lr.startswith("2") * 0.1, setting={"lr": lr}, evals=evals[:2])
    assert report.main([str(tmp_path)]) == 0
    for name in ("dev_curves.png", "curves.png", "bars.png"):
        assert (tmp_path / name).stat().st_size > 1000, name


def test_runs_without_results_are_placed_and_listed(tmp_path):
    write_run(tmp_path, "baseline", 1, 0.7)
    write_run(tmp_path, "baseline", 2, 0.7)
    started = write_run(tmp_path, "sage", 1, None, status=None)  # .hydra only: killed early
    write_run(tmp_path, "sage", 2, 0.8)
    (tmp_path / "stray").mkdir()
    (tmp_path / "stray" / "results.json").write_text("{")
    md, data = run_report(tmp_path)
    assert "| 80.00 ± 0.00 (n=1, 1 failed) |" in main_rows(md)["sage"]
    incomplete = md.split("Incomplete runs")[1]
    assert f"{started} (no results.json)" in incomplete and "stray" in incomplete


def test_report_without_results_is_a_one_line_error(tmp_path, capsys):
    write_run(tmp_path, "sage", 1, None, status=None)
    assert report.main([str(tmp_path)]) == 2
    assert capsys.readouterr().out.strip() == f"adaptune report: error: no completed results.json under {tmp_path}"


def test_differences_equal_up_to_rounding_have_no_p_value():
    from adaptune.runner.report.stats import paired

    a, b = [0.755, 0.7383333333333333], [0.8016666666666666, 0.785]  # both differences ~ -0.0467
    out = paired(a, b)
    assert out["mean"] == pytest.approx(-0.04666666666666667) and out["p_ttest_rel"] is None
    assert out["losses"] == 2 and out["ci95"] == pytest.approx([out["mean"]] * 2, abs=1e-9)


# ------------------------------------------------------------------------------ honesty notes
def test_a_selection_on_a_grid_edge_says_which_way_to_widen(tmp_path):
    for lr, acc in (("1e-4", 0.70), ("2e-4", 0.80), ("4e-4", 0.75)):
        for seed in (1, 2):
            write_run(tmp_path, "sage", seed, acc + 0.01 * seed, setting={"lr": lr})
    for lr, acc in (("1e-5", 0.60), ("2e-5", 0.65), ("4e-5", 0.70)):
        for seed in (1, 2):
            write_run(tmp_path, "baseline", seed, acc + 0.01 * seed, setting={"lr": lr})
    _, data = run_report(tmp_path)
    groups = schedules(data)
    assert groups["sage"]["selected"] == "lr=2e-4" and groups["sage"]["note"] == ""  # inside the grid
    assert groups["baseline"]["selected"] == "lr=4e-5"
    assert groups["baseline"]["note"] == "lr=4e-05 is the grid's largest: widen the grid towards larger values"


def _with_floor(run_dir, floor):
    path = run_dir / "results.json"
    res = json.loads(path.read_text())
    res["task_summary"] = {"floor": floor}
    path.write_text(json.dumps(res))


def test_the_trivial_predictor_is_a_floor_row_and_cells_reaching_it_are_marked(tmp_path):
    """MRPC-like: a constant 'paraphrase' predictor scores F1 81.2; a schedule at 81.0 ± 0.5 is
    marked, one at 86 ± 0.5 is not."""
    for seed, (b, s) in enumerate(((0.805, 0.855), (0.815, 0.865)), 1):
        _with_floor(write_run(tmp_path, "baseline", seed, b, task=("glue", "mrpc", "f1")), {"f1": 0.812, "accuracy": 0.684})
        _with_floor(write_run(tmp_path, "sage", seed, s, task=("glue", "mrpc", "f1")), {"f1": 0.812, "accuracy": 0.684})
    md, _ = run_report(tmp_path)
    rows = main_rows(md)
    assert rows["trivial predictor (floor)"].startswith("| trivial predictor (floor) | 81.20 |")
    assert rows["baseline"].rstrip(" |").split("|")[2].strip().endswith("‡")
    assert "‡" not in rows["sage"]
    assert "‡ mean ± std reaches the trivial predictor's score" in md


def test_no_p_value_where_both_arms_are_degenerate_in_every_run(tmp_path):
    for seed in (1, 2, 3):
        write_run(tmp_path, "baseline", seed, 0.684, degenerate="predicts one class ('1') for every dev example")
        write_run(tmp_path, "sage", seed, 0.684, degenerate="predicts one class ('1') for every dev example")
    md, data = run_report(tmp_path)
    row = next(line for line in md.splitlines() if line.startswith("| glue/rte | sage − baseline"))
    assert "— (both arms degenerate)" in row and "1.000" not in row


def test_runs_csv_has_one_tidy_row_per_run_and_report_md_embeds_its_plots(tmp_path):
    import csv

    for seed in (1, 2):
        write_run(tmp_path, "baseline", seed, 0.70 + 0.01 * seed, setting={"lr": "2e-5"})
        write_run(tmp_path, "sage", seed, 0.80, setting={"lr": "1e-4"})
        write_run(tmp_path, "sage", seed, 0.60, setting={"lr": "2e-4"}, degenerate="predicts one class ('1')")
    md, _ = run_report(tmp_path)
    with open(tmp_path / "runs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6
    assert set(rows[0]) == {
        "directory",
        "task",
        "schedule",
        "seed",
        "schedule.lr",
        "main_metric",
        "final",
        "best",
        "best_step",
        "status",
        "degenerate",
    }
    sage = sorted((r["schedule.lr"], r["seed"], float(r["final"]), r["degenerate"]) for r in rows if r["schedule"] == "sage")
    assert sage == [
        ("0.0001", "1", 0.8, ""),
        ("0.0001", "2", 0.8, ""),
        ("0.0002", "1", 0.6, "predicts one class ('1')"),
        ("0.0002", "2", 0.6, "predicts one class ('1')"),
    ]
    for image in tmp_path.glob("*.png"):
        assert f"]({image.name})" in md
    assert list(tmp_path.glob("*.png")) and "## Plots" in md


def test_the_cross_task_average_has_a_bootstrap_interval_over_seeds(tmp_path):
    """Two tasks, three seeds each: the average column shows the mean over tasks of each task's
    mean and a 95% percentile-bootstrap interval (seeds resampled within each task) that equals
    scipy's on the same samples and contains the average; one task: no interval."""
    import numpy as np
    from scipy import stats

    rte, cola = [0.60, 0.64, 0.62], [0.50, 0.56, 0.53]
    for seed, (a, b) in enumerate(zip(rte, cola), 1):
        write_run(tmp_path / "rte", "baseline", seed, a)
        write_run(tmp_path / "cola", "baseline", seed, b, task=("glue", "cola", "accuracy"))
    md, _ = run_report(tmp_path)
    row = next(line for line in md.splitlines() if line.startswith("| baseline"))
    average = row.rstrip(" |").split("| ")[-1]
    mean = (np.mean(rte) + np.mean(cola)) / 2 * 100
    ci = stats.bootstrap(
        [np.array(rte) * 100, np.array(cola) * 100],
        lambda *s, axis=-1: np.mean([np.mean(x, axis=axis) for x in s], axis=0),
        n_resamples=9999,
        method="percentile",
        vectorized=True,
        random_state=np.random.default_rng(0),
    ).confidence_interval
    assert average == f"{mean:.2f} [{ci.low:.2f}, {ci.high:.2f}]"
    assert ci.low < mean < ci.high and ci.high - ci.low > 1.0
    assert "percentile bootstrap over seeds, resampled within each task" in md

    one = tmp_path / "one"
    for seed, a in enumerate(rte, 1):
        write_run(one, "baseline", seed, a)
    md, _ = run_report(one)
    row = next(line for line in md.splitlines() if line.startswith("| baseline"))
    assert "[" not in row.split("|")[-2]
