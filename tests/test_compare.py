"""``adaptune compare NAME``: the per-schedule multirun commands from conf/compare/, one-line
errors, and the launch loop feeding the report (training replaced by generated results.json)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, TINY_BERT, write_glue
from test_report import write_run

from adaptune.runner import compare

PY = shlex.quote(sys.executable)

#: the overrides conf/compare/quickstart.yaml adds to every run
QS = "task.train_subset=1280 task.max_seq_length=64 task.eval_subset=300 trainer.eval_every=20"


def test_dry_run_prints_the_one_multirun_and_its_grid_points_for_quickstart(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "adaptune", "compare", "quickstart", "--dry-run"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    ids = [pid for pid, _, _ in compare.points(compare.load("quickstart"))]
    searchpath = shlex.quote(f"hydra.searchpath=[file://{tmp_path.resolve()}/outputs/multirun/quickstart/.compare]")
    assert lines[0] == (
        f"{PY} -m adaptune -m experiment=quickstart {searchpath} +compare_point={','.join(ids)} seed=1,2 name=quickstart {QS}"
    )
    assert lines[1:] == [
        f"#   compare_point={ids[0]}: schedule=baseline schedule.lr=5e-5",
        f"#   compare_point={ids[1]}: schedule=baseline schedule.lr=1e-4",
        f"#   compare_point={ids[2]}: schedule=sage schedule.lr=2.5e-4",
        f"#   compare_point={ids[3]}: schedule=sage schedule.lr=5e-4",
        f"#   compare_point={ids[4]}: schedule=dps schedule.lr=5e-5",
        f"#   compare_point={ids[5]}: schedule=dps schedule.lr=1e-4",
        "adaptune report outputs/multirun/quickstart",
    ]
    assert list(tmp_path.iterdir()) == []  # a dry run writes nothing


def test_dry_run_appends_extra_overrides_and_follows_the_sweep_dir(capsys):
    assert compare.main(["quickstart", "task.eval_subset=300", "--dry-run", "hydra.sweep.dir=/tmp/x"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith(f"name=quickstart {QS} task.eval_subset=300 hydra.sweep.dir=/tmp/x")
    assert "hydra.searchpath=[file:///tmp/x/.compare]" in lines[0]
    assert lines[-1] == "adaptune report /tmp/x"


def test_the_sage_lr_grid_is_2_to_5_times_the_baselines_default():
    spec = compare.load("quickstart")
    base = [float(v) for v in spec["grids"]["baseline"]["schedule.lr"]]
    assert base == [5e-5, 1e-4]
    for lr in (float(v) for v in spec["grids"]["sage"]["schedule.lr"]):  # the paper's 2-5x rule
        assert any(2 <= lr / b <= 5 for b in base), lr
    assert compare.n_runs(spec) == 12


def test_unknown_name_is_a_one_line_error():
    out = subprocess.run(
        [sys.executable, "-m", "adaptune", "compare", "nope"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.splitlines() == [
        "adaptune compare: error: conf/compare/nope.yaml does not exist; allowed names: "
        "dps_glue, dps_low_resource, quickstart, sage_glue, sage_glue_cpu (or the path of a YAML file)"
    ]


def test_missing_spec_file_is_a_one_line_error(tmp_path, capsys):
    assert compare.main([str(tmp_path / "mine.yaml"), "--dry-run"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"adaptune compare: error: compare spec {tmp_path / 'mine.yaml'} does not exist "
        "(a YAML file, or one of the presets: dps_glue, dps_low_resource, quickstart, sage_glue, sage_glue_cpu)"
    ]


def test_a_spec_file_anywhere_runs_like_the_preset(tmp_path, capsys):
    """``adaptune compare PATH.yaml``: a user's spec outside the package, the same plan as the
    preset it copies (the sweep is named after the file)."""
    mine = tmp_path / "specs" / "mine.yaml"
    mine.parent.mkdir()
    mine.write_text((REPO / "conf" / "compare" / "quickstart.yaml").read_text())
    assert compare.main(["quickstart", "--dry-run"]) == 0
    preset = capsys.readouterr().out
    assert compare.main([str(mine), "--dry-run"]) == 0
    own = capsys.readouterr().out
    assert own == preset.replace("name=quickstart", "name=mine").replace("multirun/quickstart", "multirun/mine")
    assert own != preset


@pytest.fixture
def conf(tmp_path, monkeypatch):
    """A conf/ with its own compare/ files (experiments and schedules: the real ones)."""
    root = tmp_path / "conf"
    (root / "compare").mkdir(parents=True)
    for group in ("experiment", "schedule"):
        (root / group).symlink_to(REPO / "conf" / group)
    monkeypatch.setattr(compare, "CONF", root)
    return root / "compare"


@pytest.mark.parametrize(
    "text,message",
    [
        (
            "seeds: [1]\ngrids: {sage: {schedule.lr: [1]}}\nlr: 1\n",
            "conf/compare/bad.yaml: unknown key 'lr'; allowed: experiment, seeds, overrides, grids",
        ),
        (
            "seeds: [1]\ngrids: {adam: {schedule.lr: [1]}}\n",
            "conf/compare/bad.yaml: grids.adam: unknown schedule; allowed: "
            "baseline, childtuning_d, childtuning_f, dps, dps_mix, mixout, sage",
        ),
        (
            "seeds: [1]\nexperiment: nope\ngrids: {sage: {schedule.lr: [1]}}\n",
            "conf/compare/bad.yaml: experiment=nope is unknown; allowed: ",
        ),
        (
            "seeds: []\ngrids: {sage: {schedule.lr: [1]}}\n",
            "conf/compare/bad.yaml: seeds: expected a non-empty list of distinct integers, got []",
        ),
        (
            "seeds: [1]\ngrids: {sage: {schedule.lr: []}}\n",
            "conf/compare/bad.yaml: grids.sage.schedule.lr: expected a non-empty list of values",
        ),
        ("seeds: [1]\ngrids: {sage: {seed: [1, 2]}}\n", "conf/compare/bad.yaml: grids.sage: seed is set by adaptune compare"),
    ],
)
@pytest.mark.parametrize("form", ["preset", "path"])
def test_bad_compare_file_is_a_one_line_error_naming_the_key(conf, tmp_path, capsys, text, message, form):
    """The same validation for a shipped preset (by name) and for a user's file (by path)."""
    if form == "preset":
        (conf / "bad.yaml").write_text(text)
        arg = "bad"
    else:
        arg = str(tmp_path / "mine" / "bad.yaml")
        Path(arg).parent.mkdir()
        Path(arg).write_text(text)
        message = message.replace("conf/compare/bad.yaml", arg)
    assert compare.main([arg, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(f"adaptune compare: error: {message}")


def _fake_multirun(calls, codes=None):
    """Stands in for the comparison's one ``python -m adaptune -m ...``: writes each job's results.json
    as the sweep would (accuracy peaks at lr=1e-4 for sage and at 5e-5 for the baseline); a schedule
    in ``codes`` makes the sweep stop with that exit status when it reaches that schedule's first point."""

    def run(cmd, **_):
        args = cmd[cmd.index("-m", 3) + 1 :]
        calls.append(args)
        ov = dict(a.split("=", 1) for a in args)
        sweep = Path(ov["hydra.sweep.dir"])
        plan = json.loads((sweep / "compare.json").read_text())
        for pid in ov["+compare_point"].split(","):
            assert (sweep / ".compare" / "compare_point" / f"{pid}.yaml").is_file()
            items = dict(item.split("=", 1) for item in plan["points"][pid])
            sched = items.pop("schedule")
            if codes and sched in codes:
                return subprocess.CompletedProcess(cmd, codes[sched])
            setting = {k[len("schedule.") :]: v for k, v in items.items()}
            best = 1e-4 if sched == "sage" else 5e-5
            for seed in ov["seed"].split(","):
                acc = 0.8 - abs(float(setting["lr"]) - best) * 1000 + 0.01 * int(seed)
                write_run(sweep, sched, int(seed), acc, setting=setting)
        return subprocess.CompletedProcess(cmd, 0)

    return run


def test_compare_launches_every_schedules_points_in_one_multirun_then_reports(conf, tmp_path, monkeypatch, capsys):
    (conf / "small.yaml").write_text(
        "experiment: quickstart\nseeds: [1, 2]\noverrides: [task.eval_subset=300]\n"
        "grids:\n  baseline: {schedule.lr: [2e-5, 5e-5]}\n"
        "  sage: {schedule.lr: [1e-4, 2.5e-4], schedule.beta3: [0.75]}\n"
    )
    calls = []
    monkeypatch.setattr(compare.subprocess, "run", _fake_multirun(calls))
    sweep = tmp_path / "sweep"
    assert compare.main(["small", f"hydra.sweep.dir={sweep}"]) == 0
    assert len(calls) == 1  # one sweep: the launcher gets every run at once
    args = calls[0]
    assert args[0] == "experiment=quickstart" and args[1] == f"hydra.searchpath=[file://{sweep.resolve()}/.compare]"
    plan = json.loads((sweep / "compare.json").read_text())
    ids = args[2].removeprefix("+compare_point=").split(",")
    assert [plan["points"][i] for i in ids] == [
        ["schedule=baseline", "schedule.lr=2e-5"],
        ["schedule=baseline", "schedule.lr=5e-5"],
        ["schedule=sage", "schedule.beta3=0.75", "schedule.lr=1e-4"],
        ["schedule=sage", "schedule.beta3=0.75", "schedule.lr=2.5e-4"],
    ]
    assert args[3:] == ["seed=1,2", "name=small", "task.eval_subset=300", f"hydra.sweep.dir={sweep}"]
    assert plan["seeds"] == [1, 2] and plan["grids"]["sage"]["schedule.lr"] == ["1e-4", "2.5e-4"]
    point = (sweep / ".compare" / "compare_point" / f"{ids[2]}.yaml").read_text()
    assert "- override /schedule: sage" in point and "beta3: 0.75" in point and "lr: 0.0001" in point
    data = json.loads((sweep / "report.json").read_text())
    selected = {s["schedule"]: s["selected"] for s in data["tasks"][0]["schedules"]}
    assert selected == {"baseline": "lr=5e-5", "sage": "beta3=0.75, lr=1e-4"}
    out = capsys.readouterr().out
    assert "## Selected settings" in out and "| glue/rte | sage | beta3=0.75, lr=1e-4 |" in out


def test_point_ids_name_their_content_and_runs_are_named_by_their_keys():
    spec = {"grids": {"sage": {"schedule.lr": ["1e-4"]}}}
    [(pid, sched, items)] = compare.points(spec)
    assert sched == "sage" and items == ["schedule=sage", "schedule.lr=1e-4"]
    assert pid == compare.point_id(items) and pid.startswith("sage_") and len(pid) == 13
    assert compare.points({"grids": {"sage": {"schedule.lr": ["1e-4", "5e-4"]}}})[0][0] == pid
    assert (
        compare.point_subdir(f"+compare_point={pid},seed=2,task.text_columns=[a,b]", "schedule=sage,schedule.lr=1e-4")
        == "schedule.lr=1e-4,schedule=sage,seed=2,task.text_columns=_a,b"
    )


def test_compare_shows_never_started_grid_points_and_exits_1(conf, tmp_path, monkeypatch, capsys):
    (conf / "small.yaml").write_text(
        "seeds: [1, 2]\ngrids:\n  baseline: {schedule.lr: [5e-5]}\n  sage: {schedule.lr: [1e-4]}\n  dps: {schedule.lr: [1e-4]}\n"
    )
    calls = []
    monkeypatch.setattr(compare.subprocess, "run", _fake_multirun(calls, codes={"sage": 3}))
    sweep = tmp_path / "sweep"
    assert compare.main(["small", f"hydra.sweep.dir={sweep}"]) == 1
    assert len(calls) == 1
    assert "stopped early" in capsys.readouterr().err
    data = json.loads((sweep / "report.json").read_text())
    rows = {s["schedule"]: s for s in data["tasks"][0]["schedules"]}
    assert rows["baseline"]["selected"] == "lr=5e-5"
    for sched in ("sage", "dps"):  # never reached: shown as missing
        assert rows[sched]["selected"] is None and rows[sched]["grid"][0]["missing_seeds"] == [1, 2]
    md = (sweep / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| sage"))
    assert row == "| sage | — (n=0, 2 missing) | — |"


def test_compare_stops_on_a_config_error(conf, tmp_path, monkeypatch, capsys):
    (conf / "small.yaml").write_text("seeds: [1]\ngrids:\n  baseline: {schedule.lr: [5e-5]}\n  sage: {schedule.lr: [1e-4]}\n")
    calls = []
    monkeypatch.setattr(compare.subprocess, "run", _fake_multirun(calls, codes={"baseline": 2}))
    assert compare.main(["small", f"hydra.sweep.dir={tmp_path}"]) == 2
    assert len(calls) == 1 and not (tmp_path / "report.md").exists()
    assert "stopped on a config error" in capsys.readouterr().err


def test_nproc_per_node_wraps_the_sweep_in_torchrun_and_refuses_a_cluster_launcher(capsys):
    assert compare.main(["quickstart", "--dry-run", "--nproc-per-node", "2"]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith(f"{PY} -m torch.distributed.run --standalone --nproc-per-node=2 -m adaptune -m ")
    assert compare.main(["quickstart", "--dry-run", "--nproc-per-node", "2", "hydra/launcher=joblib"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "hydra.launcher.tasks_per_node" in err


def _tiny_runs(tmp_path):
    """(sweep dir, overrides) of real 3-step runs of a 2-layer BERT on a tiny RTE-format set."""
    data = write_glue(tmp_path / "rte", "rte", n_train=24, n_dev=8)
    sweep = tmp_path / "sweep"
    return sweep, [
        "task=glue",
        "task.name=rte",
        f"task.data_dir={data}",
        *TINY_BERT,
        "logger=none",
        "trainer=cpu_fast",
        "trainer.progress=false",
        "trainer.max_steps=3",
        f"hydra.sweep.dir={sweep}",
    ]


@pytest.mark.e2e
def test_tiny_compare_end_to_end(conf, tmp_path):
    """Real training in one multirun: two schedules, three grid points, two seeds, a 2-layer BERT
    for 3 steps; run directories named by each point's keys."""
    (conf / "tiny.yaml").write_text(
        "seeds: [1, 2]\ngrids:\n  baseline: {schedule.lr: [1e-4, 1e-3]}\n  sage: {schedule.lr: [1e-3]}\n"
    )
    sweep, extra = _tiny_runs(tmp_path)
    assert compare.main(["tiny", *extra]) == 0
    report = json.loads((sweep / "report.json").read_text())
    grids = {s["schedule"]: s["grid"] for s in report["tasks"][0]["schedules"]}
    assert [len(grids["baseline"]), len(grids["sage"])] == [2, 1]
    assert all(p["selection"]["n"] == 2 for g in grids.values() for p in g)
    assert (sweep / "dev_curves.png").is_file()
    names = sorted(p.name.split(",task.data_dir")[0] for p in sweep.glob("schedule*"))
    assert names == [
        f"schedule.lr={lr},schedule={s},seed={seed}"
        for lr, s in (("0.001", "baseline"), ("0.001", "sage"), ("1e-4", "baseline"))
        for seed in (1, 2)
    ]


def test_progress_counts_finished_runs_and_estimates_the_rest(tmp_path):
    import io

    write_run(tmp_path, "baseline", 1, 0.7)  # finished before: done, not in the rate
    out = io.StringIO()
    progress = compare.Progress(tmp_path, total=4, every=0.02, out=out)
    with progress:
        progress.t0 -= 60  # as if a minute went by
        write_run(tmp_path, "baseline", 2, 0.7)
        write_run(tmp_path, "sage", 1, 0.7, status="running")  # not finished yet: not counted
        import time

        time.sleep(0.2)
    lines = out.getvalue().splitlines()
    assert lines == ["adaptune compare: run 2 of 4 done, ETA 2 min"]  # 60 s for the one new run, 2 left


@pytest.mark.e2e
def test_compare_with_two_processes_per_run_trains_each_point_as_one_ddp_run(conf, tmp_path):
    """``--nproc-per-node 2``: torchrun's two processes walk the sweep together; every run is one
    DDP run (world size 2, one results.json), also the second one (the process group is kept)."""
    (conf / "tiny.yaml").write_text("seeds: [1]\ngrids:\n  baseline: {schedule.lr: [1e-4]}\n  sage: {schedule.lr: [1e-3]}\n")
    sweep, extra = _tiny_runs(tmp_path)
    assert compare.main(["tiny", "--nproc-per-node", "2", *extra]) == 0
    results = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/results.json"))]
    assert [(r["schedule"], r["status"], r["world_size"]) for r in results] == [
        ("sage", "completed", 2),
        ("baseline", "completed", 2),
    ]


def test_the_paper_table_specs_hold_the_papers_grids():
    """conf/compare/dps_glue.yaml: Mixout p over the DPS paper's {0.1, ..., 0.8}, every DPS-table
    arm, the four tasks, 10 seeds; the low-resource spec the same grids at 500 / 1,000 examples;
    sage_glue: SAGE's lr 2-5x MT-DNN's 5e-5 and beta3 within the paper's 0.6-0.9."""
    dps = compare.load("dps_glue")
    assert dps["experiment"] == "dps_glue" and dps["seeds"] == [42, 52, 57, 63, 78, 96, 127, 140, 298, 375]
    assert [float(p) for p in dps["grids"]["mixout"]["schedule.mix_p"]] == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    assert set(dps["grids"]) == {"baseline", "childtuning_d", "childtuning_f", "mixout", "dps", "dps_mix"}
    assert dps["overrides"] == ["task.name=cola,rte,mrpc,stsb"]
    low = compare.load("dps_low_resource")
    assert low["grids"] == dps["grids"] and "task.train_subset=500,1000" in low["overrides"]
    sage = compare.load("sage_glue")
    assert all(2 <= float(lr) / 5e-5 <= 6 for lr in sage["grids"]["sage"]["schedule.lr"])
    assert all(0.6 <= float(b) <= 0.9 for b in sage["grids"]["sage"]["schedule.beta3"])
    assert sage["grids"]["baseline"]["schedule.optimizer"] == ["adamax_mtdnn"]


@pytest.mark.parametrize("name", ["dps_glue", "sage_glue", "quickstart"])
def test_every_grid_point_of_a_shipped_spec_composes_to_its_values(name, tmp_path):
    """Each point config (the schedule choice + its values over the experiment) composes with the
    schemas, and the composed run holds the point's values (a point's values win over the preset's)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from adaptune.runner.app import CONFIG_DIR

    spec = compare.load(name)
    compare.write_points(spec, tmp_path)
    for pid, sched, items in compare.points(spec):
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = hydra_compose(
                config_name="config",
                overrides=[
                    f"experiment={spec['experiment']}",
                    f"hydra.searchpath=[file://{tmp_path / '.compare'}]",
                    f"+compare_point={pid}",
                    "seed=1",
                ],
            )
        assert cfg.schedule.name == ("dps" if sched == "dps_mix" else sched)
        for item in items[1:]:
            key, value = item.split("=", 1)
            assert (
                float(OmegaConf.select(cfg, key)) == float(value) if value[0].isdigit() else OmegaConf.select(cfg, key) == value
            ), (pid, item)
