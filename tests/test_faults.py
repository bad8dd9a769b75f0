"""Faults beyond kill -9: a damaged checkpoint, a write that fails, two writers on one run
directory. Each is created for real (a truncated file, ``ulimit -f``, two processes) and must end
in at most a few lines, no traceback, nothing lost."""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import compose, glue_overrides, write_glue

from adaptune.common.errors import ConfigError
from adaptune.runner import checkpoint as ckpt
from adaptune.runner.lock import run_lock
from adaptune.runner.loop import run


def _over(data, *extra):
    return glue_overrides(data, "rte", "trainer.batch_size=8", "trainer.max_steps=6", "trainer.save_every=2",
                          "trainer.eval_every=3", "schedule.lr=5e-3", *extra)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _weights(run_dir: Path) -> dict:
    return ckpt.load(run_dir / "checkpoints" / ckpt.LAST)["model"]


def _cli(args, cwd, timeout=300, prefix=""):
    """``python -m adaptune ARGS`` (optionally after a shell ``prefix``, e.g. ulimit)."""
    cmd = f"{prefix} exec {shlex.quote(sys.executable)} -m adaptune {shlex.join(args)}"
    return subprocess.run(["bash", "-c", cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _no_traceback(out) -> None:
    assert "Traceback" not in out.stderr and "Traceback" not in out.stdout, out.stderr[-3000:]


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """An uninterrupted 6-step run: the reference every repaired run must equal
    (data, results, final weights, size of its last.pt)."""
    root = tmp_path_factory.mktemp("full")
    data = write_glue(root / "rte", "rte", n_train=48, n_dev=8)
    res = run(compose(_over(data)), root / "run")
    return data, res, _weights(root / "run"), (root / "run" / "checkpoints" / ckpt.LAST).stat().st_size


@pytest.mark.e2e
def test_previous_checkpoint_is_kept_and_last_is_the_newest(full, tmp_path):
    data, res, _, _ = full
    run_dir = tmp_path / "r"
    run(compose(_over(data)), run_dir)
    ckpts = run_dir / "checkpoints"
    assert ckpt.saved_step(ckpts / ckpt.LAST) == 6 and ckpt.saved_step(ckpts / ckpt.PREVIOUS) == 4
    assert not list(ckpts.glob(".*.tmp"))


def test_damaged_last_resumes_from_previous_and_ends_identical(full, tmp_path, caplog):
    data, res, weights, _ = full
    run_dir = tmp_path / "r"
    run(compose(_over(data)), run_dir)
    (run_dir / "results.json").unlink()               # as if stopped after its last checkpoint
    _truncate(run_dir / "checkpoints" / ckpt.LAST)     # an interrupted copy, a disk error
    with caplog.at_level("WARNING", logger="adaptune"):
        again = run(compose(_over(data)), run_dir)
    warnings = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(warnings) == 1 and "resuming from" in warnings[0] and "(step 4)" in warnings[0]
    assert (run_dir / "checkpoints" / "last.pt.damaged").is_file()   # kept for inspection
    assert again["final"] == res["final"] and again["steps"] == 6
    assert all(torch.equal(weights[k], v) for k, v in _weights(run_dir).items())


@pytest.mark.e2e
def test_no_intact_checkpoint_is_one_line_and_overwrites_nothing(full, tmp_path):
    data, _, _, _ = full
    run_dir = tmp_path / "r"
    run(compose(_over(data)), run_dir)
    (run_dir / "results.json").unlink()
    for name in (ckpt.LAST, ckpt.PREVIOUS):
        _truncate(run_dir / "checkpoints" / name)
    sizes = {p.name: p.stat().st_size for p in (run_dir / "checkpoints").iterdir()}
    with pytest.raises(ConfigError, match=r"last\.pt is damaged .* pass resume=false"):
        run(compose(_over(data)), run_dir)
    out = _cli([*_over(data), f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert out.returncode == 2
    _no_traceback(out)
    assert len(out.stderr.strip().splitlines()) == 1 and "resume=false" in out.stderr
    assert {p.name: p.stat().st_size for p in (run_dir / "checkpoints").iterdir()} == sizes
    again = run(compose(_over(data, "resume=false")), run_dir)   # the way out the message names
    assert again["status"] == "completed"


@pytest.mark.e2e
def test_a_failed_write_is_one_line_and_the_same_command_resumes(full, tmp_path):
    """``ulimit -f`` with SIGXFSZ ignored: ``write`` fails with EFBIG, as on a full disk. The
    limit lets best.pt (weights only) through and stops last.pt (weights + optimizer state)."""
    data, res, weights, _ = full
    run_dir = tmp_path / "r"
    args = [*_over(data), f"hydra.run.dir={run_dir}"]
    blocks = int(full[3] * 0.6) // 1024
    out = _cli(args, cwd=tmp_path, prefix=f"trap '' XFSZ; ulimit -f {blocks};")
    assert out.returncode == 74, out.stderr[-3000:]
    _no_traceback(out)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "could not write" in lines[0] and "last.pt" in lines[0] and "file too large" in lines[0]
    assert "run the same command again" in lines[0]
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))   # no torn or stray file
    again = _cli(args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    result = json.loads((run_dir / "results.json").read_text())
    assert result["final"] == res["final"] and result["steps"] == 6
    assert all(torch.equal(weights[k], v) for k, v in _weights(run_dir).items())


def test_write_failed_keeps_the_target_and_names_the_reason(tmp_path, monkeypatch):
    target = tmp_path / "x.json"
    ckpt.atomic_save_json({"a": 1}, target)

    def full_disk(*args, **kwargs):
        raise OSError(28, os.strerror(28))

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(ckpt.WriteFailed, match=r"could not write .*x\.json: no space left on the device"):
        ckpt.atomic_save_json({"a": 2}, target)
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


@pytest.mark.e2e
def test_second_writer_exits_at_once_naming_the_holder(tmp_path):
    data = write_glue(tmp_path / "rte", "rte", n_train=48, n_dev=8)
    run_dir = tmp_path / "r"
    args = [*glue_overrides(data, "rte", "trainer.batch_size=8", "trainer.max_steps=100000", "trainer.save_every=5",
                            "trainer.eval_every=100000"), f"hydra.run.dir={run_dir}"]
    first = subprocess.Popen([sys.executable, "-m", "adaptune", *args], cwd=tmp_path, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (run_dir / "checkpoints" / ckpt.LAST).is_file():
            assert first.poll() is None, first.stderr.read().decode()[-3000:]
            time.sleep(0.1)
        second = _cli(args, cwd=tmp_path, timeout=120)
        assert second.returncode == 75
        _no_traceback(second)
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"is in use by pid {first.pid} on " in lines[0], lines
        assert first.poll() is None   # the first one trains on
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    # kill -9 released the lock: the same command resumes at once (a short run this time)
    with run_lock(run_dir):
        pass


@pytest.mark.e2e
def test_a_locked_job_of_a_multirun_is_skipped_and_the_sweep_goes_on(tmp_path):
    data = write_glue(tmp_path / "rte", "rte", n_train=24, n_dev=8)
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "adaptune", "-m", *glue_overrides(data, "rte", "trainer.batch_size=8",
                                                                 "trainer.max_steps=2"),
           "seed=1,2", f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=seed${seed}"]
    with run_lock(sweep / "seed1"):   # another process holds job seed=1
        out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert "skipped:" in log and "seed1 is in use by pid" in log, log[-3000:]
    assert not (sweep / "seed1" / "results.json").exists()
    assert json.loads((sweep / "seed2" / "results.json").read_text())["status"] == "completed"


def _compare_spec(tmp_path, data):
    spec = tmp_path / "tiny.yaml"
    overrides = [o for o in glue_overrides(data, "rte", "trainer.batch_size=8", "trainer.max_steps=12",
                                           "trainer.save_every=2", "trainer.eval_every=6")]
    spec.write_text("seeds: [1, 2]\noverrides: [" + ", ".join(json.dumps(o) for o in overrides) + "]\n"
                    "grids:\n  baseline: {schedule.lr: [5e-3]}\n  sage: {schedule.lr: [1e-2]}\n")
    return spec


def _sweep_results(sweep: Path) -> dict:
    out = {}
    for path in sweep.glob("*/results.json"):
        res = json.loads(path.read_text())
        out[path.parent.name] = (res["status"], res["steps"], res["final"], res["best"], res["best_step"])
    return out


def _report_rows(sweep: Path) -> list[str]:
    """The report's table rows (numbers, selections), without its header lines that name the directory."""
    return [line for line in (sweep / "report.md").read_text().splitlines() if line.startswith("|")]


@pytest.mark.e2e
def test_an_interrupted_comparison_ends_as_an_uninterrupted_one(tmp_path):
    """``adaptune compare`` killed with kill -9 (the compare process, its multirun and the current
    run) and started again ends with exactly the runs and report of an uninterrupted comparison."""
    data = write_glue(tmp_path / "rte", "rte", n_train=48, n_dev=8)
    spec = _compare_spec(tmp_path, data)
    cmd = [sys.executable, "-m", "adaptune", "compare", str(spec)]
    full = subprocess.run([*cmd, f"hydra.sweep.dir={tmp_path / 'full'}"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=900)
    assert full.returncode == 0, full.stderr[-3000:]
    expected = _sweep_results(tmp_path / "full")
    assert len(expected) == 4

    sweep = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, f"hydra.sweep.dir={sweep}"], cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:   # kill when one run is finished and another is half-way (a checkpoint, no results yet)
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            done = list(sweep.glob("*/results.json"))
            started = [p for p in sweep.glob("*/checkpoints/last.pt") if not (p.parent.parent / "results.json").exists()]
            if done and started:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the comparison finished before it could be interrupted"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert 0 < len(list(sweep.glob("*/results.json"))) < 4

    again = subprocess.run([*cmd, f"hydra.sweep.dir={sweep}"], cwd=tmp_path, capture_output=True, text=True,
                           timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _sweep_results(sweep) == expected
    assert _report_rows(sweep) == _report_rows(tmp_path / "full")
