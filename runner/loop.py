"""The one training loop every task and schedule goes through.

Entry point: :func:`run(cfg, run_dir)` with a composed config (``conf/config.yaml``) and a run
directory. It returns the results dict it also writes to ``<run_dir>/results.json``.

Per optimizer step (``trainer.grad_accum_steps`` micro-batches):

1. ``schedule.on_step_begin(step)``
2. for each micro-batch: forward under autocast, ``loss_sum.backward()`` (scaled under fp16)
3. unscale (fp16), divide gradients by the step's total ``sample_size`` (so accumulation equals
   one large batch), global grad-norm clipping (``trainer.max_grad_norm``)
4. ``schedule.on_gradients(step)`` (skipped when fp16 gradients overflowed, as is the update)
5. ``optimizer.step()`` (through the GradScaler under fp16), ``lr_scheduler.step()``
6. ``schedule.after_step(step)``; logging, evaluation, best / periodic checkpoints

Checkpoints (``<run_dir>/checkpoints/last.pt``) hold model, optimizer, LR scheduler, scaler and
schedule state, the RNG state and the position in the epoch, so a resumed run on CPU continues
bit-identically. SIGINT/SIGTERM finish the current step, write a checkpoint and stop.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from schedules import build_schedule
from common.errors import ConfigError
from tasks import build_task
from tasks.base import move_to

from . import checkpoint as ckpt
from .distributed import init_distributed, ranks_in_sync
from .loggers import NullLogger, build_logger
from .validate import validate_config

log = logging.getLogger("adaptune")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class Interrupted(RuntimeError):
    """SIGINT/SIGTERM arrived; a checkpoint was written at the last completed step."""


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    samples: int = 0
    train_time: float = 0.0
    best_value: float | None = None
    best_step: int | None = None
    best_metrics: dict = field(default_factory=dict)
    evals: list = field(default_factory=list)        # [{"step": s, **metrics}]
    train_loss: list = field(default_factory=list)   # [[step, mean loss over the log interval]]
    loss_window: list = field(default_factory=list)  # step losses since the last log line


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={name} but no CUDA device is available; use trainer.device=cpu")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 where the hardware runs it fast (CUDA with bf16, CPU with AMX/AVX512-BF16
    through oneDNN), else fp32. On a CPU without them (AVX2 only) bf16 autocast is ~15x slower."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


def autocast_context(precision: str, device: torch.device):
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def results_complete(run_dir: Path) -> dict | None:
    """The results of a finished run in ``run_dir``, or None."""
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        return None
    try:
        results = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return results if results.get("status") == "completed" else None


class _StopFlag:
    """Turns the first SIGINT/SIGTERM into a request to stop after the current step."""

    def __init__(self):
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self):
        def handler(signum, frame):
            if self.requested:  # second signal: stop now
                raise KeyboardInterrupt
            self.requested = True
            log.warning("stop requested: finishing this step and writing a checkpoint (again to abort)")

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, handler)
            except ValueError:  # not in the main thread (e.g. some launchers): no handler
                pass
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


class _PlannedBatches(torch.utils.data.Dataset):
    """Batch plans as a dataset, so DataLoader workers can run ``task.make_batch`` ahead."""

    def __init__(self, task, plans):
        self.task, self.plans = task, plans

    def __len__(self) -> int:
        return len(self.plans)

    def __getitem__(self, i):
        return self.task.make_batch(self.plans[i])


def _identity(batch):
    return batch


class Trainer:
    """Holds the objects of one run; :meth:`fit` trains, evaluates and writes results."""

    def __init__(self, cfg: DictConfig, run_dir: Path):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.tcfg = OmegaConf.to_container(cfg.trainer, resolve=True)
        self.device = resolve_device(str(self.tcfg["device"]))
        if self.device.type == "cuda" and "LOCAL_RANK" in os.environ:
            self.device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}")
        self.dist = init_distributed(self.device)
        if self.device.type == "cpu":
            torch.set_num_threads(int(self.tcfg["num_threads"]))
        self.precision = resolve_precision(self.tcfg["precision"], self.device)
        seed_everything(int(cfg.seed))

        self.task = build_task(OmegaConf.to_container(cfg.task, resolve=True), self.run_dir, int(cfg.seed))
        self.schedule = build_schedule(OmegaConf.to_container(cfg.schedule, resolve=True))
        self.task.setup()
        self.model = self.task.build_model()
        self.schedule.prepare_model(self.model, self.task.family)
        self.model.to(self.device)
        # Schedules, evaluation and checkpoints use the plain module; the training forward goes
        # through DistributedDataParallel when torchrun started several processes.
        self.train_model = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            self.train_model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

        self.accum = int(self.tcfg["grad_accum_steps"])
        self.steps_per_epoch = math.ceil(len(self.task.train_batches(0)) / self.accum)
        if self.steps_per_epoch == 0:
            raise ConfigError("the training set is empty (check task.data_dir / task.train_subset)")
        max_steps = self.tcfg.get("max_steps")
        self.total_steps = int(max_steps) if max_steps else int(self.tcfg["epochs"]) * self.steps_per_epoch
        self.schedule.setup(self.model, self.task.family, self.total_steps)
        self.optimizer = self.schedule.optimizer
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        self.state = TrainState()

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        path = self.ckpt_dir / ckpt.LAST
        if not self.dist.is_main:
            return path
        ckpt.atomic_save({
            "version": 1,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.schedule.lr_scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "schedule": self.schedule.state_dict(),
            "rng": ckpt.rng_state(),
            "state": asdict(self.state),
        }, path)
        return path

    def load_checkpoint(self, path: Path) -> None:
        data = ckpt.load(path, map_location=self.device)
        self.model.load_state_dict(data["model"])
        self.optimizer.load_state_dict(data["optimizer"])
        self.schedule.lr_scheduler.load_state_dict(data["lr_scheduler"])
        if self.scaler is not None and data.get("scaler"):
            self.scaler.load_state_dict(data["scaler"])
        self.schedule.load_state_dict(data["schedule"])
        ckpt.set_rng_state(data["rng"])
        self.state = TrainState(**data["state"])
        log.info("resumed from %s at step %d (epoch %d)", path, self.state.step, self.state.epoch)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, split: str = "dev") -> dict[str, float]:
        self.model.eval()
        try:
            with torch.inference_mode(), autocast_context(self.precision, self.device):
                metrics = self.task.evaluate(self.model, split)
        finally:
            self.model.train()
        return {k: float(v) for k, v in metrics.items()}

    def _is_better(self, value: float) -> bool:
        best = self.state.best_value
        if best is None:
            return True
        return value > best if self.task.greater_is_better else value < best

    def _record_eval(self, metrics: dict[str, float], logger) -> None:
        step = self.state.step
        self.state.evals.append({"step": step, **metrics})
        logger.log({f"dev/{k}": v for k, v in metrics.items()}, step=step)
        main = self.task.main_metric
        if main not in metrics:
            raise RuntimeError(f"task {self.task.kind} did not report its main metric '{main}'")
        shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
        log.info("step %d dev: %s", step, shown)
        if self._is_better(metrics[main]):
            self.state.best_value = metrics[main]
            self.state.best_step = step
            self.state.best_metrics = dict(metrics)
            if self.dist.is_main:
                ckpt.atomic_save({"model": self.model.state_dict(), "step": step, "metrics": dict(metrics)},
                                 self.ckpt_dir / ckpt.BEST)

    # ------------------------------------------------------------------ training
    def _batch_source(self, plans, start: int):
        """Batches of ``plans[start:]`` (this rank's shard), made ahead by ``trainer.num_workers``
        DataLoader workers, or in this process when it is 0. Batches depend only on their plan,
        so both give the same batches; the loader draws its worker seeds from a generator of its
        own, leaving the global RNG (dropout) untouched, which keeps resume bit-identical."""
        local = list(plans[start:])
        if self.dist.enabled:
            local = [self.task.shard_plan(p, self.dist.rank, self.dist.world) for p in local]
        workers = int(self.tcfg.get("num_workers") or 0)
        if workers == 0:
            return (self.task.make_batch(p) for p in local)
        loader = torch.utils.data.DataLoader(
            _PlannedBatches(self.task, local), batch_size=None, shuffle=False, num_workers=workers,
            collate_fn=_identity, generator=torch.Generator().manual_seed(0),
            pin_memory=self.device.type == "cuda")
        return iter(loader)

    def _train_step(self, step: int, batches, start: int, n_plans: int) -> tuple[int, float]:
        """One optimizer step over the next micro-batches of ``batches`` (plans ``start`` to
        ``start+accum`` of ``n_plans``); returns (next plan index, mean loss)."""
        self.schedule.on_step_begin(step)
        loss_total = torch.zeros((), device=self.device)
        sample_size = 0.0
        n_samples = 0
        stop = min(start + self.accum, n_plans)
        for index in range(start, stop):
            batch = move_to(next(batches), self.device)
            # under DDP, gradients are all-reduced once, on the step's last micro-batch
            sync = index == stop - 1 or not self.dist.enabled
            with nullcontext() if sync else self.train_model.no_sync():
                with autocast_context(self.precision, self.device):
                    out = self.task.loss(self.train_model, batch)
                loss_sum = out.loss_sum.float()
                (self.scaler.scale(loss_sum) if self.scaler else loss_sum).backward()
            loss_total += loss_sum.detach()
            sample_size += float(out.sample_size)
            n_samples += int(out.n_samples)
        if self.dist.enabled:
            sample_size = self.dist.all_sum(sample_size)
            n_samples = int(self.dist.all_sum(n_samples))
            loss_value = self.dist.all_sum(float(loss_total))
        else:
            loss_value = float(loss_total)
        mean_loss = loss_value / max(sample_size, 1.0)
        if not math.isfinite(mean_loss):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(
                f"loss became {mean_loss} at step {step}; training stopped, the last good checkpoint is "
                f"{self.ckpt_dir / ckpt.LAST if (self.ckpt_dir / ckpt.LAST).exists() else '(none yet)'}; "
                "try a lower schedule.lr or trainer.precision=fp32")
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads and sample_size > 0:
            # DDP averaged the ranks' gradient sums: scale back to the global sum, then normalise
            torch._foreach_mul_(grads, self.dist.world / sample_size)
        max_norm = self.tcfg.get("max_grad_norm")
        overflow = False
        if max_norm:
            norm = torch.nn.utils.clip_grad_norm_(self.params, float(max_norm))
            overflow = self.scaler is not None and not bool(torch.isfinite(norm))
        elif self.scaler is not None:
            overflow = not all(bool(torch.isfinite(g).all()) for g in grads)
        if not overflow:
            self.schedule.on_gradients(step)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if not overflow:
            self.schedule.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.after_step(step)
        self.state.samples += n_samples
        return stop, mean_loss

    def fit(self, logger, resume_from: Path | None = None) -> dict:
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        t = self.tcfg
        eval_every = t.get("eval_every") or self.steps_per_epoch
        save_every = int(t["save_every"])
        log_every = int(t["log_every"])
        st = self.state
        progress = None
        if t.get("progress", True) and self.dist.is_main:
            from tqdm.auto import tqdm

            progress = tqdm(total=self.total_steps, initial=st.step, desc="train", unit="step",
                            dynamic_ncols=True, leave=False)
        window = st.loss_window
        self.model.train()
        try:
            with _StopFlag() as stop:
                while st.step < self.total_steps:
                    plans = self.task.train_batches(st.epoch)
                    batches = self._batch_source(plans, st.batch_in_epoch)
                    while st.batch_in_epoch < len(plans) and st.step < self.total_steps:
                        t0 = time.perf_counter()
                        step = st.step + 1
                        st.batch_in_epoch, loss = self._train_step(step, batches, st.batch_in_epoch, len(plans))
                        st.step = step
                        st.train_time += time.perf_counter() - t0
                        window.append(loss)
                        if progress is not None:
                            progress.update(1)
                        if step % log_every == 0 or step == self.total_steps:
                            mean = sum(window) / len(window)
                            window.clear()
                            st.train_loss.append([step, mean])
                            metrics = {"train/loss": mean, "train/epoch": st.epoch,
                                       "train/samples_per_s": st.samples / max(st.train_time, 1e-9)}
                            metrics.update({f"train/{k}": v for k, v in self.schedule.log_metrics(step).items()})
                            logger.log(metrics, step=step)
                            if progress is not None:
                                progress.set_postfix(loss=f"{mean:.4f}", lr=f"{self.optimizer.param_groups[0]['lr']:.2e}")
                        evaluated = step % eval_every == 0 or step == self.total_steps
                        if evaluated:
                            self._record_eval(self.evaluate("dev"), logger)
                        epoch_done = st.batch_in_epoch >= len(plans)
                        if epoch_done:  # the next step starts the next epoch's batch order
                            st.epoch += 1
                            st.batch_in_epoch = 0
                        if self.dist.enabled:
                            stop.requested = self.dist.any(stop.requested)
                        if evaluated or step % save_every == 0 or stop.requested:
                            self.save_checkpoint()
                        if stop.requested:  # (under DDP every rank stops at the same step)
                            raise Interrupted(
                                f"interrupted at step {step}/{self.total_steps}; checkpoint saved in "
                                f"{self.ckpt_dir}; run the same command again to resume")
                        if epoch_done:
                            break
        finally:
            if progress is not None:
                progress.close()
        if not st.evals or st.evals[-1]["step"] != st.step:  # e.g. resumed after the last step
            self._record_eval(self.evaluate("dev"), logger)
            self.save_checkpoint()
        final = {k: v for k, v in st.evals[-1].items() if k != "step"}
        test = self.evaluate("test") if self.task.has_test else None
        results = self._results(final, test)
        if self.dist.enabled:  # parameters, optimizer and schedule state must agree on every rank
            results["ddp_ranks_in_sync"] = ranks_in_sync(
                self.dist, self.model.state_dict(), self.optimizer.state_dict()["state"],
                self.schedule.state_dict())
            if not results["ddp_ranks_in_sync"]:
                log.error("DDP ranks diverged: parameters or schedule state differ between ranks")
        return results

    def _results(self, final: dict, test: dict | None) -> dict:
        st = self.state
        cfg = OmegaConf.to_container(self.cfg, resolve=True)
        results = {
            "status": "completed",
            "task": self.task.kind,
            "task_name": self.cfg.task.get("name"),
            # a preset may label a variant (schedule=dps_mix: "dps_mix") for reports
            "schedule": self.cfg.schedule.get("label") or self.cfg.schedule.name,
            "seed": int(self.cfg.seed),
            "main_metric": self.task.main_metric,
            "greater_is_better": self.task.greater_is_better,
            "final": final,
            "best": st.best_metrics,
            "best_step": st.best_step,
            "test": test,
            "steps": st.step,
            "total_steps": self.total_steps,
            "epochs": st.step / self.steps_per_epoch,
            "train_time_s": st.train_time,
            "samples_per_s": st.samples / max(st.train_time, 1e-9),
            "precision": self.precision,
            "evals": st.evals,
            "train_loss": st.train_loss,
            "task_summary": self.task.summary(),
            "config": cfg,
        }
        return results


def run(cfg: DictConfig, run_dir: Path | str) -> dict:
    """Train and evaluate one run configured by ``cfg`` in ``run_dir``; return its results."""
    run_dir = Path(run_dir)
    validate_config(cfg)
    resume = cfg.get("resume", "auto")
    done = results_complete(run_dir)
    last = run_dir / "checkpoints" / ckpt.LAST
    if resume == "auto" and done is not None:
        log.info("run already complete in %s (results.json); pass resume=false to train again", run_dir)
        return done
    if resume is True and not last.is_file():
        raise ConfigError(f"resume=true but there is no checkpoint at {last}")
    resume_from = last if (resume in (True, "auto") and last.is_file()) else None

    start = time.time()
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, run_dir)
    tags = [f"task:{trainer.task.kind}", f"schedule:{cfg.schedule.name}", f"seed:{cfg.seed}"]
    if cfg.task.get("name"):
        tags.append(f"dataset:{cfg.task.name}")
    logger = NullLogger()
    if trainer.dist.is_main:
        logger = build_logger(OmegaConf.to_container(cfg.logger, resolve=True), run_dir,
                              OmegaConf.to_container(cfg, resolve=True), tags,
                              name=f"{cfg.name}/{run_dir.name}")
    exit_code = 1
    try:
        results = trainer.fit(logger, resume_from=resume_from)
        results["wall_time_s"] = time.time() - start
        results["world_size"] = trainer.dist.world
        if trainer.dist.is_main:
            ckpt.atomic_save_json(results, run_dir / "results.json")
        logger.summary({f"final/{k}": v for k, v in results["final"].items()})
        logger.summary({f"best/{k}": v for k, v in results["best"].items()})
        if results["test"]:
            logger.summary({f"test/{k}": v for k, v in results["test"].items()})
        logger.summary({"samples_per_s": results["samples_per_s"], "steps": results["steps"]})
        exit_code = 0
        return results
    finally:
        logger.finish(exit_code=exit_code)
        if trainer.dist.enabled:
            import torch.distributed as dist

            dist.destroy_process_group()
