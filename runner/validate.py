"""Checks on the composed config that Hydra cannot make: ranges and closed sets.

Each failure is a :class:`ConfigError` whose message names the key and the allowed values.
Schedule hyper-parameters are checked by the schedules themselves (``schedules.base.check_hparams``).
"""
from __future__ import annotations

from omegaconf import DictConfig

from common.errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def _positive_int(value, key: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{key} must be a positive integer{' or null' if allow_none else ''}, got {value!r}")


def validate_config(cfg: DictConfig) -> None:
    t = cfg.trainer
    for key in ("batch_size", "eval_batch_size", "grad_accum_steps", "save_every", "log_every",
                "num_threads"):
        _positive_int(t.get(key), f"trainer.{key}")
    workers = t.get("num_workers", 0)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ConfigError(f"trainer.num_workers must be an integer >= 0, got {workers!r}")
    for key in ("max_steps", "eval_every"):
        _positive_int(t.get(key), f"trainer.{key}", allow_none=True)
    if t.get("max_steps") is None:
        _positive_int(t.get("epochs"), "trainer.epochs")
    if t.precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision='{t.precision}' is unknown; allowed: {', '.join(PRECISIONS)}")
    clip = t.get("max_grad_norm")
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip <= 0):
        raise ConfigError(f"trainer.max_grad_norm must be a number > 0 or null, got {clip!r}")
    if not isinstance(cfg.get("seed"), int) or isinstance(cfg.get("seed"), bool):
        raise ConfigError(f"seed must be an integer, got {cfg.get('seed')!r}")
    if cfg.get("resume") not in (True, False, "auto"):
        raise ConfigError(f"resume={cfg.get('resume')!r} is not allowed; allowed: true, false, auto")
