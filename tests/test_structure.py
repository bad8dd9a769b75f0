"""The architecture's rules, checked: one default per config key, dependency directions, module
sizes, and registries that do not depend on import order."""

from __future__ import annotations

import ast
import re
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import REPO, compose

CONF = REPO / "conf"
PACKAGES = ("common", "runner", "tasks", "schedules")


def _schema_defaults(group: str, option_cfg) -> dict:
    """The defaults the schema gives the composed node of ``group`` (by its kind for tasks, by the
    schema the option extends for schedules)."""
    from adaptune.runner.config import LoggerConfig, TrainerConfig
    from adaptune.schedules.config import SCHEDULE_SCHEMAS
    from adaptune.tasks.config import TASK_SCHEMAS

    schema = {
        "trainer": TrainerConfig,
        "logger": LoggerConfig,
        "schedule": SCHEDULE_SCHEMAS.get(option_cfg.get("schema")),
        "task": TASK_SCHEMAS.get(option_cfg.get("kind")),
    }[group]
    return OmegaConf.to_container(OmegaConf.structured(schema))


def _flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("group", ["task", "schedule", "trainer", "logger"])
def test_every_key_has_exactly_one_default(group):
    """The schema holds each key's default; a group option's YAML file only sets values that
    differ from what it would get without them (the schema, or the option it extends). A file
    restating a default would be a second source that drifts."""
    for path in sorted((CONF / group).glob("*.yaml")):
        own = OmegaConf.to_container(OmegaConf.load(path))
        defaults = own.pop("defaults", [])
        parents = [d for d in defaults if isinstance(d, str) and not d.startswith("/") and d != "_self_"]
        assert len(parents) <= 1, path
        if parents:
            base = _flatten(OmegaConf.to_container(compose([f"{group}={parents[0]}"])[group]))
        else:
            schemas = [d.split("/")[-1].split("@")[0] for d in defaults if isinstance(d, str) and d.startswith("/schema/")]
            base = _flatten(_schema_defaults(group, {"kind": path.stem} if group == "task" else {"schema": schemas[0]}))
        for key, value in _flatten(own).items():
            assert key in base, f"{path.name}: {key} is not a key of the schema"
            assert value != base[key], f"{path.name}: {key}: {value!r} restates the default"


def test_schema_defaults_are_the_composed_defaults():
    """With no preset values, a composed group equals its schema: the YAML adds nothing hidden."""
    from adaptune.runner.config import TrainerConfig

    cfg = compose(["trainer=default"])
    assert OmegaConf.to_container(cfg.trainer) == dataclasses.asdict(TrainerConfig())


def test_components_read_config_without_fallback_defaults():
    """Schedules and tasks read typed attributes: no ``cfg.get(key, default)`` / ``cfg[...]`` in
    their code (the schema is the only default)."""
    offenders = []
    for package in ("schedules", "tasks"):
        for path in sorted((REPO / package).rglob("*.py")):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if re.search(r"(?<!\w)(self\.)?(cfg|model_cfg|tcfg)(\.get\(|\[)", line):
                    offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def _top(module: str) -> str:
    """The package a module belongs to: ``adaptune.tasks.glue`` -> ``tasks``; ``torch.nn`` -> ``torch``."""
    parts = module.split(".")
    return parts[1] if parts[0] == "adaptune" and len(parts) > 1 else parts[0]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(_top(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(_top(node.module))
    return found


@pytest.mark.parametrize(
    "package,forbidden",
    [
        ("tasks", {"schedules", "runner"}),
        ("schedules", {"tasks", "runner"}),
        ("common", {"tasks", "schedules", "runner"}),
    ],
)
def test_import_graph(package, forbidden):
    """tasks and schedules depend on common, never on each other or on the runner."""
    bad = {
        str(p.relative_to(REPO)): sorted(_imports(p) & forbidden)
        for p in (REPO / package).rglob("*.py")
        if _imports(p) & forbidden
    }
    assert not bad, bad


@pytest.mark.e2e
def test_code_imports_only_through_the_adaptune_package():
    """Installed, the only top-level name is ``adaptune``: no module imports ``runner``, ``tasks``,
    ``schedules``, ``common`` or ``conf`` as top-level packages (a user's ``tasks.py`` would win)."""
    bad = []
    for root in (*PACKAGES, "conf", "adaptune", "tests", "bench", "examples"):
        for path in (REPO / root).rglob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module]
                    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                    else []
                )
                bad += [f"{path.relative_to(REPO)}:{node.lineno}: {n}" for n in names if n.split(".")[0] in (*PACKAGES, "conf")]
    assert not bad, bad


