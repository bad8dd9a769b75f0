"""The runner's config schemas (``trainer``, ``logger``, the root) and the registration of every
group's schema in Hydra's ConfigStore.

``conf/<group>/*.yaml`` start with ``defaults: [/schema/<group>/<name>@_here_, _self_]``: the
schema supplies each key's only default and type, the YAML file is a preset. Composition then
type-checks every key, whether this run uses it or not, and rejects unknown keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from adaptune.common.schema import (
    at_least,
    non_negative_int,
    one_of,
    optional,
    positive,
    preset,
    setting,
)
from adaptune.schedules.config import SCHEDULE_SCHEMAS
from adaptune.tasks.config import TASK_SCHEMAS

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class TrainerConfig:
    batch_size: int = setting(32, check=positive)  # examples per micro-batch (NMT batches by task.max_tokens)
    eval_batch_size: int = setting(64, check=positive)
    grad_accum_steps: int = setting(1, check=positive)  # micro-batches per optimizer step
    epochs: int = setting(3, check=positive)
    max_steps: Optional[int] = setting(None, check=optional(positive))  # optimizer steps; wins over epochs
    max_grad_norm: Optional[float] = setting(1.0, check=optional(at_least(0)))  # global clipping; null or 0: off
    # auto: bf16 where the hardware is fast at it (CUDA, CPUs with AMX / AVX512-BF16), else fp32
    # (on an AVX2-only CPU bf16 autocast is ~10x slower than fp32) | fp32 | bf16 | fp16 (+ GradScaler)
    precision: str = setting("auto", check=one_of(*PRECISIONS))
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_threads: int = setting(2, check=positive)  # torch intra-op threads on CPU
    num_workers: int = setting(0, check=non_negative_int)  # DataLoader processes preparing batches; 0: in-process
    # torch.compile the training forward/backward (evaluation stays eager). Off by default: on 2
    # CPU cores compiled MiniLM steps ran at 0.90x eager speed (bench/bench_loop.py --part ceiling --compile)
    compile: bool = False
    eval_every: Optional[int] = setting(None, check=optional(positive))  # steps between dev evaluations; null: each epoch's end
    save_every: int = setting(200, check=positive)  # steps between checkpoints (also at each evaluation and the end)
    # keep checkpoints/previous.pt once the run completes (while training it is the fallback for a
    # damaged last.pt); false removes it at the end: a MiniLM run's 261 MB, about 40% of its directory
    keep_previous: bool = True
    log_every: int = setting(10, check=positive)  # steps between log lines / W&B points
    progress: bool = True  # tqdm progress bar


def _loggers(value: Any) -> str | None:
    bad = [v for v in value if v not in ("wandb", "csv", "tensorboard")]
    return f"={list(value)}: unknown logger {bad[0]}; allowed: wandb, csv, tensorboard" if bad else None


@dataclass
class LoggerConfig:
    kind: str = setting("wandb", check=one_of("wandb", "csv", "tensorboard", "none"))
    # more loggers beside `kind`, e.g. [csv, tensorboard]: logger=wandb logger.also=[tensorboard]
    also: List[str] = setting(factory=list, check=_loggers)
    # offline: writes <run dir>/wandb, upload later with `wandb sync` | online | disabled.
    # null: $WANDB_MODE, else offline. (A key set here wins over the environment.)
    mode: Optional[str] = setting(None, check=one_of(None, "offline", "online", "disabled"))
    project: Optional[str] = None  # null: $WANDB_PROJECT, else "adaptune"
    entity: Optional[str] = None  # null: $WANDB_ENTITY, else W&B's default
    group: str = "${name}"  # one group per sweep / experiment
    job_type: str = "train"
    tags: List[str] = setting(factory=list)  # task, schedule and seed are always added


def _resume(value: Any) -> str | None:
    return None if value in (True, False) or value == "auto" else f"={value!r} is not allowed; allowed: true, false, auto"


def _integer(value: Any) -> str | None:
    return None if isinstance(value, int) and not isinstance(value, bool) else f"must be an integer, got {value!r}"


@dataclass
class RootConfig:
    # names the run directory: outputs/runs/<name>/<overrides> and outputs/multirun/<name>/<overrides>
    name: str = "default"
    seed: int = setting(42, check=_integer)
    # auto: resume from the run directory's checkpoint if there is one (and skip the run if its
    # results.json is complete), refusing a config that changed what is trained;
    # true: resume (error without a checkpoint); false: start over in the same directory
    resume: Any = setting("auto", check=_resume)
    # values experiment presets share through interpolation, e.g. a per-task step table
    # (experiment/dps_glue.yaml: presets.dps_max_steps), or one schedule's setting that its
    # conf/schedule/<name>.yaml reads with ${preset:NAME} (experiment/dps_cpu.yaml: presets.dps_update_ratio)
    presets: Dict[str, Any] = setting(factory=dict)
    task: Any = None
    schedule: Any = None
    trainer: Any = None
    logger: Any = None
    callbacks: Any = None


def register_configs() -> None:
    """Store every schema where ``conf/`` refers to it, and register the ``${preset:NAME}``
    resolver the group options use (idempotent)."""
    if not OmegaConf.has_resolver("preset"):
        OmegaConf.register_new_resolver("preset", preset)
    cs = ConfigStore.instance()
    cs.store(name="adaptune_schema", node=RootConfig)
    cs.store(group="schema/trainer", name="trainer", node=TrainerConfig)
    cs.store(group="schema/logger", name="logger", node=LoggerConfig)
    for name, schema in SCHEDULE_SCHEMAS.items():
        cs.store(group="schema/schedule", name=name, node=schema)
    for kind, schema in TASK_SCHEMAS.items():
        cs.store(group="schema/task", name=kind, node=schema)
