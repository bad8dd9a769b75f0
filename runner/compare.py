"""``adaptune compare NAME|PATH.yaml [hydra overrides] [--dry-run] [--nproc-per-node N]``: compare
schedules the papers' way.

A compare spec (a shipped preset ``conf/compare/NAME.yaml``, or any YAML file of the user's, given
by its path) gives each schedule its own grid (``grids: {sage: {schedule.lr: [...],
schedule.beta3: [...]}, ...}``), the seeds every grid point runs over, the experiment preset and
extra overrides. The comparison is **one** Hydra multirun (a subprocess, its output streamed) into
the sweep directory ``outputs/multirun/NAME``: each grid point of each schedule is written as a
config of the group ``compare_point`` (``<sweep>/.compare/compare_point/<schedule>_<hash>.yaml``: the
schedule choice and its grid values), and the multirun sweeps ``+compare_point=...`` x ``seed=...``, so
a parallel launcher (``hydra/launcher=joblib``, ``submitit_slurm``) gets every run of every schedule
at once. Run directories are named as if each point's keys had been given on the command line
(``schedule=sage,schedule.lr=2.5e-4,seed=1,...``). Then ``adaptune report`` selects each schedule's
setting per task on the dev metric (or on the selection slice under ``task.selection_split``) and
compares the schedules seed by seed. Runs already finished are skipped on a re-run
(``resume=auto``), so an interrupted comparison is resumed by running it again. The plan (grids,
seeds, the command, the points) is written to ``<sweep>/compare.json`` for the report.

**(choice)** ``--nproc-per-node N`` wraps the multirun in ``torchrun --standalone``: the N processes
walk the sweep together, one DDP run after the other (the process group is formed and destroyed per
run). On SLURM each job gets its tasks instead (``hydra.launcher.tasks_per_node=N``).
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

from . import specs

KEYS = ("experiment", "seeds", "overrides", "grids")
# chosen by compare itself: a grid or an extra override may not set them
RESERVED = ("seed", "schedule", "name", "experiment", "hydra.sweep.subdir", "hydra.searchpath", "compare_point")


def _names(group: str) -> list[str]:
    return specs.names(CONF, group)


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


_key = specs.override_key


def _check_override(item, where: str) -> str:
    return specs.check_override(
        item,
        where,
        RESERVED,
        "adaptune compare (the seeds, schedules and experiment come from the compare file's seeds, grids and experiment)",
    )


def locate(name: str) -> tuple[Path, str, str]:
    """(file, name, how to cite it in messages) of a compare spec: a shipped preset NAME, or a
    user's YAML file by its path (its name is the file's stem); ConfigError (one line) if neither."""
    return specs.locate(name, CONF, "compare", "compare spec")


def load(name: str) -> dict:
    """The validated compare spec: the preset ``conf/compare/NAME.yaml`` or the YAML file at a
    path; ConfigError (one line) if not."""
    path, name, where = locate(name)
    spec = specs.read(path, where, KEYS)
    experiment = specs.experiment(spec, where, CONF)
    seeds = specs.seeds(spec, where)
    overrides = specs.overrides(spec, where, _check_override)
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
            if (
                not re.fullmatch(r"[A-Za-z_][\w.]*", key)
                or not isinstance(values, list)
                or not values
                or not all(isinstance(v, (int, float, str, bool)) for v in values)
            ):
                raise ConfigError(f"{where}: grids.{sched}.{key}: expected a non-empty list of values")
    return {
        "name": name,
        "source": where,
        "experiment": experiment,
        "seeds": seeds,
        "overrides": overrides,
        "grids": {s: {k: [fmt(v) for v in vals] for k, vals in g.items()} for s, g in grids.items()},
    }


#: where a sweep keeps its grid points as configs (a Hydra search path), and their config group
POINTS_DIR, POINT_GROUP = ".compare", "compare_point"


def point_id(items: list[str]) -> str:
    """A grid point's config name: its schedule and a hash of its items (``sage_3f2a91c0``), so an
    id always means the same point, also after the spec's grids change."""
    import hashlib

    return f"{items[0].partition('=')[2]}_{hashlib.sha1(','.join(items).encode()).hexdigest()[:8]}"


def points(spec: dict) -> list[tuple[str, str, list[str]]]:
    """(id, schedule, ``key=value`` items) of every grid point, schedule by schedule in the spec's
    order, each schedule's axes in sorted key order."""
    out = []
    for sched, grid in spec["grids"].items():
        keys = sorted(grid)
        for values in itertools.product(*(grid[k] for k in keys)):
            items = [f"schedule={sched}", *(f"{k}={v}" for k, v in zip(keys, values))]
            out.append((point_id(items), sched, items))
    return out


def _split_items(text: str) -> list[str]:
    """Hydra's override_dirname back into its ``key=value`` items (commas inside [], {} or quotes
    belong to a value)."""
    items, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [item for item in items if item]


def point_subdir(override_dirname: str, point_items: str) -> str:
    """``${compare_subdir:...}``: a grid point's run directory, named as if its items had been given
    on the command line (``schedule=sage,schedule.lr=2.5e-4,seed=1,...``) instead of ``+compare_point=p003``."""
    from .dirnames import dirname

    own = [i for i in _split_items(override_dirname) if _key(i) != POINT_GROUP]
    return dirname(",".join(sorted(own + _split_items(point_items))))


