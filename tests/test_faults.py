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
    return glue_overrides(
        data,
        "rte",
        "trainer.batch_size=8",
        "trainer.max_steps=6",
        "trainer.save_every=2",
        "trainer.eval_every=3",
        "schedule.lr=5e-3",
        *extra,
    )


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
    (run_dir / "results.json").unlink()  # as if stopped after its last checkpoint
    _truncate(run_dir / "checkpoints" / ckpt.LAST)  # an interrupted copy, a disk error
    with caplog.at_level("WARNING", logger="adaptune"):
        again = run(compose(_over(data)), run_dir)
    warnings = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(warnings) == 1 and "resuming from" in warnings[0] and "(step 4)" in warnings[0]
    assert (run_dir / "checkpoints" / "last.pt.damaged").is_file()  # kept for inspection
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
    again = run(compose(_over(data, "resume=false")), run_dir)  # the way out the message names
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
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))  # no torn or stray file
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
    args = [
        *glue_overrides(
            data, "rte", "trainer.batch_size=8", "trainer.max_steps=100000", "trainer.save_every=5", "trainer.eval_every=100000"
        ),
        f"hydra.run.dir={run_dir}",
    ]
    first = subprocess.Popen(
        [sys.executable, "-m", "adaptune", *args],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
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
        assert first.poll() is None  # the first one trains on
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
    cmd = [
        sys.executable,
        "-m",
        "adaptune",
        "-m",
        *glue_overrides(data, "rte", "trainer.batch_size=8", "trainer.max_steps=2"),
        "seed=1,2",
        f"hydra.sweep.dir={sweep}",
        "hydra.sweep.subdir=seed${seed}",
    ]
    with run_lock(sweep / "seed1"):  # another process holds job seed=1
        out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert "skipped:" in log and "seed1 is in use by pid" in log, log[-3000:]
    assert not (sweep / "seed1" / "results.json").exists()
    assert json.loads((sweep / "seed2" / "results.json").read_text())["status"] == "completed"


def _compare_spec(tmp_path, data):
    spec = tmp_path / "tiny.yaml"
    overrides = [
        o
        for o in glue_overrides(
            data, "rte", "trainer.batch_size=8", "trainer.max_steps=12", "trainer.save_every=2", "trainer.eval_every=6"
        )
    ]
    spec.write_text(
        "seeds: [1, 2]\noverrides: [" + ", ".join(json.dumps(o) for o in overrides) + "]\n"
        "grids:\n  baseline: {schedule.lr: [5e-3]}\n  sage: {schedule.lr: [1e-2]}\n"
    )
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
    full = subprocess.run(
        [*cmd, f"hydra.sweep.dir={tmp_path / 'full'}"], cwd=tmp_path, capture_output=True, text=True, timeout=900
    )
    assert full.returncode == 0, full.stderr[-3000:]
    expected = _sweep_results(tmp_path / "full")
    assert len(expected) == 4

    sweep = tmp_path / "killed"
    proc = subprocess.Popen(
        [*cmd, f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:  # kill when one run is finished and another is half-way (a checkpoint, no results yet)
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

    again = subprocess.run([*cmd, f"hydra.sweep.dir={sweep}"], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _sweep_results(sweep) == expected
    assert _report_rows(sweep) == _report_rows(tmp_path / "full")


def _resumable(full, tmp_path, name="r"):
    """A finished copy of the reference run whose results.json is gone: the next run resumes."""
    data = full[0]
    run_dir = tmp_path / name
    run(compose(_over(data)), run_dir)
    (run_dir / "results.json").unlink()
    return data, run_dir


@pytest.mark.e2e
@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda d: d.pop("schedule"), r"written by another version of adaptune \(it has no schedule\)"),
        (lambda d: d["state"].update(momentum_window=[]), r"its training state has momentum_window"),
        (lambda d: d["model"].pop(next(iter(d["model"]))), r"does not fit the model .* task\.model\.\*"),
    ],
)
def test_a_checkpoint_of_another_version_is_one_line(full, tmp_path, edit, message):
    """A last.pt with a missing key, an unknown state field or missing weights: exit 2 with one
    line naming the file and the way out; nothing trained."""
    data, run_dir = _resumable(full, tmp_path)
    for name in (ckpt.LAST, ckpt.PREVIOUS):
        saved = ckpt.load(run_dir / "checkpoints" / name)
        edit(saved)
        torch.save(saved, run_dir / "checkpoints" / name)
    out = _cli([*_over(data), f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    _no_traceback(out)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "last.pt" in lines[0], lines
    import re

    assert re.search(message, lines[0]), lines[0]
    assert not (run_dir / "results.json").exists()


@pytest.mark.e2e
def test_changed_data_refuses_to_resume_and_the_same_bytes_resume(full, tmp_path):
    """A data file whose content changed since the checkpoint (one label flipped, same size): one
    line naming it; a file rewritten with the same bytes (new mtime) resumes to the same results."""
    data, res, weights, _ = full
    import shutil

    own = tmp_path / "rte"
    shutil.copytree(data, own)
    run_dir = tmp_path / "r"
    run(compose(_over(own)), run_dir)
    (run_dir / "results.json").unlink()
    train = own / "train.tsv"
    text = train.read_text()
    train.write_text(text)  # same bytes, new time: same data
    again = run(compose(_over(own)), run_dir)
    assert again["final"] == res["final"]
    (run_dir / "results.json").unlink()
    flipped = text.replace("\tentailment\n", "\tnot_entailment\n", 1)
    flipped = flipped.replace("\tnot_entailment\n", "\tentailment\n", 1) if flipped == text else flipped
    assert flipped != text
    train.write_text(flipped)
    out = _cli([*_over(own), f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert out.returncode == 2
    _no_traceback(out)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "the data changed since" in lines[0] and "train.tsv" in lines[0], lines
    assert "resume=false" in lines[0]


@pytest.mark.e2e
def test_a_fresh_start_drops_the_earlier_runs_best_and_export_refuses_a_foreign_best(full, tmp_path, monkeypatch):
    """resume=false in a used directory removes the old best.pt (a run stopped before its first
    evaluation must not export the old run's best); a best.pt from another model is one line from
    ``adaptune export``."""
    from adaptune.runner import callbacks

    data, run_dir = _resumable(full, tmp_path)
    best = run_dir / "checkpoints" / ckpt.BEST
    assert best.is_file()

    def stop(self, trainer):
        raise KeyboardInterrupt

    monkeypatch.setattr(callbacks.Evaluation, "evaluate", stop)
    with pytest.raises(KeyboardInterrupt):
        run(compose(_over(data, "resume=false")), run_dir)
    assert not best.is_file()
    monkeypatch.undo()
    foreign = ckpt.load(run_dir / "checkpoints" / ckpt.LAST)
    foreign["model"] = {k: v[..., :1].clone() if v.ndim else v for k, v in foreign["model"].items()}
    torch.save(foreign, best)
    out = subprocess.run(
        [sys.executable, "-m", "adaptune", "export", str(run_dir), str(tmp_path / "m")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    _no_traceback(out)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "best.pt does not fit the model" in lines[0], lines


@pytest.mark.e2e
def test_a_read_only_run_directory_is_one_line(full, tmp_path):
    """chmod a-w on the run directory: the first write fails with one line naming it (exit 74)."""
    if os.geteuid() == 0:
        pytest.skip("root writes through chmod a-w")
    data = full[0]
    run_dir = tmp_path / "ro"
    run_dir.mkdir()
    run_dir.chmod(0o555)
    try:
        out = _cli([*_over(data), f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    finally:
        run_dir.chmod(0o755)
    _no_traceback(out)
    assert out.returncode in (2, 74) and len(out.stderr.strip().splitlines()) == 1, out.stderr[-2000:]
    assert "permission denied" in out.stderr.lower()


@pytest.mark.e2e
def test_keep_previous_false_deletes_previous_once_complete_and_may_change_on_resume(full, tmp_path):
    data, res, weights, _ = full
    run_dir = tmp_path / "r"
    out = run(compose([*_over(data), "trainer.keep_previous=false"]), run_dir)
    ckpts = run_dir / "checkpoints"
    assert not (ckpts / ckpt.PREVIOUS).exists() and ckpt.saved_step(ckpts / ckpt.LAST) == 6
    assert out["final"] == res["final"] and all(torch.equal(weights[k], v) for k, v in _weights(run_dir).items())
    again = run(compose([*_over(data), "trainer.keep_previous=true"]), run_dir)  # harmless: the complete run is returned
    assert again["final"] == res["final"] and not (ckpts / ckpt.PREVIOUS).exists()
