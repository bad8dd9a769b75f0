"""The study of ``adaptune search``: its RDB storage with heartbeats, re-queueing stale trials, the
sampler, the objective a resumed study must keep, counts read from the storage, ``search.json``."""

from __future__ import annotations

import inspect
import json
import threading
import time
import warnings
from pathlib import Path

from adaptune.common.errors import ConfigError

from ..compare import _key
from .spec import BLOCK

MAX_RETRIES = 3
#: objective keys a resumed study must share with the spec
OBJECTIVE = ("experiment", "schedule", "seeds", "overrides", "extra", "params", "direction", "selection")


#: overrides that do not change what a run trains (as conf/hydra leaves them out of run directory names):
#: a resumed study may differ in them
NOT_OBJECTIVE = ("resume", "logger", "trainer.num_threads", "trainer.progress", "trainer.num_workers", "hydra")


def sqlite_url(sweep: Path) -> str:
    return f"sqlite:///{sweep / 'study.db'}"


def shown(url: str) -> str:
    """The URL without its password (for search.json and messages)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def requeue(study, trial) -> None:
    """Queue a trial that stopped without a result (its worker died or was interrupted) again, with
    its params and its directory, unless it was retried ``MAX_RETRIES`` times already."""
    retries = int(trial.user_attrs.get("retries", 0))
    if not trial.params or retries >= MAX_RETRIES:
        return
    attrs = {"retry_of": trial.user_attrs.get("retry_of", trial.number), "retries": retries + 1}
    if trial.user_attrs.get("trial_dir"):
        attrs["trial_dir"] = trial.user_attrs["trial_dir"]
    study.enqueue_trial(trial.params, user_attrs=attrs)


def open_storage(url: str, grace: int):
    """The RDB storage at ``url`` with heartbeats (a trial silent for ``grace`` s is stale, failed and
    re-queued); a one-line ConfigError for a bad URL, a missing driver or an unreachable database."""
    import optuna
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, IntegrityError, OperationalError, SQLAlchemyError

    try:
        parsed = make_url(url)
    except ArgumentError as err:
        raise ConfigError(f"--storage {url} is not a database URL (sqlite:///PATH.db, postgresql://..., mysql://...)") from err
    kwargs = {"heartbeat_interval": max(1, grace // 4), "grace_period": grace}
    # optuna >= 4.9 renamed the callback argument
    names = inspect.signature(optuna.storages.RDBStorage).parameters
    kwargs["heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in names else "failed_trial_callback"] = requeue
    if parsed.get_backend_name() == "sqlite":
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 120}}  # several workers on one file
        if parsed.database and parsed.database != ":memory:":
            try:
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise ConfigError(f"storage {shown(url)}: {err.strerror}: {parsed.database}") from err
    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return optuna.storages.RDBStorage(url, **kwargs)
        except ImportError as err:  # optuna re-raises a missing driver (psycopg2, pymysql, ...) as ImportError
            raise ConfigError(
                f"storage {shown(url)} needs a database driver for {parsed.drivername}, which is not "
                "installed (postgresql: pip install psycopg2-binary; mysql: pip install pymysql)"
            ) from err
        except (IntegrityError, OperationalError) as err:
            # workers starting together on a new database: another one is creating its tables
            if not isinstance(err, IntegrityError) and not any(w in str(err) for w in ("already exists", "locked")):
                raise ConfigError(f"storage {shown(url)}: {str(err).splitlines()[0]}") from err
            time.sleep(0.5 + attempt)
        except (SQLAlchemyError, OSError, ValueError) as err:
            raise ConfigError(f"storage {shown(url)}: {str(err).splitlines()[0]}") from err
    raise ConfigError(f"storage {shown(url)}: its tables could not be created")


def make_sampler(seed: int | None, startup: int):
    """TPE (multivariate, constant liar for concurrent workers), reseeded at each trial from
    ``seed`` and the trial's number: one worker's search is reproducible, and workers that share a
    study with the same seed do not propose the same points."""
    import optuna

    def tpe(s):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # multivariate / constant_liar are "experimental"
            return optuna.samplers.TPESampler(seed=s, n_startup_trials=startup, multivariate=True, constant_liar=True)

    class PerTrialSeed(optuna.samplers.BaseSampler):
        def __init__(self):
            self.inner = tpe(seed)

        def before_trial(self, study, trial):
            if seed is not None:
                self.inner = tpe((seed * 1_000_003 + trial.number) % 2**32)
            self.inner.before_trial(study, trial)

        def infer_relative_search_space(self, study, trial):
            return self.inner.infer_relative_search_space(study, trial)

        def sample_relative(self, study, trial, search_space):
            return self.inner.sample_relative(study, trial, search_space)

        def sample_independent(self, study, trial, param_name, param_distribution):
            return self.inner.sample_independent(study, trial, param_name, param_distribution)

        def after_trial(self, study, trial, state, values):
            self.inner.after_trial(study, trial, state, values)

        def reseed_rng(self):
            self.inner.reseed_rng()

    return PerTrialSeed()


def objective(spec: dict, extra: list[str], dev_selection: bool) -> dict:
    def kept(items):
        return [o for o in items if not any(_key(o) == k or _key(o).startswith((k + ".", k + "/")) for k in NOT_OBJECTIVE)]

    return {
        "experiment": spec["experiment"],
        "schedule": spec["schedule"],
        "seeds": spec["seeds"],
        "overrides": kept(spec["overrides"]),
        "extra": kept(extra),
        "params": spec["params"],
        "direction": spec["direction"],
        "selection": "dev" if dev_selection else "task.selection_split",
    }


def open_study(spec: dict, extra: list[str], args, url: str, dev_selection: bool):
    """(study, rdb storage, study id): the study created or resumed; ConfigError if it exists with
    another objective."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rdb = open_storage(url, args.grace_period)
    study = optuna.create_study(
        storage=rdb,
        study_name=args.study,
        direction=spec["direction"],
        sampler=make_sampler(spec["sampler_seed"], spec["startup_trials"]),
        load_if_exists=True,
    )
    if study.direction.name.lower() != spec["direction"]:
        raise ConfigError(
            f"study {args.study} in {shown(url)} is to {study.direction.name.lower()}, the spec "
            f"says {spec['direction']}; use another --study or storage"
        )
    wanted = json.loads(json.dumps(objective(spec, extra, dev_selection)))
    stored = study.user_attrs.get("objective")
    if stored is None:
        study.set_user_attr("objective", wanted)
        study.set_user_attr("spec_source", spec["source"])
    elif stored != wanted:
        differ = [k for k in OBJECTIVE if stored.get(k) != wanted.get(k)]
        raise ConfigError(
            f"study {args.study} in {shown(url)} searches another objective ({', '.join(differ)} "
            "differ from the spec's); use another --study or storage, or the spec it was started with"
        )
    return study, rdb, rdb.get_study_id_from_name(args.study)