def test_no_source_file_over_500_lines():
    sizes = {
        str(p.relative_to(REPO)): len(p.read_text().splitlines()) for package in PACKAGES for p in (REPO / package).rglob("*.py")
    }
    assert sizes and not {k: v for k, v in sizes.items() if v > 500}


@pytest.mark.e2e
def test_optimizer_registry_does_not_depend_on_import_order():
    """``schedule=baseline schedule.optimizer=adamw_sage`` works in a fresh process in which no
    SAGE module was imported first."""
    code = (
        "import sys; from adaptune.schedules import optimizer_class; "
        "assert 'adaptune.schedules.sage' not in sys.modules; "
        "print(optimizer_class('adamw_sage').__name__, optimizer_class('adamax').__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["AdamWSAGE", "Adamax"]


def test_task_supplies_its_models_patterns():
    """The schedule receives patterns from the task for the model it built, not a family name."""
    import torch

    from adaptune.common.families import FAMILY_PATTERNS
    from adaptune.schedules import build_schedule

    model = torch.nn.Sequential()
    model.add_module("blocks", torch.nn.ModuleList([torch.nn.Linear(4, 4)]))
    patterns = {"sage": ("blocks.0",), "no_decay": ("bias",), "dps": ("blocks.0",)}
    schedule = build_schedule({"name": "sage"})
    schedule.setup(model, patterns, total_steps=10)
    flags = [(g["sage"], g["weight_decay"]) for g in schedule.optimizer.param_groups]
    assert flags == [(True, 0.01), (True, 0.0)]
    assert set(FAMILY_PATTERNS["bert"]) == {"sage", "dps", "no_decay"}


#: the modules that may read the config schema: the schema itself, the registry, the schedule base
#: and each method's config adapter (``*/schedule.py``, ``baseline.py``); everything else is a
#: liftable algorithm
SCHEMA_READERS = {"config.py", "__init__.py", "base.py", "baseline.py", "schedule.py"}


def _names_schema(path: Path) -> bool:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module.endswith("config") and (node.level > 0 or "schedules" in module):
                return True
            if any(a.name == "ScheduleConfig" for a in node.names):
                return True
    return False


def test_no_algorithm_imports_the_config_schema():
    """SAGE's optimizers, DPS, ChildTuning, Mixout, the integrations and the fairseq plug-in own
    their defaults (schedules/defaults.py) and checks (ValueError naming their argument)."""
    root = REPO / "schedules"
    bad = [
        str(p.relative_to(REPO))
        for p in root.rglob("*.py")
        if not (p.parent == root and p.name in SCHEMA_READERS) and p.name != "schedule.py" and _names_schema(p)
    ]
    assert not bad, bad
    assert _names_schema(root / "base.py")  # the check sees a schema import when there is one


@pytest.mark.parametrize(
    "schedule,key,call",
    [
        (
            "dps",
            "drop_p",
            lambda v: __import__("adaptune.schedules.dps.helpers", fromlist=["x"]).check_dps_hparams(v, 0.05, "dense"),
        ),
        (
            "dps",
            "update_ratio",
            lambda v: __import__("adaptune.schedules.dps.helpers", fromlist=["x"]).check_dps_hparams(0.3, v, "dense"),
        ),
        (
            "childtuning_f",
            "keep_p",
            lambda v: __import__("adaptune.schedules.childtuning.algorithm", fromlist=["x"])._check_reserve_p(v),
        ),
        ("mixout", "mix_p", lambda v: __import__("adaptune.schedules.defaults", fromlist=["x"]).check_range("p", v, 0, 1)),
    ],
)
def test_algorithm_and_schema_ranges_agree(schedule, key, call):
    """The schema's check of a key and the algorithm's check of its argument accept the same values."""
    from adaptune.schedules.config import SCHEDULE_SCHEMAS

    check = next(f.metadata["check"] for f in dataclasses.fields(SCHEDULE_SCHEMAS[schedule]) if f.name == key)
    for value in (-0.1, 0.0, 1e-9, 0.3, 0.999, 1.0, 1.5):
        try:
            call(value)
            algorithm_ok = True
        except ValueError:
            algorithm_ok = False
        assert algorithm_ok == (check(value) is None), (key, value)


def test_mixout_and_dps_share_the_mix_and_linear_helpers_not_each_other():
    """The weight mix lives in schedules/mixing.py and the Linear helpers in schedules/linear.py:
    Mixout does not reach into DPS's package (nor DPS into Mixout's)."""
    for package, other in (("mixout", "dps"), ("dps", "mixout")):
        for path in (REPO / "schedules" / package).glob("*.py"):
            tree = ast.parse(path.read_text())
            bad = [
                n.module
                for n in ast.walk(tree)
                if isinstance(n, ast.ImportFrom)
                and n.module
                and (n.module == other or n.module.startswith(f"{other}.") or f".{other}" in n.module)
            ]
            assert not bad, (str(path.relative_to(REPO)), bad)


def _module_graph() -> dict[str, set[str]]:
    """{module: modules it imports} over adaptune's modules (package __init__ files excluded as
    targets and sources: a package importing its parts is not a cycle), imports under
    ``if TYPE_CHECKING:`` left out (they never run)."""
    mods: dict[str, tuple[Path, bool]] = {}
    for top in PACKAGES:
        for path in (REPO / top).rglob("*.py"):
            parts = list(path.relative_to(REPO / top).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            mods[".".join(["adaptune", top, *(parts[:-1] if is_pkg else parts)])] = (path, is_pkg)

    def resolve(name: str, is_pkg: bool, node: ast.ImportFrom) -> str:
        if node.level == 0:
            return node.module or ""
        base = name.split(".") if is_pkg else name.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else []))

    graph = {}
    for name, (path, is_pkg) in mods.items():
        if is_pkg:
            continue
        tree = ast.parse(path.read_text())
        skip = {
            id(n)
            for block in ast.walk(tree)
            if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
            for b in block.body
            for n in ast.walk(b)
        }
        edges = set()
        for node in ast.walk(tree):
            if id(node) in skip or not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            if isinstance(node, ast.ImportFrom):
                target = resolve(name, is_pkg, node)
                candidates = [target, *(f"{target}.{a.name}" for a in node.names)]
            else:
                candidates = [a.name for a in node.names]
            edges |= {c for c in candidates if c in mods and not mods[c][1] and c != name}
        graph[name] = edges
    return graph


