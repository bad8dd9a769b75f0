"""``adaptune search``: spec validation, the persistent study, exactly n_trials COMPLETE trials after
an interruption, a dead worker or with two workers on one storage, and each trial's value (training
replaced by generated results.json, except in the one end-to-end search)."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, TINY_BERT, write_glue

from adaptune.runner import search

optuna = pytest.importorskip("optuna")
from optuna.trial import TrialState  # noqa: E402

SPEC = """\
schedule: sage
seeds: [1, 2]
overrides: [task=glue, task.name=rte, task.selection_split=8]
params:
  schedule.lr: {low: 1e-4, high: 1e-2, log: true}
  schedule.beta3: {low: 0.6, high: 0.9}
n_trials: 3
sampler_seed: 7
startup_trials: 2
"""


def spec_file(tmp_path, text=SPEC, name="mine"):
    path = tmp_path / "specs" / f"{name}.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return str(path)


def args_of(cmd):
    """{key: value} of a trial command's overrides (after ``python -m adaptune -m``)."""
    assert cmd[1:4] == ["-m", "adaptune", "-m"]
    return dict(item.split("=", 1) for item in cmd[4:])


def selection_acc(lr: float, seed: int) -> float:
    """The fake runs' selection-slice accuracy: best at lr=1e-3, seeds 1 and 2 differ by 0.02."""
    return 0.9 - 0.1 * abs(math.log10(lr) + 3) + 0.01 * seed