def counts(rdb, study_id: int) -> dict[str, int]:
    """Trials per state, read from the storage (not from a worker's cache)."""
    from optuna.trial import TrialState

    out = {s.name: 0 for s in TrialState}
    for t in rdb.get_all_trials(study_id, deepcopy=False):
        out[t.state.name] += 1
    return out


def best(rdb, study_id: int, direction: str):
    from optuna.trial import TrialState

    done = rdb.get_all_trials(study_id, deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        return None
    return (max if direction == "maximize" else min)(done, key=lambda t: t.value)


class Heartbeat:
    """Record the trial's heartbeat every ``every`` s while it runs (storage errors are retried)."""

    def __init__(self, rdb, trial_id: int, every: int):
        self.rdb, self.trial_id, self.every = rdb, trial_id, every
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self.stop.wait(self.every):
            try:
                self.rdb.record_heartbeat(self.trial_id)
            except Exception:  # a busy database: the next beat tries again
                pass

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def fail_stale(study) -> None:
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optuna.storages.fail_stale_trials(study)


def write_summary(ctx) -> dict:
    """``<sweep>/search.json`` (atomically): the spec, the storage, the counts, the best trial."""
    from ..checkpoint import atomic_save_json

    top = best(ctx.rdb, ctx.study_id, ctx.spec["direction"])
    data = {
        "spec": ctx.spec,
        "extra": ctx.extra,
        "storage": shown(ctx.url),
        "study": ctx.args.study,
        "sweep": str(ctx.sweep),
        "n_trials": ctx.spec["n_trials"],
        "trials": counts(ctx.rdb, ctx.study_id),
        "selection": (
            f"the mean over seeds of the main metric's '{BLOCK}' value on "
            + (
                "task.selection_split (the official dev set is the report's 'test')"
                if not ctx.dev_selection
                else "the dev set (--allow-dev-selection)"
            )
        ),
        "best": None
        if top is None
        else {
            "number": top.number,
            "value": top.value,
            "params": top.params,
            "metric": top.user_attrs.get("metric"),
            "per_seed": top.user_attrs.get("per_seed"),
            "trial_dir": top.user_attrs.get("trial_dir"),
        },
        "dashboard": f"optuna-dashboard {shown(ctx.url)}",
    }
    atomic_save_json(data, ctx.sweep / "search.json")
    return data
