"""``adaptune compare NAME|PATH.yaml [hydra overrides] [--dry-run]``: compare schedules the papers' way.

A compare spec (a shipped preset ``conf/compare/NAME.yaml``, or any YAML file of the user's, given
by its path) gives each schedule its own grid (``grids: {sage: {schedule.lr: [...],
schedule.beta3: [...]}, ...}``), the seeds every grid point runs over, the experiment preset and
extra overrides. For each schedule one Hydra multirun is launched (as a subprocess, its output
streamed) into the one sweep directory ``outputs/multirun/NAME``; then ``adaptune report`` selects
each schedule's setting per task on the dev metric (or on the selection slice under
``task.selection_split``) and compares the schedules seed by seed. Runs already finished are
skipped on a re-run (``resume=auto``), so an interrupted comparison is resumed by running it again.
The plan (grids, seeds, commands) is written to ``<sweep>/compare.json`` for the report.
"""
from __future__ import annotations

import argparse
import itertools
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from adaptune.common.errors import ConfigError

from adaptune.conf import CONFIG_DIR as CONF
KEYS = ("experiment", "seeds", "overrides", "grids")
# chosen by compare itself: a grid or an extra override may not set them
RESERVED = ("seed", "schedule", "name", "experiment", "hydra.sweep.subdir")


def _names(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def fmt(value) -> str:
    """A grid value as a Hydra override value: 2e-05 -> '2e-5', 0.00025 -> '2.5e-4', 0.75 -> '0.75'."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if value != 0 and abs(value) < 1e-3:
            mantissa, exp = f"{value:.6e}".split("e")
            return f"{mantissa.rstrip('0').rstrip('.')}e{int(exp)}"
        return f"{value:.12g}"
    return str(value)


def _key(item: str) -> str:
    return item.partition("=")[0].lstrip("+~")


def _check_override(item, where: str) -> str:
    if not isinstance(item, str) or "=" not in item:
        raise ConfigError(f"{where}: {item!r} is not a hydra override (key=value)")
    if _key(item) in RESERVED:
        raise ConfigError(f"{where}: {_key(item)} is set by adaptune compare (the seeds, schedules "
                          "and experiment come from the compare file's seeds, grids and experiment)")
    return item


def _is_path(name: str) -> bool:
    """A spec argument that names a file (``my_grid.yaml``, ``specs/x.yml``, ``./x``) rather than a preset."""
    return name.endswith((".yaml", ".yml")) or "/" in name or "\\" in name


def locate(name: str) -> tuple[Path, str, str]:
    """(file, name, how to cite it in messages) of a compare spec: a shipped preset NAME, or a
    user's YAML file by its path (its name is the file's stem); ConfigError (one line) if neither."""
    if _is_path(name):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ConfigError(f"compare spec {name} does not exist (a YAML file, or one of the presets: "
                              f"{', '.join(_names('compare'))})")
        stem = path.stem
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", stem):
            raise ConfigError(f"compare spec {name}: its file name is the sweep's name and may only hold "
                              "letters, digits, '_', '.' and '-'")
        return path, stem, str(name)
    path = CONF / "compare" / f"{name}.yaml"
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or not path.is_file():
        raise ConfigError(f"conf/compare/{name}.yaml does not exist; allowed names: "
                          f"{', '.join(_names('compare'))} (or the path of a YAML file)")
    return path, name, f"conf/compare/{name}.yaml"


def load(name: str) -> dict:
    """The validated compare spec: the preset ``conf/compare/NAME.yaml`` or the YAML file at a
    path; ConfigError (one line) if not."""
    path, name, where = locate(name)
    from omegaconf import OmegaConf

    try:
        spec = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as err:
        raise ConfigError(f"{where}: {str(err).splitlines()[0]}") from err
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected a mapping with keys {', '.join(KEYS)}")
    for key in spec:
        if key not in KEYS:
            raise ConfigError(f"{where}: unknown key '{key}'; allowed: {', '.join(KEYS)}")
    experiment = spec.get("experiment")
    if experiment is not None and experiment not in _names("experiment"):
        raise ConfigError(f"{where}: experiment={experiment} is unknown; allowed: {', '.join(_names('experiment'))}")
    seeds = spec.get("seeds")
    if (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise ConfigError(f"{where}: seeds: expected a non-empty list of distinct integers, got {seeds!r}")
    overrides = spec.get("overrides") or []
    if not isinstance(overrides, list):
        raise ConfigError(f"{where}: overrides: expected a list of key=value, got {overrides!r}")
    overrides = [_check_override(o, f"{where}: overrides") for o in overrides]
    grids = spec.get("grids")
    if not isinstance(grids, dict) or not grids:
        raise ConfigError(f"{where}: grids: expected a mapping of schedule -> {{key: [values]}}")
    schedules = _names("schedule")
    for sched, grid in grids.items():
        if sched not in schedules:
            raise ConfigError(f"{where}: grids.{sched}: unknown schedule; allowed: {', '.join(schedules)}")
        if not isinstance(grid, dict) or not grid:
            raise ConfigError(f"{where}: grids.{sched}: expected a mapping of key -> list of values")
        for key, values in grid.items():
            _check_override(f"{key}=x", f"{where}: grids.{sched}")
            if (not re.fullmatch(r"[A-Za-z_][\w.]*", key) or not isinstance(values, list) or not values
                    or not all(isinstance(v, (int, float, str, bool)) for v in values)):
                raise ConfigError(f"{where}: grids.{sched}.{key}: expected a non-empty list of values")
    return {"name": name, "source": where, "experiment": experiment, "seeds": seeds, "overrides": overrides,
            "grids": {s: {k: [fmt(v) for v in vals] for k, vals in g.items()} for s, g in grids.items()}}


def commands(spec: dict, extra: list[str] = ()) -> list[tuple[str, list[str]]]:
    """(schedule, command) of each schedule's multirun."""
    out = []
    for sched, grid in spec["grids"].items():
        cmd = [sys.executable, "-m", "adaptune", "-m"]
        if spec["experiment"]:
            cmd.append(f"experiment={spec['experiment']}")
        cmd.append(f"schedule={sched}")
        cmd += [f"{key}={','.join(grid[key])}" for key in sorted(grid)]
        cmd += ["seed=" + ",".join(str(s) for s in spec["seeds"]), f"name={spec['name']}"]
        out.append((sched, cmd + list(spec["overrides"]) + list(extra)))
    return out


