"""Sweeps from the shell: resumable after kill -9, and the report recomputed from results files."""

from __future__ import annotations

import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import time

import pytest

from conftest import REPO, TINY_BERT, write_glue


def _sweep_cmd(data, sweep, *extra):
    return [
        sys.executable,
        "-m",
        "adaptune",
        "-m",
        "task=glue",
        "task.name=rte",
        f"task.data_dir={data}",
        *TINY_BERT,
        "logger=none",
        "trainer=cpu_fast",
        "trainer.progress=false",
        f"hydra.sweep.dir={sweep}",
        *extra,
    ]


@pytest.mark.e2e
def test_sweep_resumes_after_kill_9(tmp_path):
    data = write_glue(tmp_path / "rte", "rte", n_train=64, n_dev=8)
    sweep = tmp_path / "sweep"
    cmd = _sweep_cmd(data, sweep, "seed=1,2", "trainer.max_steps=30", "trainer.save_every=2", "trainer.batch_size=4")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    second_ckpt = None
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            ckpts = list(sweep.glob("seed=2*/checkpoints/last.pt"))
            if ckpts:
                second_ckpt = ckpts[0]
                break
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert second_ckpt is not None, "the sweep never reached its second job"
    first = next(sweep.glob("seed=1*/results.json"))
    assert not list(sweep.glob("seed=2*/results.json"))
    first_mtime = first.stat().st_mtime_ns

    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert first.stat().st_mtime_ns == first_mtime  # the finished job was skipped, not retrained
    log = (second_ckpt.parent.parent / "app.log").read_text()
    assert "resumed from" in log
    second = json.loads(next(sweep.glob("seed=2*/results.json")).read_text())
    assert second["steps"] == 30 and second["status"] == "completed"