def test_no_import_cycles_between_modules():
    """No module imports (even late, inside a function) a module that imports it back, directly
    or through others: the "imported late" workarounds stay gone."""
    graph = _module_graph()
    cycles = set()
    for start in graph:
        stack = [(start, (start,))]
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    cycles.add(tuple(sorted(path)))
                elif nxt not in path and len(path) < 8:
                    stack.append((nxt, (*path, nxt)))
    assert not cycles, sorted(cycles)


#: which task each module of tasks/ belongs to (shared modules: base, config, families, lora, ...)
TASK_FAMILIES = {
    "text": ("glue", "glue_data", "nli_data", "custom_data", "sources", "hf_loading", "feature_cache", "ood"),
    "nmt": ("nmt", "nmt_data"),
    "vit": ("vit", "vit_data"),
}


def test_a_task_module_does_not_import_another_tasks_data_module():
    """GLUE-style text classification, translation and image classification each read their own
    data; only the shared modules (tasks/config.py lists every task's allowed values) see all."""
    family_of = {m: fam for fam, mods in TASK_FAMILIES.items() for m in mods}
    bad = []
    for path in (REPO / "tasks").glob("*.py"):
        mine = family_of.get(path.stem)
        if mine is None:
            continue
        for imported in _imports_within(path, "tasks"):
            theirs = family_of.get(imported)
            if theirs is not None and theirs != mine and imported.endswith("_data"):
                bad.append(f"tasks/{path.name} imports tasks/{imported}.py")
    assert not bad, bad


def _imports_within(path: Path, package: str) -> set[str]:
    """Sibling modules of ``package`` that ``path`` imports (relative or absolute)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 1:
                found |= {module} if module else {a.name for a in node.names}
            elif module.startswith(f"adaptune.{package}."):
                found.add(module.split(".")[2])
    return found