def sweep_dir(spec: dict, extra: list[str] = ()) -> Path:
    """Where the runs go: hydra.sweep.dir if overridden, else conf/hydra's outputs/multirun/NAME."""
    for item in [*spec["overrides"], *extra]:
        if _key(item) == "hydra.sweep.dir":
            return Path(item.partition("=")[2])
    return Path("outputs") / "multirun" / spec["name"]


def _check_extra(spec: dict, extra: list[str]) -> None:
    for item in extra:
        _check_override(item, "extra override")
        owners = [s for s, g in spec["grids"].items() if _key(item) in g]
        if owners:
            raise ConfigError(f"{_key(item)} is a grid axis of {', '.join(owners)} in "
                              f"{spec['source']} (grids); edit the grid there")


def n_runs(spec: dict) -> int:
    points = sum(len(list(itertools.product(*g.values()))) for g in spec["grids"].values())
    return points * len(spec["seeds"])


def finished_runs(sweep: Path) -> int:
    """Runs of the sweep with a final ``results.json`` (completed or diverged)."""
    done = 0
    for path in sweep.glob("*/results.json"):
        try:
            done += json.loads(path.read_text()).get("status") in ("completed", "diverged")
        except (OSError, ValueError):
            pass   # being written (atomically replaced): counted on the next look
    return done


class Progress:
    """Prints ``run k of N done`` and an ETA from the runs this invocation finished, watching the
    sweep directory from a thread while the multiruns run (runs skipped as already finished count
    as done, not towards the rate)."""

    def __init__(self, sweep: Path, total: int, every: float = 5.0, out=None):
        import threading

        self.sweep, self.total, self.every, self.out = sweep, total, every, out or sys.stdout
        self.start_done = self.last = finished_runs(sweep)
        self.t0 = time.time()
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def line(self, done: int) -> str:
        text = f"adaptune compare: run {done} of {self.total} done"
        new = done - self.start_done
        if new > 0 and done < self.total:
            eta = (time.time() - self.t0) / new * (self.total - done)
            text += f", ETA {eta / 60:.0f} min" if eta >= 90 else f", ETA {eta:.0f} s"
        return text

    def _watch(self) -> None:
        while not self.stop_event.wait(self.every):
            self.poll()

    def poll(self) -> None:
        done = finished_runs(self.sweep)
        if done != self.last:
            self.last = done
            print(self.line(done), file=self.out, flush=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        self.thread.join()
        self.poll()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adaptune compare", description=__doc__.splitlines()[0])
    parser.add_argument("name", metavar="NAME|PATH.yaml",
                        help=f"a preset ({', '.join(_names('compare'))}) or the path of a compare spec")
    parser.add_argument("overrides", nargs="*", help="extra hydra overrides for every run")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_intermixed_args(argv)
    try:
        spec = load(args.name)
        _check_extra(spec, args.overrides)
    except ConfigError as err:
        print(f"adaptune compare: error: {err}", file=sys.stderr)
        return 2
    plan = commands(spec, args.overrides)
    sweep = sweep_dir(spec, args.overrides)
    if args.dry_run:
        for _, cmd in plan:
            print(shlex.join(cmd))
        print(f"adaptune report {sweep}")
        return 0
    sweep.mkdir(parents=True, exist_ok=True)
    (sweep / "compare.json").write_text(json.dumps(
        {**spec, "extra": args.overrides, "commands": [cmd for _, cmd in plan]}, indent=1) + "\n")
    print(f"adaptune compare {spec['name']}: {len(plan)} schedules, {n_runs(spec)} runs into {sweep}",
          flush=True)
    failed = []
    with Progress(sweep, n_runs(spec)):
        for k, (sched, cmd) in enumerate(plan, 1):
            print(f"\n== [{k}/{len(plan)}] {sched}: {shlex.join(cmd)}", flush=True)
            rc = subprocess.run(cmd).returncode
            if rc == 2:  # a config error: every schedule would hit it
                print(f"adaptune compare: error: the {sched} multirun stopped on a config error (above)",
                      file=sys.stderr)
                return 2
            if rc != 0:
                failed.append(f"{sched} (exit {rc})")
    from adaptune.runner.report import main as report_main

    print(flush=True)
    code = report_main([str(sweep)])
    if failed:
        print(f"\nadaptune compare: these multiruns stopped early (their remaining grid points show as "
              f"missing; run the command again to resume): {', '.join(failed)}", file=sys.stderr)
        return 1
    return code
