"""Find every run under a directory and label it: its task column, schedule row and setting.

A run is a directory with a ``results.json``, a ``.hydra/`` folder or a checkpoint. Runs whose
``results.json`` is missing or not completed are still placed (task, schedule, seed and setting
from ``.hydra/config.yaml`` and ``.hydra/overrides.yaml``) so that a grid point knows which of its
seeds failed; runs that cannot be placed are only listed as incomplete.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

#: written by ``adaptune compare`` into the sweep directory: the grids and seeds it launched
PLAN_FILE = "compare.json"


@dataclass
class Run:
    dir: Path
    res: dict  # results.json (completed or not); {} when there is none
    status: str  # "completed", the file's status, or "no results.json"
    task: str  # "glue/rte"
    schedule: str  # results' schedule label (dps_mix for schedule=dps_mix)
    seed: int | None
    overrides: dict[str, str]
    protocol: str  # "dev" | "selection_split"
    selection_split: object = None
    col: str = ""  # task column label (task + varying non-setting overrides)
    sched: str = ""  # schedule row label (+ experiment where two presets share it)
    setting: tuple = ()  # ((key, normalised value), ...) of the grid axes
    setting_label: str = ""
    lr: float | None = None
    values: dict = field(default_factory=dict)  # filled by selection: block -> {metric: value}

    @property
    def degenerate(self) -> str | None:
        reason = self.res.get("degenerate")
        return str(reason) if reason else None

    def metric(self, block: str, name: str) -> float | None:
        value = (self.res.get(block) or {}).get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        return None

    @property
    def counts(self) -> bool:
        """Its metrics are a real outcome: completed, or stopped with a degenerate reason."""
        return self.status == "completed" or self.degenerate is not None


def _load_yaml(path: Path):
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception:  # a half-written file: the run cannot be placed
        return None


def read_overrides(path: Path) -> dict[str, str]:
    """{key: value} of a run's command-line overrides (Hydra writes them as a YAML list)."""
    out = {}
    for item in _load_yaml(path) or []:
        key, sep, value = str(item).partition("=")
        if sep:
            out[key.lstrip("+~")] = value
    return out


def _expand_point(overrides: dict[str, str], run_dir: Path) -> dict[str, str]:
    """A run of ``adaptune compare`` names its grid point (``compare_point=sage_3f2a91c0``); the
    sweep's compare.json says which keys and values that point set (``schedule=sage``, ``schedule.lr=...``)."""
    pid = overrides.pop("compare_point", None)
    if pid is None:
        return overrides
    items = ((load_plan(run_dir.parent) or {}).get("points") or {}).get(pid) or []
    return {**overrides, **dict(item.split("=", 1) for item in items)}


def _make_run(run_dir: Path) -> Run | None:
    path = run_dir / "results.json"
    try:
        res = json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        res = {}
    res = res if isinstance(res, dict) else {}
    overrides = _expand_point(read_overrides(run_dir / ".hydra" / "overrides.yaml"), run_dir)
    cfg = res.get("config") or _load_yaml(run_dir / ".hydra" / "config.yaml") or {}
    task_cfg, sched_cfg = cfg.get("task") or {}, cfg.get("schedule") or {}
    kind = res.get("task") or task_cfg.get("kind")
    schedule = res.get("schedule") or sched_cfg.get("label") or sched_cfg.get("name")
    if not kind or not schedule:
        return None
    name = res.get("task_name") if "task_name" in res else task_cfg.get("name")
    seed = res.get("seed", cfg.get("seed", overrides.get("seed")))
    try:
        seed = int(seed) if seed is not None else None
    except (TypeError, ValueError):
        seed = None
    split = task_cfg.get("selection_split")
    status = str(res.get("status")) if res else "no results.json"
    lr = sched_cfg.get("lr")
    run = Run(
        run_dir,
        res,
        status,
        f"{kind}/{name}" if name else kind,
        schedule,
        seed,
        overrides,
        "selection_split" if split else "dev",
        split,
    )
    run.lr = float(lr) if isinstance(lr, (int, float)) else _number(overrides.get("schedule.lr"))
    return run


