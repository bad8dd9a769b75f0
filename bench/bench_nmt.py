"""Training words/s of task=nmt through our loop vs ``fairseq-train``: same model, data, batches.

Both sides train the same fairseq Transformer on the same binarised data (our task's cache of the
demo corpus, or a synthetic corpus when ``trans-de-en`` is not installed, which ``fairseq-train``
reads directly), with the same ``--max-tokens``, Adam(0.9, 0.98), inverse-sqrt warmup, label
smoothing 0.1, dropout, fp32 on the CPU, the same number of threads and no gradient clipping.
They run one after the other, never in parallel (``--repeats`` alternates them).

words/s = target tokens (incl. end-of-sentence, fairseq's ``ntokens``/``wps``) per second of
training updates. For fairseq-train: its own ``wps`` per ``--log-interval`` window; for ours: the
same windows timed around the loop's optimizer steps. The first window (warm-up) is dropped on
both sides and the median of the others is reported; with repeats, each side's best run.

    python bench/bench_nmt.py                      # demo corpus, the nmt_demo_cpu model, 120 updates
    python bench/bench_nmt.py --updates 200 --threads 2 --repeats 2
Target: ours >= 0.9x fairseq-train. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", choices=("auto", "demo", "synthetic"), default="auto")
    p.add_argument("--updates", type=int, default=120)
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    p.add_argument("--max-tokens", type=int, default=2048)
    # defaults: experiment=nmt_demo_cpu's model
    p.add_argument("--embed-dim", type=int, default=128)
    p.add_argument("--ffn-dim", type=int, default=512)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--vocab-size", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--cache-dir", default=str(REPO / "outputs" / ".cache" / "nmt"))
    return p.parse_args()


def model_overrides(a) -> dict:
    return {
        "encoder_embed_dim": a.embed_dim,
        "decoder_embed_dim": a.embed_dim,
        "encoder_ffn_embed_dim": a.ffn_dim,
        "decoder_ffn_embed_dim": a.ffn_dim,
        "encoder_layers": a.layers,
        "decoder_layers": a.layers,
        "encoder_attention_heads": a.heads,
        "decoder_attention_heads": a.heads,
        "dropout": a.dropout,
        "share_decoder_input_output_embed": True,
    }


def data_overrides(a, workdir: Path) -> list[str]:
    from adaptune.tasks.nmt_data import DEMO_PATH

    kind = a.data
    if kind == "auto":
        kind = "demo" if Path(DEMO_PATH).is_file() else "synthetic"
    if kind == "demo":
        return ["task.data=demo", f"task.cache_dir={a.cache_dir}", f"task.subword.vocab_size={a.vocab_size}"]
    sys.path.insert(0, str(REPO / "tests"))
    from test_nmt import write_synthetic  # the tests' deterministic word-mapping corpus

    raw = write_synthetic(workdir / "synthetic", n_train=20000, n_valid=200, n_test=200, vocab=2000)
    return ["task.data=raw", f"task.data_dir={raw}", f"task.cache_dir={a.cache_dir}", f"task.subword.vocab_size={a.vocab_size}"]


def compose_cfg(a, data: list[str], extra: list[str] = ()):
    from hydra import compose, initialize_config_dir

    from adaptune.runner.app import CONFIG_DIR

    model = [f"task.model.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in model_overrides(a).items()]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(
            "config",
            overrides=[
                "task=nmt",
                *data,
                f"task.max_tokens={a.max_tokens}",
                *model,
                "task.eval_bleu=false",
                "schedule=baseline",
                "schedule.optimizer=adamw",
                "schedule.lr=5e-4",
                "schedule.betas=[0.9,0.98]",
                "schedule.eps=1e-8",
                "schedule.weight_decay=1e-4",
                "schedule.lr_schedule=inverse_sqrt",
                "schedule.warmup_steps=4000",
                "trainer.precision=fp32",
                "trainer.max_grad_norm=null",
                "trainer.grad_accum_steps=1",
                f"trainer.max_steps={a.updates}",
                f"trainer.num_threads={a.threads}",
                "trainer.device=cpu",
                "trainer.progress=false",
                f"trainer.save_every={10 * a.updates}",
                f"trainer.log_every={a.log_interval}",
                "logger=none",
                "seed=1",
                *extra,
            ],
        )


def binarised_dir(cfg) -> Path:
    from omegaconf import OmegaConf

    from adaptune.tasks.nmt_data import prepare_text_data

    task = OmegaConf.to_container(cfg.task, resolve=True)
    return prepare_text_data(task, task["source_lang"], task["target_lang"])


def run_fairseq(a, data_dir: Path) -> dict:
    m = model_overrides(a)
    cmd = [
        sys.executable,
        "-m",
        "fairseq_cli.train",
        str(data_dir),
        "--task",
        "translation",
        "-s",
        "de",
        "-t",
        "en",
        "--arch",
        "transformer_iwslt_de_en",
        "--share-decoder-input-output-embed",
        "--encoder-embed-dim",
        str(m["encoder_embed_dim"]),
        "--decoder-embed-dim",
        str(m["decoder_embed_dim"]),
        "--encoder-ffn-embed-dim",
        str(m["encoder_ffn_embed_dim"]),
        "--decoder-ffn-embed-dim",
        str(m["decoder_ffn_embed_dim"]),
        "--encoder-layers",
        str(m["encoder_layers"]),
        "--decoder-layers",
        str(m["decoder_layers"]),
        "--encoder-attention-heads",
        str(m["encoder_attention_heads"]),
        "--decoder-attention-heads",
        str(m["decoder_attention_heads"]),
        "--dropout",
        str(m["dropout"]),
        "--optimizer",
        "adam",
        "--adam-betas",
        "(0.9, 0.98)",
        "--adam-eps",
        "1e-8",
        "--lr",
        "5e-4",
        "--lr-scheduler",
        "inverse_sqrt",
        "--warmup-updates",
        "4000",
        "--weight-decay",
        "1e-4",
        "--clip-norm",
        "0.0",
        "--criterion",
        "label_smoothed_cross_entropy",
        "--label-smoothing",
        "0.1",
        "--max-tokens",
        str(a.max_tokens),
        "--max-update",
        str(a.updates),
        "--seed",
        "1",
        "--cpu",
        "--num-workers",
        "0",
        "--no-save",
        "--disable-validation",
        "--log-format",
        "simple",
        "--log-interval",
        str(a.log_interval),
        "--no-progress-bar",
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"fairseq-train failed:\n{proc.stderr[-3000:]}")
    log = proc.stdout + proc.stderr
    wps = [float(x) for x in re.findall(r"\| train_inner \|.*?wps=([0-9.]+)", log)]
    wps = wps or [float(x) for x in re.findall(r"train_inner.*?wps\D+([0-9.]+)", log)]
    params = re.search(r"num\. shared model params: ([0-9,]+)", log)
    if len(wps) < 2:
        raise SystemExit(f"could not parse fairseq-train's wps from its log:\n{log[-3000:]}")
    return {
        "windows": wps,
        "wps": statistics.median(wps[1:]),
        "wall_s": wall,
        "params": int(params.group(1).replace(",", "")) if params else None,
    }


def run_ours(a, cfg, run_dir: Path) -> dict:
    from adaptune.runner import loop
    from adaptune.tasks.nmt import TranslationTask

    tokens = {"n": 0.0}
    marks: list[tuple[float, float]] = []  # (elapsed training seconds, tokens) after each step
    original_step, original_loss = loop.Trainer._train_step, TranslationTask.loss
    elapsed = {"t": 0.0}
    params = {}

    def timed_step(self, *args, **kwargs):
        params.setdefault("n", sum(p.numel() for p in self.model.parameters()))
        t0 = time.perf_counter()
        out = original_step(self, *args, **kwargs)
        elapsed["t"] += time.perf_counter() - t0
        marks.append((elapsed["t"], tokens["n"]))
        return out

    def counting_loss(self, model, batch):
        out = original_loss(self, model, batch)
        tokens["n"] += out.sample_size
        return out

    loop.Trainer._train_step, TranslationTask.loss = timed_step, counting_loss
    try:
        t0 = time.perf_counter()
        loop.run(cfg, run_dir)
        wall = time.perf_counter() - t0
    finally:
        loop.Trainer._train_step, TranslationTask.loss = original_step, original_loss
    k = a.log_interval
    windows = []
    prev = (0.0, 0.0)
    for i in range(k - 1, len(marks), k):
        t, n = marks[i]
        windows.append((n - prev[1]) / max(t - prev[0], 1e-9))
        prev = (t, n)
    return {"windows": windows, "wps": statistics.median(windows[1:]), "wall_s": wall, "params": params.get("n")}


def main() -> None:
    a = parse_args()
    if a.updates < 3 * a.log_interval:
        raise SystemExit("--updates must be at least 3x --log-interval (the first window is dropped)")
    os.environ["OMP_NUM_THREADS"] = str(a.threads)
    with tempfile.TemporaryDirectory(prefix="bench_nmt_") as tmp:
        tmp = Path(tmp)
        data = data_overrides(a, tmp)
        cfg = compose_cfg(a, data)
        data_dir = binarised_dir(cfg)
        print(
            f"data: {data_dir}\nmodel: transformer_iwslt_de_en {model_overrides(a)}\n"
            f"max_tokens {a.max_tokens}, {a.updates} updates, fp32, {a.threads} thread(s), CPU"
        )
        fairseq_runs, our_runs = [], []
        for r in range(a.repeats):
            fairseq_runs.append(run_fairseq(a, data_dir))
            print(
                f"  fairseq-train run {r + 1}: {fairseq_runs[-1]['wps']:.0f} words/s "
                f"(windows {[round(w) for w in fairseq_runs[-1]['windows']]})",
                flush=True,
            )
            our_runs.append(run_ours(a, compose_cfg(a, data), tmp / f"ours{r}"))
            print(
                f"  adaptune loop run {r + 1}: {our_runs[-1]['wps']:.0f} words/s "
                f"(windows {[round(w) for w in our_runs[-1]['windows']]})",
                flush=True,
            )
    f = max(fairseq_runs, key=lambda x: x["wps"])
    o = max(our_runs, key=lambda x: x["wps"])
    print()
    print(f"{'':24s}{'words/s':>10s}{'params':>12s}")
    print(f"{'fairseq-train':24s}{f['wps']:10.0f}{f['params'] or 0:12d}")
    print(f"{'adaptune (task=nmt)':24s}{o['wps']:10.0f}{o['params'] or 0:12d}")
    ratio = o["wps"] / f["wps"]
    print(f"ratio ours / fairseq-train: {ratio:.2f}x (target >= 0.90x): {'OK' if ratio >= 0.9 else 'BELOW TARGET'}")
    if f["params"] and o["params"] and f["params"] != o["params"]:
        print(f"WARNING: parameter counts differ ({f['params']} vs {o['params']}): not the same model")


if __name__ == "__main__":
    main()