def write_points(spec: dict, sweep: Path) -> Path:
    """Write each grid point as a config of the group ``compare_point`` under ``<sweep>/.compare``
    (the multirun's search path); returns that directory. Rewritten on each invocation."""
    from omegaconf import OmegaConf

    from .checkpoint import atomic_write

    root = sweep / POINTS_DIR
    group = root / POINT_GROUP
    group.mkdir(parents=True, exist_ok=True)
    every = points(spec)
    for pid, sched, items in every:
        values = OmegaConf.to_container(OmegaConf.from_dotlist(items[1:]))
        joined = ",".join(items).replace("\\", "\\\\").replace("'", "\\'")
        body = OmegaConf.to_yaml(
            OmegaConf.create(
                {**values, "hydra": {"sweep": {"subdir": f"${{compare_subdir:${{hydra.job.override_dirname}},'{joined}'}}"}}}
            )
        )
        text = (
            f"# @package _global_\n# adaptune compare {spec['name']}: grid point {pid} of {len(every)} "
            f"(written by adaptune compare)\n"
            f"defaults:\n  - override /schedule: {sched}\n{body}"
        )
        atomic_write(group / f"{pid}.yaml", lambda f, text=text: f.write(text.encode()))
    return root


def command(spec: dict, extra: list[str] = (), sweep: Path | None = None, nproc: int = 1) -> list[str]:
    """The one multirun of a comparison: every schedule's grid points (configs written by
    :func:`write_points`) x the seeds, handed to the launcher together; ``torchrun`` around it
    when each run is to use ``nproc`` processes."""
    sweep = sweep if sweep is not None else sweep_dir(spec, extra)
    cmd = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "adaptune", "-m"]
        if nproc > 1
        else [sys.executable, "-m", "adaptune", "-m"]
    )
    if spec["experiment"]:
        cmd.append(f"experiment={spec['experiment']}")
    cmd.append(f"hydra.searchpath=[file://{(sweep / POINTS_DIR).resolve()}]")
    cmd.append(f"+{POINT_GROUP}=" + ",".join(pid for pid, _, _ in points(spec)))
    cmd += ["seed=" + ",".join(str(s) for s in spec["seeds"]), f"name={spec['name']}"]
    return cmd + list(spec["overrides"]) + list(extra)


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
            raise ConfigError(
                f"{_key(item)} is a grid axis of {', '.join(owners)} in {spec['source']} (grids); edit the grid there"
            )


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
            pass  # being written (atomically replaced): counted on the next look
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
    parser.add_argument(
        "name", metavar="NAME|PATH.yaml", help=f"a preset ({', '.join(_names('compare'))}) or the path of a compare spec"
    )
    parser.add_argument("overrides", nargs="*", help="extra hydra overrides for every run")
    parser.add_argument("--dry-run", action="store_true", help="print the command and the grid points, run nothing")
    parser.add_argument("--seeds", metavar="S1,S2,...", help="run these seeds instead of the spec's")
    parser.add_argument(
        "--nproc-per-node",
        type=int,
        default=1,
        metavar="N",
        help="train each run with N processes (torchrun, DDP; the local launcher runs one at a time)",
    )
    args = parser.parse_intermixed_args(argv)
    try:
        spec = load(args.name)
        _check_extra(spec, args.overrides)
        if args.seeds:
            try:
                seeds = [int(s) for s in args.seeds.split(",")]
            except ValueError:
                raise ConfigError(f"--seeds={args.seeds}: expected integers separated by commas") from None
            if len(set(seeds)) != len(seeds):
                raise ConfigError(f"--seeds={args.seeds}: a seed is repeated")
            spec["seeds"] = seeds
        if args.nproc_per_node < 1:
            raise ConfigError(f"--nproc-per-node={args.nproc_per_node}: expected a positive integer")
        launcher = [o for o in args.overrides + spec["overrides"] if _key(o) == "hydra/launcher"]
        if args.nproc_per_node > 1 and launcher:
            raise ConfigError(
                f"--nproc-per-node and {launcher[0]} do not combine: torchrun starts the runs "
                "one after the other; with SLURM give each job several tasks instead "
                "(hydra.launcher.tasks_per_node=N, docs: Scaling out)"
            )
    except ConfigError as err:
        print(f"adaptune compare: error: {err}", file=sys.stderr)
        return 2
    sweep = sweep_dir(spec, args.overrides)
    cmd = command(spec, args.overrides, sweep, args.nproc_per_node)
    if args.dry_run:
        print(shlex.join(cmd))
        for pid, _, items in points(spec):
            print(f"#   {POINT_GROUP}={pid}: {' '.join(items)}")
        print(f"adaptune report {sweep}")
        return 0
    from adaptune.runner.report.collect import load_plan

    sweep.mkdir(parents=True, exist_ok=True)
    write_points(spec, sweep)
    known = (load_plan(sweep) or {}).get("points") or {}  # points of earlier invocations stay readable
    (sweep / "compare.json").write_text(
        json.dumps(
            {
                **spec,
                "extra": args.overrides,
                "command": cmd,
                "points": {**known, **{pid: items for pid, _, items in points(spec)}},
            },
            indent=1,
        )
        + "\n"
    )
    print(
        f"adaptune compare {spec['name']}: {len(spec['grids'])} schedules, {len(points(spec))} grid points, "
        f"{n_runs(spec)} runs in one sweep into {sweep}\n{shlex.join(cmd)}",
        flush=True,
    )
    with Progress(sweep, n_runs(spec)):
        rc = subprocess.run(cmd).returncode
    if rc == 2:  # a config error (printed above by the run that hit it)
        print("adaptune compare: error: the sweep stopped on a config error (above)", file=sys.stderr)
        return 2
    from adaptune.runner.report import main as report_main

    print(flush=True)
    code = report_main([str(sweep)])
    if rc != 0:
        print(
            f"\nadaptune compare: the sweep stopped early (exit {rc}; its remaining grid points show as "
            "missing; run the command again to resume)",
            file=sys.stderr,
        )
        return 1
    return code
