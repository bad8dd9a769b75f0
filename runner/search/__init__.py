"""``adaptune search NAME|PATH.yaml [hydra overrides] [--workers N] [--storage URL] [--study NAME]
[--dry-run]``: hyper-parameter search with Optuna (TPE) over one schedule's settings.

A search spec (a shipped preset ``conf/search/NAME.yaml``, or any YAML file of the user's, given by
its path) names the experiment preset, the schedule, the seeds, extra overrides, the search space
(``params: {schedule.lr: {low: 1e-4, high: 1e-3, log: true}, schedule.beta3: {choices: [0.75, 0.85]}}``)
and ``n_trials``. Each trial runs every seed as one Hydra multirun (a subprocess, its output in
``<sweep>/trial_NNN/trial.log``) into ``<sweep>/trial_NNN/seed_S/``, so ``adaptune report <sweep>``
reads the trials as the grid points of one schedule. Its value is the **mean over seeds** of the
task's main metric in each run's ``results.json`` ``final`` block.

- **(choice) The selection split is required.** The search optimises the metric of the slice that
  ``task.selection_split`` carves from the training set, never the official dev set that the
  report then shows as ``test``: a spec whose composed config has no ``task.selection_split`` is
  refused with one line, unless ``--allow-dev-selection`` (the papers' protocol: the best trial's
  dev number is then optimistically biased). Refusing rather than adding a default keeps the
  training data of every run what the spec says.
- **Storage**: ``sqlite:///<sweep>/study.db`` (``<sweep>`` = ``outputs/search/NAME`` or
  ``--sweep-dir``) unless ``--storage URL`` names another database (``postgresql://...``: several
  machines or SLURM jobs running the same command share one study); ``--study`` names the study
  (default: the spec's name). The study remembers the spec's objective (experiment, schedule,
  seeds, overrides, search space, direction) and refuses another one. Re-running the command
  resumes the study; ``n_trials`` may be raised to search on.
- **Exactly ``n_trials`` COMPLETE trials**, counted in the storage, with any number of workers
  (``--workers N`` local processes, or the same command on several machines). (choice) A worker
  starts a trial only while COMPLETE + RUNNING trials are fewer than ``n_trials`` (otherwise it
  waits for the running ones), and keeps a trial only if fewer than ``n_trials`` trials numbered
  before it are WAITING, RUNNING or COMPLETE (a worker that lost that race marks its trial FAIL,
  ``surplus``, before running anything). Trials are numbered by the storage, so no two workers can
  both keep the last slot.
- **Dead workers**: each running trial sends a heartbeat to the storage; one silent for the grace
  period (``--grace-period``, 120 s) is stale. (choice) A stale trial is marked FAIL and its params
  are queued again (``study.enqueue_trial``): the retry reuses its directory, so its finished seeds
  are read back and the others resume from their checkpoints (``resume=auto``). RUNNING trials
  are not failed at once when a worker starts, since with a shared storage they may be running on
  another machine: a re-run after ``kill -9`` runs other trials meanwhile and retries the killed
  one once it is stale (or waits for it, when it may be one of the last ``n_trials``). Kill a
  worker's process group, as SLURM does: a run left training on its own keeps its directory
  locked and its retry fails. Ctrl-C or SIGTERM marks the current trial FAIL (``interrupted``) and
  queues it again at once. A trial is retried at most ``MAX_RETRIES`` times.
- **Failed trials**: a trial whose runs diverged is PRUNED (TPE learns that region is bad); one
  with a missing or failed run is FAIL; the reason is the user attr ``pruned_reason`` /
  ``fail_reason``. The search goes on; a worker stops after ``MAX_FAILS_IN_ROW`` failed trials in
  a row (exit 1), and a run's config error stops it (exit 2).

Every trial has user attrs ``trial_dir``, ``run_dirs``, ``per_seed``, ``metric`` and ``command``;
``<sweep>/search.json`` holds the spec, the storage, the counts and the best trial so far.
The spec is read in ``spec.py``, the study kept in ``study.py``; the worker loop is here.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

from adaptune.common.errors import ConfigError

from ..compare import _names, fmt
from .spec import BLOCK, check_extra, command, composed_selection_split, distributions, is_number, load
from .study import Heartbeat, best, counts, fail_stale, make_sampler, open_study, requeue, shown, sqlite_url, write_summary

DEFAULT_GRACE = 120
MAX_FAILS_IN_ROW = 3


class SearchStopped(Exception):
    """A condition that stops a worker: (message, exit status)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def launch(cmd: list[str], log: Path) -> int:
    """Run one trial's multirun, its output appended to ``log``; its exit status. On Ctrl-C /
    SIGTERM (which reach the run too when sent to the process group) the run gets a minute to
    write its checkpoint."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        try:
            return proc.wait()
        except KeyboardInterrupt:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise


def score(trial_dir: Path, spec: dict) -> dict:
    """A trial's outcome from its runs' ``results.json``: ``state`` COMPLETE (``value`` = mean over
    seeds of the main metric's ``final`` value; degenerate runs count, as in the report), PRUNED
    (a run diverged) or FAIL (a run missing or without the metric), with ``reason``."""
    runs = {}
    for path in sorted(trial_dir.glob("*/results.json")):
        try:
            res = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(res, dict) and res.get("seed") in spec["seeds"]:
            runs[res["seed"]] = (path.parent, res)
    out = {"run_dirs": [str(runs[s][0]) for s in spec["seeds"] if s in runs], "per_seed": {}, "metric": None}
    problems, diverged = [], []
    for seed in spec["seeds"]:
        if seed not in runs:
            problems.append(f"seed {seed}: no results.json")
            continue
        run_dir, res = runs[seed]
        metric = res.get("main_metric")
        out["metric"] = out["metric"] or metric
        greater = bool(res.get("greater_is_better", True))
        if greater != (spec["direction"] == "maximize"):
            raise SearchStopped(
                f"the task's main metric {metric} is {'higher' if greater else 'lower'}-better; "
                f"set direction: {'maximize' if greater else 'minimize'} in {spec['source']}",
                2,
            )
        if res.get("status") == "diverged":
            diverged.append(f"seed {seed}: {res.get('degenerate') or 'diverged'}")
            continue
        value = (res.get(BLOCK) or {}).get(metric)
        if res.get("status") != "completed" or not is_number(value):
            problems.append(f"seed {seed}: status {res.get('status')}, {BLOCK} {metric}={value!r}")
            continue
        out["per_seed"][str(seed)] = float(value)
    if problems:
        return {**out, "state": "FAIL", "reason": "; ".join(problems + diverged)}
    if diverged:
        return {**out, "state": "PRUNED", "reason": "; ".join(diverged)}
    return {**out, "state": "COMPLETE", "value": statistics.fmean(out["per_seed"].values()), "reason": None}


def log_tail(log: Path, n: int = 5) -> str:
    try:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    errors = [line for line in lines if "error" in line.lower()]
    return " | ".join((errors or lines)[-n:])


def show_params(params: dict) -> str:
    return " ".join(f"{k}={fmt(params[k])}" for k in sorted(params))


class Context:
    def __init__(self, spec, extra, args, url, sweep, dev_selection):
        self.spec, self.extra, self.args, self.url, self.sweep = spec, extra, args, url, sweep
        self.dev_selection = dev_selection
        self.prefix = f"[worker {args.worker}] " if args.worker is not None else ""
        self.study = self.rdb = self.study_id = None

    def say(self, text: str, err: bool = False) -> None:
        print(self.prefix + text, file=sys.stderr if err else sys.stdout, flush=True)


def claim(ctx):
    """Ask for a trial (a re-queued one first) and keep it only if it is within ``n_trials``:
    fewer than n_trials trials numbered before it may still complete; else FAIL it (surplus)."""
    from optuna.trial import TrialState

    study, rdb, n = ctx.study, ctx.rdb, ctx.spec["n_trials"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "heartbeat is supposed to be used with Study.optimize": we beat ourselves
        trial = study.ask(distributions(ctx.spec))
    trial_id = rdb.get_trial_id_from_study_id_trial_number(ctx.study_id, trial.number)
    rdb.record_heartbeat(trial_id)  # from now on a dead worker's trial becomes stale
    live = (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE)
    ahead = sum(t.number < trial.number for t in rdb.get_all_trials(ctx.study_id, deepcopy=False, states=live))
    if ahead >= n:
        trial.set_user_attr(
            "fail_reason",
            f"surplus: {ahead} trials before it could complete the {n} (another worker took the last slot); nothing was run",
        )
        study.tell(trial, state=TrialState.FAIL)
        return None, None
    return trial, trial_id


def run_trial(ctx, trial) -> dict:
    params = trial.params
    trial_dir = Path(trial.user_attrs.get("trial_dir") or ctx.sweep / f"trial_{trial.number:03d}")
    cmd = command(ctx.spec, params, trial_dir, ctx.extra)
    trial.set_user_attr("trial_dir", str(trial_dir))
    trial.set_user_attr("command", shlex.join(cmd))
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    again = f", a retry of #{trial.user_attrs['retry_of']}" if "retry_of" in trial.user_attrs else ""
    ctx.say(f"trial #{trial.number} started{again}: {show_params(params)} (log: {trial_dir / 'trial.log'})")
    rc = launch(cmd, trial_dir / "trial.log")
    if rc == 2:  # a config error: every trial would hit it
        return {
            "state": "FAIL",
            "reason": f"config error (exit 2): {log_tail(trial_dir / 'trial.log', 1)}",
            "stop": 2,
            "run_dirs": [],
            "per_seed": {},
            "metric": None,
        }
    out = score(trial_dir, ctx.spec)
    if out["state"] == "FAIL" and rc != 0:
        out["reason"] = f"multirun exit {rc}: {out['reason']}; {log_tail(trial_dir / 'trial.log')}"
    return out


def finish(ctx, trial, out) -> bool:
    """Record the outcome; False when another worker had already failed the trial as stale."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    state = TrialState[out["state"]]
    try:
        for key in ("run_dirs", "per_seed", "metric"):
            trial.set_user_attr(key, out[key])
        if out["reason"]:
            trial.set_user_attr("pruned_reason" if state == TrialState.PRUNED else "fail_reason", out["reason"])
        frozen = ctx.study.tell(
            trial, out.get("value") if state == TrialState.COMPLETE else None, state=state, skip_if_finished=True
        )
    except (UpdateFinishedTrialError, ValueError):
        return False
    return frozen.state == state


def progress(ctx, trial, out) -> None:
    n = ctx.spec["n_trials"]
    c = counts(ctx.rdb, ctx.study_id)
    top = best(ctx.rdb, ctx.study_id, ctx.spec["direction"])
    best_text = f"best so far {top.value:.4f} (#{top.number})" if top else "no complete trial yet"
    params = show_params(trial.params)
    if out["state"] == "COMPLETE":
        ctx.say(
            f"trial {c['COMPLETE']} of {n} (#{trial.number}): {params} -> {out['value']:.4f} "
            f"({out['metric']}, mean of {len(out['per_seed'])} seeds; {best_text})"
        )
    else:
        kind = "pruned" if out["state"] == "PRUNED" else "failed"
        ctx.say(f"trial #{trial.number} {kind}: {params}: {out['reason']} ({best_text})", err=out["state"] == "FAIL")


def work(ctx) -> int:
    """One worker's loop (see the module docstring): 0 when the study holds n_trials COMPLETE trials."""
    from optuna.trial import TrialState

    n, poll = ctx.spec["n_trials"], min(5, max(1, ctx.args.grace_period // 4))
    fails, waiting = 0, False
    while True:
        fail_stale(ctx.study)  # RUNNING trials whose worker is silent: FAIL, re-queued (requeue)
        c = counts(ctx.rdb, ctx.study_id)
        if c["COMPLETE"] >= n:
            return 0
        if c["COMPLETE"] + c["RUNNING"] >= n:  # the last slots are taken: wait for their outcome
            if not waiting:
                ctx.say(
                    f"waiting: {c['RUNNING']} trial(s) running (here, elsewhere, or stale if silent for "
                    f"{ctx.args.grace_period} s) may complete the {n}"
                )
                waiting = True
            time.sleep(poll)
            continue
        waiting = False
        trial, trial_id = claim(ctx)
        if trial is None:
            time.sleep(poll)
            continue
        try:
            with Heartbeat(ctx.rdb, trial_id, ctx.rdb.get_heartbeat_interval()):
                out = run_trial(ctx, trial)
        except KeyboardInterrupt:
            from optuna.exceptions import UpdateFinishedTrialError

            try:  # (a trial already failed as stale was re-queued then)
                trial.set_user_attr("fail_reason", "interrupted (Ctrl-C / SIGTERM); queued again")
                requeue(ctx.study, ctx.study.tell(trial, state=TrialState.FAIL))
            except (UpdateFinishedTrialError, ValueError):
                pass
            write_summary(ctx)
            ctx.say(f"interrupted: trial #{trial.number} is queued again; run the same command to resume", err=True)
            return 130
        except SearchStopped as err:
            trial.set_user_attr("fail_reason", str(err))
            ctx.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            raise
        if not finish(ctx, trial, out):
            ctx.say(
                f"trial #{trial.number} had been failed as stale meanwhile (no heartbeat for "
                f"{ctx.args.grace_period} s); its retry reads its runs back",
                err=True,
            )
            continue
        progress(ctx, trial, out)
        write_summary(ctx)
        if out.get("stop"):
            raise SearchStopped(f"trial #{trial.number} stopped on a config error: {out['reason']}", 2)
        fails = fails + 1 if out["state"] == "FAIL" else 0
        if fails >= MAX_FAILS_IN_ROW:
            raise SearchStopped(f"{fails} trials in a row failed (see their trial.log); stopping this worker", 1)


# ------------------------------------------------------------------------------------- the command


def worker_commands(args, url: str, sweep: Path, dev_selection: bool) -> list[list[str]]:
    """``--workers N``: the N worker processes (this command with one worker each, on one study)."""
    base = [
        sys.executable,
        "-m",
        "adaptune",
        "search",
        args.name,
        *args.overrides,
        "--storage",
        url,
        "--study",
        args.study,
        "--sweep-dir",
        str(sweep),
        "--grace-period",
        str(args.grace_period),
    ]
    if dev_selection:
        base.append("--allow-dev-selection")
    return [[*base, "--worker", str(i)] for i in range(args.workers)]


def run_workers(ctx, cmds: list[list[str]]) -> int:
    procs = [subprocess.Popen(cmd) for cmd in cmds]
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:  # the workers got the Ctrl-C too: they queue their trials again
        codes = [p.wait() for p in procs]
        return 130
    bad = [c for c in codes if c != 0]
    return max(bad, key=lambda c: (c == 2, c)) if bad else 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adaptune search",
        description=(
            "Hyper-parameter search with Optuna (TPE) over one schedule's settings, each trial scored on the mean over "
            "seeds of the main metric on task.selection_split; resumable, several workers share one study."
        ),
    )
    parser.add_argument(
        "name", metavar="NAME|PATH.yaml", help=f"a preset ({', '.join(_names('search'))}) or the path of a search spec"
    )
    parser.add_argument("overrides", nargs="*", help="extra hydra overrides for every run")
    parser.add_argument("--workers", type=int, default=1, metavar="N", help="local worker processes (default 1)")
    parser.add_argument(
        "--storage", metavar="URL", help="an Optuna RDB URL shared by all workers (default sqlite:///<sweep>/study.db)"
    )
    parser.add_argument("--study", metavar="NAME", help="the study's name (default: the spec's name)")
    parser.add_argument("--sweep-dir", type=Path, metavar="DIR", help="where trials go (default outputs/search/NAME)")
    parser.add_argument(
        "--grace-period",
        type=int,
        default=DEFAULT_GRACE,
        metavar="S",
        help=f"a running trial without heartbeat for S seconds is stale (default {DEFAULT_GRACE})",
    )
    parser.add_argument(
        "--allow-dev-selection", action="store_true", help="search on the dev set when the config has no task.selection_split"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the storage, the study and the first trial's command; run nothing"
    )
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    return parser


def _first_command(spec: dict, extra: list[str], sweep: Path) -> list[str]:
    """The command of trial 0 as a fresh study would sample it (in memory: a dry run writes nothing)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction=spec["direction"], sampler=make_sampler(spec["sampler_seed"], spec["startup_trials"]))
    trial = study.ask(distributions(spec))
    return command(spec, trial.params, sweep / f"trial_{trial.number:03d}", extra)


def _sigterm(*_):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)
    try:
        spec = load(args.name)
        check_extra(spec, args.overrides)
        if args.workers < 1:
            raise ConfigError(f"--workers={args.workers}: expected a positive integer")
        if args.grace_period < 2:
            raise ConfigError(f"--grace-period={args.grace_period}: expected at least 2 seconds")
        args.study = args.study or spec["name"]
        sweep = args.sweep_dir or Path("outputs") / "search" / spec["name"]
        url = args.storage or sqlite_url(sweep)
        # a worker started by --workers: its parent checked, and passes --allow-dev-selection only when in force
        split = composed_selection_split(spec, args.overrides) if args.worker is None else not args.allow_dev_selection
        if not split and not args.allow_dev_selection:
            raise ConfigError(
                f"{spec['source']}: the runs have no task.selection_split, so the search would select "
                "on the dev set the report shows; add e.g. task.selection_split=0.1 to overrides, or "
                "pass --allow-dev-selection"
            )
    except ConfigError as err:
        print(f"adaptune search: error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(f"storage: {shown(url)}\nstudy: {args.study}\nsweep: {sweep}\nn_trials: {spec['n_trials']}")
        print(f"first trial: {shlex.join(_first_command(spec, args.overrides, sweep))}")
        return 0
    ctx = Context(spec, args.overrides, args, url, sweep, dev_selection=not split)
    old = signal.signal(signal.SIGTERM, _sigterm) if threading.current_thread() is threading.main_thread() else None
    try:
        ctx.study, ctx.rdb, ctx.study_id = open_study(spec, args.overrides, args, url, ctx.dev_selection)
        if args.worker is not None:
            return work(ctx)
        sweep.mkdir(parents=True, exist_ok=True)
        write_summary(ctx)
        c = counts(ctx.rdb, ctx.study_id)
        ctx.say(
            f"adaptune search {spec['name']}: {spec['n_trials']} trials x {len(spec['seeds'])} seeds of "
            f"{spec['schedule']}, study {args.study} in {shown(url)} ({c['COMPLETE']} complete so far), "
            f"trials in {sweep}"
        )
        if not split:
            ctx.say("selecting on the dev set (--allow-dev-selection): the best trial's dev numbers are biased upwards")
        code = run_workers(ctx, worker_commands(args, url, sweep, ctx.dev_selection)) if args.workers > 1 else work(ctx)
    except ConfigError as err:
        print(f"adaptune search: error: {err}", file=sys.stderr)
        return 2
    except SearchStopped as err:
        ctx.say(f"adaptune search: error: {err}", err=True)
        return err.code
    except KeyboardInterrupt:
        return 130
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
    data = write_summary(ctx)
    top = data["best"]
    if top:
        ctx.say(
            f"\nbest trial #{top['number']}: {show_params(top['params'])} -> {top['value']:.4f} "
            f"({top['metric']}; per seed {top['per_seed']}); runs in {top['trial_dir']}"
        )
    ctx.say(
        f"{data['trials']['COMPLETE']} of {spec['n_trials']} trials complete; wrote {sweep / 'search.json'}\n"
        f"  adaptune report {sweep}\n  optuna-dashboard {shown(url)}   (pip install optuna-dashboard)"
    )
    return code
