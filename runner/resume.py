"""Resuming only what was configured the same way: compare a run's config with the saved one.

A resumed run restores the optimizer with ``load_state_dict``, which keeps the *saved* parameter
group settings (lr, betas, SAGE's beta3, ...), and ``resume=auto`` returns a finished run's
``results.json`` as it is. Either would silently ignore an edited preset. So before any model is
built, :func:`check_resume` compares the composed config with the one saved in
``checkpoints/last.pt`` (key ``"config"``) or in ``results.json`` (key ``"config"``), both the
resolved plain dict of the whole config, and raises a one-line :class:`ConfigError` naming the
keys that differ.

What may change on resume (:data:`HARMLESS`): keys that change neither the parameters nor the
numbers in ``results.json``, only how the run is labelled, shown, logged or fed:

- ``resume``: how this invocation treats the directory, not what it trains.
- ``name``: the run directory's parent and the W&B group; the directory is already chosen.
- ``logger`` and everything under it (kind, mode, project, entity, group, tags): where metrics
  go, never what they are.
- ``trainer.num_threads``: torch intra-op threads on CPU. (choice) Intra-op reductions may split
  differently with another thread count, so the last bits of a float can differ; Hydra already
  keeps it out of run-directory names as not changing what is trained, and a resumed run must be
  able to move to a machine with another core count, so it is allowed.
- ``trainer.progress``: the tqdm bar.
- ``trainer.num_workers``: DataLoader processes preparing batches ahead; a batch depends only on
  its plan and the loader leaves the global RNG alone, so batches are identical (the loop's
  bit-identical resume test covers 0 vs 2 workers).
- ``trainer.log_every``: (choice) how often the mean training loss is logged; the updates are
  the same, only the granularity of the ``train_loss`` curve changes from there on.
- ``trainer.save_every``: (choice) how often ``last.pt`` is written; resuming restores the exact
  state whatever the interval, so neither parameters nor results change.
- ``trainer.keep_previous``: whether ``previous.pt`` is deleted once the run completes; nothing
  the run trains or reports depends on it.
- ``hydra`` and everything under it: launcher, sweeper and output settings (it is normally absent
  from the job's config anyway).
- ``presets``: (choice) values the other sections read through interpolation
  (``${oc.select:presets.x}``, ``${preset:x}``); what they set is compared where it is used
  (``trainer.max_steps``, ``schedule.update_ratio``), and an entry no key of this run reads (a
  DPS arm's setting in a baseline run) changes nothing.
- the display and bookkeeping settings of the built-in callbacks (:data:`HARMLESS_CALLBACK_SETTINGS`):
  ``progress`` and ``every`` of ``adaptune.runner.callbacks.Logging`` (they follow ``trainer.progress`` and
  ``trainer.log_every``) and ``every`` of ``adaptune.runner.callbacks.Checkpoint`` (``trainer.save_every``).
  (choice) They are matched by the entry's ``_target_``, not by its name, and only when the saved
  and the new entry have the same ``_target_``: ``callbacks.logging.every`` of a user's own class
  may mean anything, so it stays significant. A callback added, removed or turned off
  (``callbacks.x=null``), a changed ``_target_`` and every setting of other callbacks (notably
  ``adaptune.runner.callbacks.Evaluation``'s ``every``) are significant.

Everything else is significant (choice: when unsure, a key is significant, because a false alarm
costs a ``resume=false`` while a missed change silently mixes two configurations), notably:

- ``trainer.device`` and ``trainer.precision``: numerics differ between devices and dtypes.
- ``trainer.eval_every``, ``trainer.eval_batch_size``, ``task.eval_subset``: they change which
  evaluations exist, the dev numbers, and so the best step and ``best.pt``.
- ``task.data_dir``: another path may hold other data.
- ``schedule.label``: only a report label, but it is part of ``results.json``.
- any key added or removed (a new preset key, a key of an older version), except the schedule
  section of a config saved before each schedule had its own schema (one flat schema of every
  schedule's keys; DPS's ``drop_p`` was ``p``, ChildTuning's ``keep_p`` ``reserve_p``, Mixout's
  ``mix_p`` ``mixout_p``): :func:`upgrade_saved` renames those keys and drops the ones the saved
  run's schedule did not read (they did not change what it trained), so such runs still resume.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Mapping

from adaptune.common.errors import ConfigError

log = logging.getLogger("adaptune")

#: Dotted keys (and their sub-keys) that may differ between the saved and the new config.
#: A ``*`` segment matches any one key segment.
HARMLESS: tuple[str, ...] = (
    "resume",
    "name",
    "logger",
    "trainer.num_threads",
    "trainer.progress",
    "trainer.num_workers",
    "trainer.log_every",
    "trainer.save_every",
    "trainer.keep_previous",
    "task.feature_cache",  # the tokenized-feature cache: the same features, read or rebuilt
    "task.feature_cache_dir",
    "hydra",
    "presets",
)

#: Settings of built-in callbacks (by ``_target_``) that only change display or bookkeeping.
HARMLESS_CALLBACK_SETTINGS: dict[str, tuple[str, ...]] = {
    "adaptune.runner.callbacks.Logging": ("every", "progress"),
    "adaptune.runner.callbacks.Checkpoint": ("every",),
}

#: Built-in callbacks (by ``_target_``) that only observe and log: (choice) such an entry may be
#: added, removed or turned off and its settings may change (the sensitivity quantiles draw their
#: sample from a private generator, so training is the same with or without them).
HARMLESS_CALLBACKS: tuple[str, ...] = ("adaptune.runner.sensitivity_log.SensitivityQuantiles",)

#: How many differing keys the error message spells out before "and N more".
SHOWN = 4

_ABSENT = object()


def is_harmless(key: str, harmless: tuple[str, ...] = HARMLESS) -> bool:
    """Whether the dotted ``key`` is one of ``harmless`` or lies under one of them."""
    parts = key.split(".")
    for pattern in harmless:
        pat = pattern.split(".")
        if len(pat) <= len(parts) and all(p == "*" or p == k for p, k in zip(pat, parts)):
            return True
    return False


def _same(a: Any, b: Any) -> bool:
    """Equal as config values: 1 == 1.0, but True != 1; NaN equals NaN; lists and dicts by content."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _harmless_callback_keys(new: Mapping, saved: Mapping) -> tuple[str, ...]:
    """``callbacks.<name>.<setting>`` for the :data:`HARMLESS_CALLBACK_SETTINGS` of entries whose
    ``_target_`` is the same built-in class in both configs."""
    new_cbs, saved_cbs = new.get("callbacks"), saved.get("callbacks")
    if not isinstance(new_cbs, Mapping) or not isinstance(saved_cbs, Mapping):
        return ()
    keys = [
        f"callbacks.{name}"
        for name in {**saved_cbs, **new_cbs}
        if any(
            isinstance(n, Mapping) and n.get("_target_") in HARMLESS_CALLBACKS for n in (new_cbs.get(name), saved_cbs.get(name))
        )
    ]
    for name, node in new_cbs.items():
        old = saved_cbs.get(name)
        if isinstance(node, Mapping) and isinstance(old, Mapping) and node.get("_target_") == old.get("_target_"):
            keys += [f"callbacks.{name}.{s}" for s in HARMLESS_CALLBACK_SETTINGS.get(node.get("_target_"), ())]
    return tuple(keys)


