"""The install a user gets: one ``adaptune`` package (configs inside it), a wheel that works
outside the checkout, a core that needs only torch and numpy, one-line errors for a missing extra."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import tomllib
import zipfile
from pathlib import Path

import pytest

from conftest import FAST, REPO, TINY_BERT, write_glue

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
MAPPED = PYPROJECT["tool"]["setuptools"]["package-dir"]
#: the heavy libraries the core must not need (each belongs to an extra)
HEAVY = (
    "transformers",
    "hydra",
    "omegaconf",
    "timm",
    "torchvision",
    "datasets",
    "wandb",
    "sklearn",
    "scipy",
    "matplotlib",
    "accelerate",
    "peft",
    "optuna",
    "fairseq",
    "tqdm",
)


def _folder(package: str) -> Path:
    """The repository folder a package name maps to (the longest package-dir prefix)."""
    for prefix in sorted(MAPPED, key=len, reverse=True):
        if package == prefix or package.startswith(prefix + "."):
            return REPO / MAPPED[prefix] / Path(*package[len(prefix) :].split(".")[1:])
    raise AssertionError(f"{package} is not under a mapped folder")


def test_package_list_is_every_folder_of_the_mapped_trees():
    """pyproject's explicit package list misses no folder (a missing one would be absent from
    wheels while editable installs still found it); data folders (conf/*, csrc) are listed too."""
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    found = set()
    for package, folder in MAPPED.items():
        found.add(package)
        for sub in (REPO / folder).rglob("*"):
            if sub.is_dir() and "__pycache__" not in sub.parts:
                found.add(".".join([package, *sub.relative_to(REPO / folder).parts]))
    assert listed == found
    assert all(_folder(p).is_dir() for p in listed)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the checkout (setuptools builds in the source tree)."""
    out = tmp_path_factory.mktemp("wheel")
    src = out / "src"
    shutil.copytree(
        REPO,
        src,
        ignore=shutil.ignore_patterns(".git", ".venv", "outputs", "build", "wandb", "*.egg-info", "__pycache__", ".pytest_cache"),
    )
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (path,) = out.glob("adaptune-*.whl")
    return path


@pytest.mark.e2e
def test_wheel_holds_only_the_adaptune_package_and_its_configs(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"adaptune"}, tops
    configs = sorted(str(p.relative_to(REPO)) for p in (REPO / "conf").rglob("*.yaml"))
    assert configs and {f"adaptune/{c}" for c in configs} <= set(names)
    assert "adaptune/schedules/sage/csrc/sage_cpu.cpp" in names
    assert "adaptune/schedules/integrations/fairseq_user_dir/adaptune_fairseq/__init__.py" in names
    # no source file is left out: every .py of the mapped folders is in the wheel
    sources = {
        f"adaptune/{p.relative_to(REPO)}"
        for folder in ("common", "runner", "tasks", "schedules", "conf")
        for p in (REPO / folder).rglob("*.py")
    } | {f"adaptune/{p.name}" for p in (REPO / "adaptune").glob("*.py")}
    assert sources <= set(names), sorted(sources - set(names))
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    requires = [line for line in meta.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert sorted(r.split()[1] for r in requires) == ["numpy>=1.26", "torch>=2.6"], requires
    assert "License-Expression: MIT" in meta


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed (not editable). Its dependencies are this
    environment's (a .pth line adds our site-packages after its own; .pth files there, such as
    the editable install's finder, are not run), so the only adaptune it can import is the wheel's."""
    env = tmp_path_factory.mktemp("venv") / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    out = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(env / "bin" / "python"), "install", "--quiet", "--no-deps", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    site = subprocess.run(
        [str(env / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return env


@pytest.fixture
def clashing(tmp_path) -> Path:
    """A working directory holding a user's ``tasks.py`` and ``common/`` (invoke / Celery style)."""
    (tmp_path / "tasks.py").write_text("raise SystemExit('the user tasks.py was imported')\n")
    (tmp_path / "common").mkdir()
    (tmp_path / "common" / "__init__.py").write_text("raise SystemExit('the user common/ was imported')\n")
    (tmp_path / "runner.py").write_text("raise SystemExit('the user runner.py was imported')\n")
    return tmp_path


def _run(cmd, cwd, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**env, "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true"}
    )


@pytest.mark.e2e
def test_wheel_install_runs_from_a_directory_with_clashing_names(installed, clashing):
    bin_ = installed / "bin"
    code = "import adaptune.runner, adaptune.conf as c; print(adaptune.runner.__file__, c.CONFIG_DIR)"
    where = _run([str(bin_ / "python"), "-c", code], clashing)
    assert where.returncode == 0, where.stderr
    runner_file, conf_dir = where.stdout.split()
    assert runner_file.startswith(str(installed)) and conf_dir.startswith(str(installed))

    job = _run([str(bin_ / "adaptune"), "--cfg", "job"], clashing)
    assert job.returncode == 0, job.stderr
    assert "name: amazon_reviews" in job.stdout and "_target_: adaptune.runner.callbacks.Logging" in job.stdout

    dry = _run([str(bin_ / "adaptune"), "compare", "quickstart", "--dry-run"], clashing)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.count(" -m adaptune -m experiment=quickstart") == 1  # one sweep
    assert dry.stdout.count("#   compare_point=") == 6  # of six grid points

    (clashing / "mine.yaml").write_text("experiment: quickstart\nseeds: [1]\ngrids: {sage: {schedule.lr: [1e-4]}}\n")
    own = _run([str(bin_ / "adaptune"), "compare", "mine.yaml", "--dry-run"], clashing)
    assert own.returncode == 0, own.stderr
    assert "seed=1 name=mine" in own.stdout and ": schedule=sage schedule.lr=1e-4" in own.stdout

    plugin = Path(_run([str(bin_ / "adaptune"), "plugin-path", "fairseq"], clashing).stdout.strip())
    assert plugin.name == "adaptune_fairseq" and plugin.is_relative_to(installed)
    assert (plugin / "__init__.py").is_file()
    assert sorted(p.name for p in plugin.parent.iterdir()) == ["README.md", "adaptune_fairseq"]


@pytest.mark.e2e
def test_wheel_install_trains_a_few_steps(installed, clashing):
    data = write_glue(clashing / "rte_data", "rte", n_train=16, n_dev=8)
    run_dir = clashing / "run"
    out = _run(
        [
            str(installed / "bin" / "adaptune"),
            "task=glue",
            "task.name=rte",
            f"task.data_dir={data}",
            *TINY_BERT,
            *FAST,
            "trainer.batch_size=8",
            "trainer.max_steps=2",
            "schedule=sage",
            f"hydra.run.dir={run_dir}",
        ],
        clashing,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["steps"] == 2 and results["status"] == "completed"


def _without(hidden, code: str, *args, cwd: Path):
    """Run ``code`` in a Python whose site-packages is this environment's minus the top-level
    modules ``hidden`` (a symlinked view, .pth files and the editable install included): as if
    those distributions were not installed."""
    purelib = Path(sysconfig.get_paths()["purelib"])
    view = cwd / "site-view"
    view.mkdir(exist_ok=True)
    for entry in purelib.iterdir():
        if entry.name.split(".")[0] not in hidden and not (view / entry.name).exists():
            (view / entry.name).symlink_to(entry)
    prelude = f"import site, sys; site.addsitedir({str(view)!r}); sys.argv = sys.argv[1:]\n"
    return subprocess.run(
        [sys.executable, "-S", "-c", prelude + textwrap.dedent(code), *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


@pytest.mark.e2e
def test_the_algorithms_need_only_torch_and_numpy(tmp_path):
    """SAGE, DPS, ChildTuning and Mixout import and step with every heavy library unavailable."""
    out = _without(
        HEAVY,
        """
        import sys, torch
        from adaptune.schedules.sage import AdamWSAGE, AdamaxSAGE, sage_param_groups
        from adaptune.schedules.dps import DPS
        from adaptune.schedules.childtuning import ChildTuningF
        from adaptune.schedules.mixout import Mixout
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        opt = AdamWSAGE(model.parameters(), lr=1e-2)
        dps = DPS(model.named_parameters(), total_steps=40, patterns=("0.",))
        before = model[0].weight.detach().clone()
        for step in range(1, 3):
            dps.on_step_begin(step)
            model(torch.randn(8, 4)).pow(2).mean().backward()
            dps.on_gradients(step)
            opt.step(); opt.zero_grad()
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY})
        print("moved", bool((model[0].weight != before).any()), "heavy", heavy)
    """.replace("{HEAVY}", repr(set(HEAVY))),
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["moved", "True", "heavy", "[]"]


@pytest.mark.e2e
def test_core_requirements_resolve_to_torch_and_numpy_only(wheel, tmp_path):
    """``pip install adaptune`` into an empty environment installs torch, numpy and what they
    need: the same set as ``pip install torch numpy`` (resolved, not installed)."""

    def resolve(*reqs):
        report = tmp_path / "report.json"
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--dry-run",
                "--ignore-installed",
                "-c",
                str(REPO / "constraints.txt"),
                "--report",
                str(report),
                *reqs,
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        return {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}

    core = resolve(str(wheel))
    assert core - {"adaptune"} == resolve("torch", "numpy")
    assert not core & {"transformers", "hydra-core", "timm", "torchvision", "wandb", "datasets"}


@pytest.mark.e2e
@pytest.mark.parametrize(
    "blocked,argv,extra",
    [
        (("hydra",), ["--cfg", "job"], "hydra-core, which is not installed: pip install 'adaptune[runner]'"),
        (("timm",), ["task=vit", "trainer.max_steps=1", "--cfg", "job"], None),
        (
            ("timm",),
            ["task=vit", "trainer.max_steps=1", "logger=none"],
            "timm, which is not installed: pip install 'adaptune[vision]'",
        ),
    ],
)
def test_a_missing_extra_is_a_one_line_error_naming_the_install(tmp_path, blocked, argv, extra):
    out = _without(
        blocked,
        """
        from adaptune.runner.cli import main
        main()
    """,
        "adaptune",
        f"hydra.run.dir={tmp_path / 'run'}",
        *argv,
        cwd=tmp_path,
    )
    if extra is None:  # composing a config needs no task library
        assert out.returncode == 0, out.stderr[-2000:]
        return
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.splitlines() == [f"adaptune: error: {extra}"]