def collect(root: Path) -> tuple[list[Run], list[Path]]:
    """(placed runs of any status, run directories that could not be placed)."""
    run_dirs = {p.parent for p in root.rglob("results.json")}
    run_dirs |= {p.parent.parent for p in root.rglob("checkpoints/last.pt")}
    run_dirs |= {p.parent for p in root.rglob(".hydra") if p.is_dir()}
    runs, unplaced = [], []
    for run_dir in sorted(run_dirs):
        run = _make_run(run_dir)
        if run is None:
            unplaced.append(run_dir)
        else:
            runs.append(run)
    return runs, unplaced


def load_plan(root: Path) -> dict | None:
    path = root / PLAN_FILE
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError:
        return None


def _number(text) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def normalise(value) -> object:
    """A grid value's identity: 1e-4, 0.0001 and "1e-04" are the same learning rate."""
    number = _number(value)
    return number if number is not None else str(value)


def short_key(key: str) -> str:
    return key.removeprefix("schedule.")


# overrides whose effect the row and column labels already show, or that cannot change a result
_NOT_SPLIT = {"seed", "name", "experiment", "schedule", "task", "task.name", "resume"}
_NOT_SPLIT_PREFIXES = ("hydra", "logger", "trainer.progress", "trainer.num_workers")


def label_runs(runs: list[Run], plan: dict | None = None) -> None:
    """Set each run's column, schedule row and setting.

    Overrides that differ between runs split them: ``schedule.*`` keys (and any key a compare
    plan grids over) are the run's *setting* (a grid point of its schedule); the rest split task
    columns (``glue/rte [task.train_subset=500]``). Seeds are what a cell averages over.
    """
    grid_keys = {k for grid in ((plan or {}).get("grids") or {}).values() for k in grid}
    keys = {k for run in runs for k in run.overrides if k not in _NOT_SPLIT and not k.startswith(_NOT_SPLIT_PREFIXES)}
    varying = sorted(k for k in keys if len({run.overrides.get(k) for run in runs}) > 1)
    setting_keys = [k for k in sorted(keys | grid_keys) if k in grid_keys or (k.startswith("schedule.") and k in varying)]
    for run in runs:
        ov = run.overrides
        col = [f"{k}={ov[k]}" for k in varying if k not in setting_keys and k in ov]
        run.col = run.task + (f" [{', '.join(col)}]" if col else "")
        run.sched = run.schedule
        present = [k for k in setting_keys if k in ov]
        run.setting = tuple((k, normalise(ov[k])) for k in present)
        run.setting_label = ", ".join(f"{short_key(k)}={ov[k]}" for k in present)
    # presets that differ in more than schedule and task (two SAGE presets on one task) get rows
    presets: dict = defaultdict(set)
    for run in runs:
        presets[(run.sched, run.col, run.setting)].add(run.overrides.get("experiment"))
    if any(len(found) > 1 for found in presets.values()):
        for run in runs:
            experiment = run.overrides.get("experiment")
            if experiment:
                run.sched += f" ({experiment})"


def natural(text: str) -> list:
    """Sort key that orders numbers by value: 'n=500' before 'n=1000'."""
    return [
        (0, float(part), "") if part[:1].isdigit() else (1, 0.0, part)
        for part in re.findall(r"\d+(?:\.\d+)?(?:e-?\d+)?|\D+", text)
    ]


KNOWN_SCHEDULES = ("baseline", "sage", "dps", "dps_mix")


def schedule_key(label: str):
    """The papers' order (baseline first), others after, by name."""
    name = label.split(" (")[0]
    return (KNOWN_SCHEDULES.index(name) if name in KNOWN_SCHEDULES else 9, name, natural(label))