def config_diff(new: Mapping, saved: Mapping, harmless: tuple[str, ...] = HARMLESS) -> list[tuple[str, Any, Any]]:
    """The significant differences between two resolved configs, as ``(dotted key, saved value,
    new value)`` sorted by key; a key present on one side only has :data:`ABSENT` on the other.

    Dicts are compared key by key (nested keys are dotted: ``schedule.beta3``); a list is one
    value (``schedule.betas: [0.9, 0.999] -> [0.9, 0.99]``). Keys matching ``harmless`` (and
    everything under them) are skipped.
    """
    out: list[tuple[str, Any, Any]] = []
    harmless = tuple(harmless) + _harmless_callback_keys(new, saved)

    def walk(a: Any, b: Any, prefix: str) -> None:
        if prefix and is_harmless(prefix, harmless):
            return
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            for k in {**b, **a}:
                walk(a.get(k, _ABSENT), b.get(k, _ABSENT), f"{prefix}.{k}" if prefix else str(k))
        elif a is _ABSENT or b is _ABSENT or not _same(a, b):
            out.append((prefix, b, a))

    walk(new, saved, "")
    return sorted(out, key=lambda d: d[0])


ABSENT = _ABSENT  # public name for the "key not present" marker in config_diff's tuples


def _show(value: Any, limit: int = 40) -> str:
    text = "(absent)" if value is _ABSENT else "null" if value is None else str(value)
    if isinstance(value, bool):
        text = "true" if value else "false"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe(diffs: list[tuple[str, Any, Any]], shown: int = SHOWN) -> str:
    """``key: old -> new, ...``, the first ``shown`` then "and N more"."""
    parts = [f"{k}: {_show(old)} -> {_show(new)}" for k, old, new in diffs[:shown]]
    if len(diffs) > shown:
        parts.append(f"and {len(diffs) - shown} more")
    return ", ".join(parts)