@pytest.mark.e2e
@pytest.mark.parametrize("schedules", ["baseline,sage"])
def test_report_over_two_schedules_and_two_seeds(tmp_path, schedules):
    data = write_glue(tmp_path / "rte", "rte", n_train=24, n_dev=8)
    sweep = tmp_path / "sweep"
    out = subprocess.run(
        _sweep_cmd(data, sweep, f"schedule={schedules}", "seed=1,2", "trainer.max_steps=3"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    (sweep / "broken").mkdir()
    (sweep / "broken" / "results.json").write_text(json.dumps({"status": "running"}))
    rep = subprocess.run(
        [sys.executable, "-m", "adaptune", "report", str(sweep)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert rep.returncode == 0, rep.stderr
    results = [json.loads(p.read_text()) for p in sweep.glob("*/results.json")]
    results = [r for r in results if r.get("status") == "completed"]
    assert len(results) == 4
    md = (sweep / "report.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    for sched in schedules.split(","):
        accs = [r["final"]["accuracy"] for r in results if r["schedule"] == sched]
        mean, std = statistics.fmean(accs), statistics.stdev(accs)
        n_degenerate = sum(bool(r["degenerate"]) for r in results if r["schedule"] == sched)
        count = f"n=2, {n_degenerate} degenerate" if n_degenerate else "n=2"
        assert f"{100 * mean:.2f} ± {100 * std:.2f} ({count})" in rows[sched]
    assert "broken" in md.split("Incomplete runs")[1]
    csv_lines = (sweep / "report.csv").read_text().splitlines()
    assert csv_lines[0].startswith("schedule,task,metric,mean,std,n,setting,block,selected,")
    for plot in ("curves.png", "bars.png", "dev_curves.png"):
        assert (sweep / plot).stat().st_size > 1000, plot


def _fake_run(root, name, schedule, seed, acc, overrides, task=("glue", "rte", "accuracy")):
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (run / "results.json").write_text(
        json.dumps(
            {
                "status": "completed",
                "task": task[0],
                "task_name": task[1],
                "schedule": schedule,
                "seed": seed,
                "main_metric": task[2],
                "final": {task[2]: acc},
                "train_loss": [[1, 0.7], [2, 0.6]],
            }
        )
    )


def test_report_scales_fractions_but_not_bleu(tmp_path):
    from adaptune.runner import report

    _fake_run(tmp_path, "a", "baseline", 1, 0.81, ["seed=1"])
    _fake_run(tmp_path, "b", "baseline", 1, 4.9, ["seed=1"], task=("nmt", "de-en", "bleu"))
    assert report.main([str(tmp_path)]) == 0
    row = next(line for line in (tmp_path / "report.md").read_text().splitlines() if line.startswith("| baseline"))
    assert row == "| baseline | 81.00 ± 0.00 (n=1) | 4.90 ± 0.00 (n=1) | 42.95 |"


def test_report_splits_presets_that_share_schedule_and_task(tmp_path):
    from adaptune.runner import report

    for exp, acc in (("sage_a", 0.6), ("sage_b", 0.8)):
        _fake_run(tmp_path, exp, "sage", 1, acc, [f"experiment={exp}", "seed=1"])
    assert report.main([str(tmp_path)]) == 0
    rows = [line.split("|")[1].strip() for line in (tmp_path / "report.md").read_text().splitlines() if line.startswith("| sage")]
    assert rows == ["sage (sage_a)", "sage (sage_b)"]


def test_report_splits_by_every_varying_override_but_the_seed(tmp_path):
    """Low-resource sizes become columns and swept schedule settings a grid (each schedule shown at
    its selected setting); seeds are averaged, and overrides that are the same everywhere (or name
    the schedule/preset) split nothing."""
    from adaptune.runner import report

    for sched, lr in (("baseline", None), ("sage", "1e-4"), ("sage", "2e-4")):
        for n in (500, 1000):
            for seed, acc in ((1, 0.5), (2, 0.7)):
                extra = [f"schedule.lr={lr}"] if lr else []
                acc = acc + (0.1 if lr == "2e-4" else 0) + n / 1e5
                _fake_run(
                    tmp_path,
                    f"{sched}{lr}-{n}-{seed}",
                    sched,
                    seed,
                    acc,
                    [
                        "experiment=dps_glue",
                        f"schedule={sched}",
                        *extra,
                        f"task.train_subset={n}",
                        f"seed={seed}",
                        "name=x",
                        "task.max_seq_length=64",
                    ],
                )
    assert report.main([str(tmp_path)]) == 0
    lines = (tmp_path / "report.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| schedule"))
    assert lines[start] == (
        "| schedule | glue/rte [task.train_subset=500] (accuracy) | glue/rte [task.train_subset=1000] (accuracy) | average |"
    )
    rows = list(itertools.takewhile(lambda line: line.startswith("| "), lines[start + 2 :]))
    assert [r.split("|")[1].strip() for r in rows] == ["baseline", "sage"]
    # the average over the two columns, with its bootstrap interval over seeds
    assert "| 60.50 ± 14.14 (n=2) | 61.00 ± 14.14 (n=2) | 60.75 [" in rows[0]
    assert "| 70.50 ± 14.14 (n=2) | 71.00 ± 14.14 (n=2) | 70.75 [" in rows[1]  # sage at lr=2e-4
    data = json.loads((tmp_path / "report.json").read_text())
    selected = [(t["task"], s["schedule"], s["selected"]) for t in data["tasks"] for s in t["schedules"]]
    assert selected == [
        ("glue/rte [task.train_subset=500]", "baseline", "—"),
        ("glue/rte [task.train_subset=500]", "sage", "lr=2e-4"),
        ("glue/rte [task.train_subset=1000]", "baseline", "—"),
        ("glue/rte [task.train_subset=1000]", "sage", "lr=2e-4"),
    ]
    grid = [p["label"] for p in data["tasks"][0]["schedules"][1]["grid"]]
    assert grid == ["lr=1e-4", "lr=2e-4"]


@pytest.mark.e2e
@pytest.mark.parametrize(
    "backend",
    [
        ["seed=1,2", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
        ["seed=1,2", "hydra/launcher=submitit_local"],
    ],
    ids=["joblib", "submitit_local"],
)
def test_sweep_backends_run_every_job(tmp_path, backend):
    """(Hyper-parameter search is ``adaptune search``: tests/test_search.py.)"""
    data = write_glue(tmp_path / "rte", "rte", n_train=16, n_dev=8)
    sweep = tmp_path / "sweep"
    out = subprocess.run(
        _sweep_cmd(data, sweep, "trainer.max_steps=2", *backend), cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    results = [json.loads(p.read_text()) for p in sweep.rglob("results.json")]
    assert len(results) == 2 and all(r["status"] == "completed" for r in results)
    assert sorted(r["seed"] for r in results) == [1, 2]