def write_result(run_dir: Path, ov: dict, seed: int, status="completed", acc=None, degenerate=None):
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    keep = {k: v for k, v in ov.items() if not k.startswith("hydra") and k != "seed"}
    (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {k}={v}\n" for k, v in {**keep, "seed": seed}.items()))
    lr = float(ov["schedule.lr"])
    acc = selection_acc(lr, seed) if acc is None else acc
    res = {
        "status": status,
        "degenerate": degenerate,
        "task": "glue",
        "task_name": "rte",
        "schedule": "sage",
        "seed": seed,
        "main_metric": "accuracy",
        "greater_is_better": True,
        "final": {"accuracy": acc},
        "best": {"accuracy": acc},
        "test": {"accuracy": 0.5},  # test: never read
        "config": {
            "seed": seed,
            "task": {"kind": "glue", "name": "rte", "selection_split": 8},
            "schedule": {"name": "sage", "lr": lr},
        },
        "train_loss": [[1, 0.7], [2, 0.6]],
        "evals": [],
    }
    (run_dir / "results.json").write_text(json.dumps(res))


class FakeRuns:
    """Stands in for ``search.launch``: writes each seed's run as the multirun would (``trial_dir/seed_S``),
    skipping seeds already finished (resume=auto); ``hook(call_index, ov, seed)`` may raise or return a
    status ('skip' = no results.json, 'diverged')."""

    def __init__(self, hook=None):
        self.calls, self.hook = [], hook

    def __call__(self, cmd, log):
        ov = args_of(cmd)
        index = len(self.calls)
        self.calls.append(ov)
        log.parent.mkdir(parents=True, exist_ok=True)
        for seed in map(int, ov["seed"].split(",")):
            run_dir = Path(ov["hydra.sweep.dir"]) / f"seed_{seed}"
            if (run_dir / "results.json").is_file():
                continue
            status = self.hook(index, ov, seed) if self.hook else None
            if status == "skip":
                continue
            if status == "diverged":
                write_result(run_dir, ov, seed, status="diverged", degenerate="diverged: loss became nan at step 2")
            else:
                write_result(run_dir, ov, seed)
        return 0


@pytest.fixture
def fake(monkeypatch):
    def install(hook=None):
        runs = FakeRuns(hook)
        monkeypatch.setattr(search, "launch", runs)
        return runs

    return install


def trials(url, study="mine"):
    return optuna.load_study(study_name=study, storage=url).get_trials(deepcopy=False)


def states(url, study="mine"):
    return sorted(t.state.name for t in trials(url, study))


# ----------------------------------------------------------------------------------- the spec
def test_dry_run_prints_storage_study_and_first_command(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert search.main(["quickstart_sage", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:4] == [
        "storage: sqlite:///outputs/search/quickstart_sage/study.db",
        "study: quickstart_sage",
        "sweep: outputs/search/quickstart_sage",
        "n_trials: 6",
    ]
    assert lines[4].startswith(
        f"first trial: {sys.executable} -m adaptune -m experiment=quickstart schedule=sage schedule.beta3="
    )
    ov = args_of(lines[4].removeprefix("first trial: ").replace("'", "").split())
    assert ov["seed"] == "1,2" and ov["name"] == "quickstart_sage" and ov["task.selection_split"] == "400"
    assert ov["hydra.sweep.dir"] == "outputs/search/quickstart_sage/trial_000"
    assert 1e-4 <= float(ov["schedule.lr"]) <= 1e-3 and 0.6 <= float(ov["schedule.beta3"]) <= 0.9
    assert list(tmp_path.iterdir()) == []  # a dry run writes nothing (no study.db)


def test_unknown_preset_is_a_one_line_error_from_the_command():
    out = subprocess.run(
        [sys.executable, "-m", "adaptune", "search", "nope"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.splitlines() == [
        "adaptune search: error: conf/search/nope.yaml does not exist; allowed names: quickstart_sage "
        "(or the path of a YAML file)"
    ]


@pytest.mark.parametrize(
    "change,message",
    [
        (
            ("n_trials: 3", "n_trials: 3\nlr: 1"),
            "unknown key 'lr'; allowed: experiment, schedule, seeds, overrides, params, n_trials, sampler_seed, "
            "startup_trials, direction",
        ),
        (
            ("schedule: sage", "schedule: adam"),
            "schedule=adam is unknown; allowed: baseline, childtuning_d, childtuning_f, dps, dps_mix, mixout, sage",
        ),
        (("seeds: [1, 2]", "seeds: [1, 1]"), "seeds: expected a non-empty list of distinct integers, got [1, 1]"),
        (
            ("low: 0.6, high: 0.9", "low: 0.9, high: 0.6"),
            "params.schedule.beta3: expected numbers low < high, got low=0.9, high=0.6",
        ),
        (
            ("low: 1e-4, high: 1e-2, log: true", "low: 0, high: 1e-2, log: true"),
            "params.schedule.lr: log: true needs low > 0, got low=0",
        ),
        (
            ("low: 0.6, high: 0.9", "low: 0.6, high: 0.9, step: 0.1"),
            "params.schedule.beta3: unknown key 'step'; allowed: low, high, log, choices",
        ),
        (
            ("{low: 0.6, high: 0.9}", "{choices: []}"),
            "params.schedule.beta3: choices: expected a non-empty list of distinct numbers, booleans or plain words, got []",
        ),
        (("schedule.beta3:", "seed:"), "params.seed: not a searchable key"),
        (
            ("task.selection_split=8]", "task.selection_split=8, schedule.lr=1e-3]"),
            "overrides: schedule.lr is searched (params); drop it from overrides",
        ),
        (("task.selection_split=8]", "task.selection_split=8, seed=3]"), "overrides: seed is set by adaptune search"),
        (("n_trials: 3", "n_trials: 0"), "n_trials: expected a positive integer, got 0"),
        (("n_trials: 3", "n_trials: 3\ndirection: up"), "direction=up is unknown; allowed: maximize, minimize"),
        (("sampler_seed: 7", "sampler_seed: x"), "sampler_seed: expected a non-negative integer or null, got 'x'"),
    ],
)
def test_bad_spec_is_a_one_line_error_naming_the_key(tmp_path, capsys, change, message):
    path = spec_file(tmp_path, SPEC.replace(*change))
    assert search.main([path, "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1
    assert captured.err.startswith(f"adaptune search: error: {path}: {message}"), captured.err


def test_a_config_that_does_not_compose_is_a_one_line_error(tmp_path, capsys):
    path = spec_file(tmp_path, SPEC.replace("schedule.beta3:", "schedule.nope:"))
    assert search.main([path, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("adaptune search: error: ") and "nope" in err


@pytest.mark.parametrize(
    "url,message",
    [
        ("nonsense", "--storage nonsense is not a database URL (sqlite:///PATH.db, postgresql://..., mysql://...)"),
        (
            "postgresql://me@localhost:1/optuna",
            "storage postgresql://me@localhost:1/optuna needs a database driver for postgresql",
        ),
    ],
)
def test_a_bad_storage_is_a_one_line_error(tmp_path, monkeypatch, capsys, url, message):
    monkeypatch.chdir(tmp_path)
    assert search.main([spec_file(tmp_path), "--storage", url]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(f"adaptune search: error: {message}")


def test_without_selection_split_the_search_is_refused_unless_dev_selection_is_allowed(tmp_path, monkeypatch, capsys, fake):
    monkeypatch.chdir(tmp_path)
    path = spec_file(tmp_path, SPEC.replace(", task.selection_split=8", "").replace("n_trials: 3", "n_trials: 1"))
    assert search.main([path]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "have no task.selection_split" in err[0] and "--allow-dev-selection" in err[0]
    assert not (tmp_path / "outputs").exists()
    fake()
    assert search.main([path, "--allow-dev-selection"]) == 0
    assert "selecting on the dev set" in capsys.readouterr().out
    data = json.loads((tmp_path / "outputs" / "search" / "mine" / "search.json").read_text())
    assert data["selection"].endswith("the dev set (--allow-dev-selection)")


# ---------------------------------------------------------------------------- values and storage
def test_value_is_the_mean_over_seeds_of_the_selection_metric_and_the_study_persists(tmp_path, monkeypatch, capsys, fake):
    monkeypatch.chdir(tmp_path)
    runs = fake()
    assert search.main([spec_file(tmp_path)]) == 0
    sweep = Path("outputs/search/mine")
    db = tmp_path / sweep / "study.db"
    assert db.is_file()
    url = f"sqlite:///{db}"  # a new connection: the file holds it all
    done = trials(url)
    assert [t.state for t in done] == [TrialState.COMPLETE] * 3
    assert len(runs.calls) == 3
    for t, ov in zip(done, runs.calls):
        lr = float(ov["schedule.lr"])
        assert ov["schedule.lr"] == search.fmt(t.params["schedule.lr"])
        per_seed = {"1": selection_acc(lr, 1), "2": selection_acc(lr, 2)}
        assert t.user_attrs["per_seed"] == pytest.approx(per_seed)
        assert t.value == pytest.approx(statistics.fmean(per_seed.values()))  # not the test value 0.5
        assert t.user_attrs["metric"] == "accuracy"
        assert t.user_attrs["trial_dir"] == str(sweep / f"trial_{t.number:03d}")
        assert t.user_attrs["run_dirs"] == [str(sweep / f"trial_{t.number:03d}" / f"seed_{s}") for s in (1, 2)]
        assert ov["seed"] == "1,2" and ov["hydra.sweep.subdir"] == "seed_${seed}" and ov["name"] == "mine"
    top = max(done, key=lambda t: t.value)
    data = json.loads((sweep / "search.json").read_text())
    assert data["storage"] == f"sqlite:///{sweep / 'study.db'}" and data["study"] == "mine"
    assert data["trials"]["COMPLETE"] == 3 and data["best"]["number"] == top.number
    assert data["best"]["value"] == pytest.approx(top.value) and data["best"]["params"] == top.params
    out = capsys.readouterr().out
    assert "trial 3 of 3 (#2): " in out and f"optuna-dashboard sqlite:///{sweep / 'study.db'}" in out
    # the same command again: the study is complete, nothing runs
    assert search.main([spec_file(tmp_path)]) == 0
    assert len(runs.calls) == 3 and len(trials(url)) == 3
    # raising n_trials searches on in the same study
    assert search.main([spec_file(tmp_path, SPEC.replace("n_trials: 3", "n_trials: 4"))]) == 0
    assert states(url) == ["COMPLETE"] * 4


def test_the_report_reads_the_trials_as_grid_points(tmp_path, monkeypatch, fake):
    from adaptune.runner import report

    monkeypatch.chdir(tmp_path)
    fake()
    assert search.main([spec_file(tmp_path)]) == 0
    sweep = tmp_path / "outputs" / "search" / "mine"
    assert report.main([str(sweep)]) == 0
    data = json.loads((sweep / "report.json").read_text())
    (sched,) = data["tasks"][0]["schedules"]
    assert len(sched["grid"]) == 3
    best = json.loads((sweep / "search.json").read_text())["best"]["params"]  # the report selects the same trial
    assert sched["selected"] == f"beta3={search.fmt(best['schedule.beta3'])}, lr={search.fmt(best['schedule.lr'])}"


def test_a_study_with_another_objective_is_refused(tmp_path, monkeypatch, capsys, fake):
    monkeypatch.chdir(tmp_path)
    fake()
    assert search.main([spec_file(tmp_path)]) == 0
    capsys.readouterr()
    assert search.main([spec_file(tmp_path, SPEC.replace("seeds: [1, 2]", "seeds: [1, 2, 3]"))]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "searches another objective (seeds differ" in err[0]
    assert search.main([spec_file(tmp_path), "trainer.max_steps=5"]) == 2  # changes training
    assert "searches another objective (extra differ" in capsys.readouterr().err
    assert search.main([spec_file(tmp_path), "trainer.num_threads=1", "logger=none"]) == 0  # does not


def test_failed_and_diverged_trials_are_recorded_and_the_search_goes_on(tmp_path, monkeypatch, capsys, fake):
    monkeypatch.chdir(tmp_path)
    # call 0: seed 2 writes nothing (FAIL); call 1: seed 1 diverges (PRUNED); then fine
    fake(lambda i, ov, seed: {(0, 2): "skip", (1, 1): "diverged"}.get((i, seed)))
    assert search.main([spec_file(tmp_path)]) == 0
    done = trials(f"sqlite:///{tmp_path}/outputs/search/mine/study.db")
    assert [t.state.name for t in done] == ["FAIL", "PRUNED", "COMPLETE", "COMPLETE", "COMPLETE"]
    assert done[0].user_attrs["fail_reason"] == "seed 2: no results.json"
    assert done[1].user_attrs["pruned_reason"] == "seed 1: diverged: loss became nan at step 2"
    captured = capsys.readouterr()
    assert "trial #0 failed: " in captured.err and "trial #1 pruned: " in captured.out


def test_a_worker_stops_after_failed_trials_in_a_row(tmp_path, monkeypatch, capsys, fake):
    monkeypatch.chdir(tmp_path)
    fake(lambda i, ov, seed: "skip")
    assert search.main([spec_file(tmp_path)]) == 1
    assert states(f"sqlite:///{tmp_path}/outputs/search/mine/study.db") == ["FAIL"] * search.MAX_FAILS_IN_ROW
    assert f"{search.MAX_FAILS_IN_ROW} trials in a row failed" in capsys.readouterr().err


# ------------------------------------------------------------------- interruptions and workers
def test_an_interrupted_search_rerun_finishes_with_exactly_n_complete_trials(tmp_path, monkeypatch, capsys, fake):
    """Ctrl-C during trial #1 (seed 1 finished, seed 2 not): the trial is FAIL and queued again; the
    re-run retries it in its own directory (seed 1 read back, not retrained) and stops at n."""
    monkeypatch.chdir(tmp_path)

    def interrupt(i, ov, seed):
        if i == 1 and seed == 2:
            raise KeyboardInterrupt

    runs = fake(interrupt)
    path = spec_file(tmp_path)
    assert search.main([path]) == 130
    url = f"sqlite:///{tmp_path}/outputs/search/mine/study.db"
    assert states(url) == ["COMPLETE", "FAIL", "WAITING"]
    interrupted = trials(url)[1]
    assert interrupted.user_attrs["fail_reason"].startswith("interrupted")
    seed1 = tmp_path / "outputs/search/mine/trial_001/seed_1/results.json"
    mtime = seed1.stat().st_mtime_ns
    runs = fake()
    assert search.main([path]) == 0
    done = trials(url)
    assert sum(t.state == TrialState.COMPLETE for t in done) == 3
    retry = done[2]
    assert retry.params == interrupted.params and retry.user_attrs["retry_of"] == 1
    assert retry.user_attrs["trial_dir"] == "outputs/search/mine/trial_001"  # the same runs, resumed
    assert runs.calls[0]["hydra.sweep.dir"] == "outputs/search/mine/trial_001"
    assert seed1.stat().st_mtime_ns == mtime
    assert "a retry of #1" in capsys.readouterr().out


class Killed(BaseException):
    """A worker killed mid-trial (kill -9): nothing of it handles the exception."""


def test_a_dead_workers_running_trial_goes_stale_and_is_retried(tmp_path, monkeypatch, capsys, fake):
    monkeypatch.chdir(tmp_path)

    def die(i, ov, seed):
        if i == 1:
            raise Killed

    fake(die)
    path = spec_file(tmp_path)
    with pytest.raises(Killed):
        search.main([path, "--grace-period", "2"])
    url = f"sqlite:///{tmp_path}/outputs/search/mine/study.db"
    assert states(url) == ["COMPLETE", "RUNNING"]  # left behind, its heartbeat stops
    runs = fake()
    assert search.main([path, "--grace-period", "2"]) == 0
    done = trials(url)
    # #2 ran first (1 complete + 1 running < 3); then, 2 + 1 running: it waited until #1 went stale
    assert [t.state.name for t in done] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert done[3].params == done[1].params and done[3].user_attrs["retry_of"] == 1
    assert [c["hydra.sweep.dir"] for c in runs.calls] == ["outputs/search/mine/trial_002", "outputs/search/mine/trial_001"]
    assert "waiting: 1 trial(s) running" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # the simulated other worker's plain ask
def test_a_worker_that_loses_the_race_for_the_last_slot_runs_nothing(tmp_path, monkeypatch, capsys, fake):
    """Another worker asks for a trial between this worker's count and its ask: with n_trials=1 the
    later-numbered trial is FAIL (surplus) before anything runs; when the other worker then dies,
    its trial goes stale and this worker runs its retry: exactly one COMPLETE trial."""
    monkeypatch.chdir(tmp_path)
    path = spec_file(tmp_path, SPEC.replace("n_trials: 3", "n_trials: 1"))
    url = f"sqlite:///{tmp_path}/outputs/search/mine/study.db"
    real_claim, other = search.claim, {}

    def claim(ctx):
        if not other:  # the other worker's ask lands after this worker counted 0 trials, before its ask
            study = optuna.load_study(study_name="mine", storage=ctx.rdb)
            other["trial"] = study.ask(search.distributions(ctx.spec))
            ctx.rdb.record_heartbeat(ctx.rdb.get_trial_id_from_study_id_trial_number(ctx.study_id, other["trial"].number))
        return real_claim(ctx)

    monkeypatch.setattr(search, "claim", claim)
    runs = fake()
    assert search.main([path, "--grace-period", "2"]) == 0
    done = trials(url)
    assert [t.state.name for t in done] == ["FAIL", "FAIL", "COMPLETE"]
    assert done[1].user_attrs["fail_reason"].startswith("surplus: 1 trials before it could complete the 1")
    assert "trial_dir" not in done[1].user_attrs and len(runs.calls) == 1  # the surplus trial ran nothing
    assert done[2].user_attrs["retry_of"] == 0 and done[2].params == done[0].params


def _worker(path, url, fake_sleep):
    import time

    def slow(i, ov, seed):
        time.sleep(fake_sleep)

    search.launch = FakeRuns(slow)
    os._exit(search.main([path, "--storage", url, "--study", "shared", "--grace-period", "8"]))


@pytest.mark.e2e  # two worker processes
def test_two_workers_on_one_storage_produce_exactly_n_complete_trials(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = spec_file(tmp_path, SPEC.replace("n_trials: 3", "n_trials: 5"))
    url = f"sqlite:///{tmp_path}/shared.db"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_worker, args=(path, url, 0.3)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    done = trials(url, "shared")
    complete = [t for t in done if t.state == TrialState.COMPLETE]
    assert len(complete) == 5
    assert all(
        t.state == TrialState.FAIL and t.user_attrs["fail_reason"].startswith("surplus")
        for t in done
        if t.state != TrialState.COMPLETE
    )
    assert len({t.user_attrs["trial_dir"] for t in complete}) == 5
    assert len({t.user_attrs["worker"] for t in complete}) == 2  # both worked on it
    assert len({t.params["schedule.lr"] for t in complete}) == 5  # different points (per-trial seeds)


def test_workers_option_starts_that_many_workers_on_one_study(tmp_path):
    args = search._parser().parse_intermixed_args(["mine.yaml", "trainer.max_steps=2", "--workers", "2"])
    args.study = "mine"
    cmds = search.worker_commands(args, "sqlite:///x/study.db", Path("x"), dev_selection=False)
    assert cmds == [
        [
            sys.executable,
            "-m",
            "adaptune",
            "search",
            "mine.yaml",
            "trainer.max_steps=2",
            "--storage",
            "sqlite:///x/study.db",
            "--study",
            "mine",
            "--sweep-dir",
            "x",
            "--grace-period",
            "120",
            "--worker",
            str(i),
        ]
        for i in (0, 1)
    ]


# ------------------------------------------------------------------------------------ end to end
@pytest.mark.e2e
def test_tiny_search_end_to_end(tmp_path):
    """Real training: 2 trials x 2 seeds of a 2-layer BERT on generated RTE, two worker processes."""
    data = write_glue(tmp_path / "rte", "rte", n_train=32, n_dev=8)
    overrides = [
        "task=glue",
        "task.name=rte",
        f"task.data_dir={data}",
        *TINY_BERT,
        "task.selection_split=8",
        "logger=none",
        "trainer=cpu_fast",
        "trainer.progress=false",
        "trainer.max_steps=2",
        "trainer.num_threads=1",
    ]
    path = spec_file(
        tmp_path,
        "schedule: sage\nseeds: [1, 2]\noverrides: ["
        + ", ".join(f"'{o}'" for o in overrides)
        + "]\nparams:\n  schedule.lr: {low: 1e-4, high: 1e-3, log: true}\nn_trials: 2\nsampler_seed: 3\n",
        name="tiny",
    )
    out = subprocess.run(
        [sys.executable, "-m", "adaptune", "search", path, "--workers", "2"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    sweep = tmp_path / "outputs" / "search" / "tiny"
    done = trials(f"sqlite:///{sweep / 'study.db'}", "tiny")
    complete = [t for t in done if t.state == TrialState.COMPLETE]
    assert len(complete) == 2
    for t in complete:
        values = []
        for seed in (1, 2):
            res = json.loads((tmp_path / t.user_attrs["trial_dir"] / f"seed_{seed}" / "results.json").read_text())
            assert res["status"] == "completed" and res["seed"] == seed and res["steps"] == 2
            assert res["config"]["task"]["selection_split"] == 8
            assert res["config"]["schedule"]["lr"] == pytest.approx(t.params["schedule.lr"], rel=1e-6)
            values.append(res["final"][res["main_metric"]])
        assert t.value == pytest.approx(statistics.fmean(values))
    data = json.loads((sweep / "search.json").read_text())
    assert data["trials"]["COMPLETE"] == 2 and data["best"]["value"] == pytest.approx(max(t.value for t in complete))
    assert "optuna-dashboard sqlite:///outputs/search/tiny/study.db" in out.stdout