def _relative(path: Path | str) -> Path:
    """``path`` relative to the working directory when it lies below it (Hydra's output_dir is
    absolute; ``outputs/runs/...`` reads better), else as it is."""
    path = Path(path)
    try:
        return path.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return path


#: Task keys renamed since runs were saved, per task kind: {old: new}.
TASK_RENAMED = {"vit": {"hf_name": "hf_dataset"}}  # one name with GLUE's task.hf_dataset


def upgrade_saved(saved: Mapping) -> Mapping:
    """``saved`` as this version names its keys: renamed task keys (:data:`TASK_RENAMED`) under
    their new names, and a schedule section from before the per-schedule schemas (it holds the old
    names ``p``, ``reserve_p`` and ``mixout_p``) as its schedule's schema has it now: the renamed
    keys under their new names, the keys that schedule does not read dropped."""
    from adaptune.schedules.config import RENAMED, SCHEDULE_SCHEMAS, schema_keys

    task = saved.get("task")
    if isinstance(task, Mapping) and task.get("kind") in TASK_RENAMED:
        renames = TASK_RENAMED[task["kind"]]
        saved = {**saved, "task": {renames.get(k, k): v for k, v in task.items()}}
    schedule = saved.get("schedule")
    if (
        not isinstance(schedule, Mapping)
        or not all(k in schedule for k in RENAMED)
        or schedule.get("name") not in SCHEDULE_SCHEMAS
    ):
        return saved
    keys = schema_keys(SCHEDULE_SCHEMAS[schedule["name"]])
    renamed = {RENAMED.get(k, k): v for k, v in schedule.items()}
    return {**saved, "schedule": {k: v for k, v in renamed.items() if k in keys}}


def check_resume(new: Mapping, saved: Mapping | None, run_dir: Path | str, source: str) -> None:
    """Raise :class:`ConfigError` if ``new`` differs significantly from ``saved`` (the config that
    trained ``run_dir``, read from ``source``). A missing saved config (a checkpoint from before
    configs were saved in it) is allowed with a warning."""
    if saved is None:
        log.warning(
            "%s holds no config (written by an older version): cannot check that %s was trained "
            "with the same config; resuming anyway",
            source,
            run_dir,
        )
        return
    diffs = config_diff(new, upgrade_saved(saved))
    if diffs:
        raise ConfigError(
            f"{_relative(run_dir)} was trained with a different config ({describe(diffs)}); pass resume=false to "
            f"start over in that directory, or change name= to train in another one"
        )


def checkpoint_config(path: Path | str) -> dict | None:
    """The config saved in the checkpoint at ``path`` (None if it has none). Memory-maps the file,
    so the tensors are not read."""
    from .checkpoint import peek

    data = peek(path)
    config = data.get("config") if isinstance(data, dict) else None
    return config if isinstance(config, Mapping) else None


def saved_config(run_dir: Path, results: Mapping | None) -> dict | None:
    """The resolved config a run was trained with: ``results`` (its ``results.json``) when that
    holds one, else ``checkpoints/last.pt``'s; None when neither does. Keys renamed since are under
    their new names (:func:`upgrade_saved`), so ``adaptune export`` / ``analyze`` rebuild older runs."""
    from .checkpoint import LAST

    config = (results or {}).get("config")
    if not isinstance(config, dict):
        last = Path(run_dir) / "checkpoints" / LAST
        config = checkpoint_config(last) if last.is_file() else None
    return dict(upgrade_saved(config)) if isinstance(config, dict) else None
