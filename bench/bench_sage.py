"""Optimizer-step time of AdamW-SAGE / Adamax-SAGE against torch AdamW on BERT-base shapes.

    python bench/bench_sage.py                 # 2 threads, 7 interleaved rounds
    python bench/bench_sage.py --threads 1 --rounds 5 --ref-rounds 0

Builds the 201 parameter tensors of BERT-base with a 2-label head (109.5M fp32 entries; the
SAGE groups, encoder linears, hold 85M of them), random gradients, and times ``optimizer.step()``
of each optimizer in interleaved rounds in one process (so machine noise hits all alike). All
optimizers update the same tensors (the numbers drift; the timing does not depend on them).
Reports the median per optimizer, the ratio to torch AdamW (``fused=True`` when it works on this
machine, else ``foreach=True``), the first step (includes the one-off torch.compile) and the
optimizer state bytes (SAGE adds exactly one tensor per SAGE parameter).

The machine should be otherwise idle. The CPU column (process time over all threads) is less
disturbed by other processes than wall time, except that OpenMP threads spinning at a barrier for
a descheduled sibling also count. ``--ref-rounds`` also times the reference loop and the
per-tensor ``torch.compile`` backend (the fused path off CPU). Measured on the project's idle
2-core AMD EPYC VM (AVX2), wall ms per step (ratio to torch AdamW fused=True):

    2 threads: torch AdamW fused 62 | AdamW-SAGE fused 77 (1.24x) | Adamax-SAGE fused 77 (1.24x)
    1 thread:  torch AdamW fused 73 | AdamW-SAGE fused 88 (1.21x) | Adamax-SAGE fused 88 (1.21x)
    reference loop ~10x; state: 835 MB (AdamW) vs 1160 MB (SAGE): +324 MB = one fp32 Ī per
    SAGE entry

The SAGE optimizers' foreach implementation measured ~18x here, slower than the reference loop,
and was dropped (see ``schedules/sage/optimizer.py``), so it has no row any more.

The memory-traffic ratio is 1.22x (SAGE reads and writes Ī besides AdamW's four tensors on 85M
of the 109.5M entries), so the fused kernel runs at the same bandwidth as torch's.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from adaptune.schedules.sage import AdamaxSAGE, AdamWSAGE, compiled, sage_param_groups  # noqa: E402


def bert_base_shapes(
    layers: int = 12, hidden: int = 768, inter: int = 3072, vocab: int = 30522, max_pos: int = 512, labels: int = 2
) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of ``BertForSequenceClassification`` (bert-base-uncased)."""
    h = hidden
    shapes = [
        ("bert.embeddings.word_embeddings.weight", (vocab, h)),
        ("bert.embeddings.position_embeddings.weight", (max_pos, h)),
        ("bert.embeddings.token_type_embeddings.weight", (2, h)),
        ("bert.embeddings.LayerNorm.weight", (h,)),
        ("bert.embeddings.LayerNorm.bias", (h,)),
    ]
    for i in range(layers):
        pre = f"bert.encoder.layer.{i}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            shapes += [(pre + name + ".weight", (h, h)), (pre + name + ".bias", (h,))]
        shapes += [
            (pre + "attention.output.LayerNorm.weight", (h,)),
            (pre + "attention.output.LayerNorm.bias", (h,)),
            (pre + "intermediate.dense.weight", (inter, h)),
            (pre + "intermediate.dense.bias", (inter,)),
            (pre + "output.dense.weight", (h, inter)),
            (pre + "output.dense.bias", (h,)),
            (pre + "output.LayerNorm.weight", (h,)),
            (pre + "output.LayerNorm.bias", (h,)),
        ]
    shapes += [
        ("bert.pooler.dense.weight", (h, h)),
        ("bert.pooler.dense.bias", (h,)),
        ("classifier.weight", (labels, h)),
        ("classifier.bias", (labels,)),
    ]
    return shapes


def state_bytes(opt: torch.optim.Optimizer) -> tuple[int, dict[int, int]]:
    """Total bytes of state tensors, and a histogram {full-size tensors per param: count}."""
    total, hist = 0, {}
    for p, st in opt.state.items():
        full = 0
        for v in st.values():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
                full += int(v.shape == p.shape and v.dim() > 0)
        hist[full] = hist.get(full, 0) + 1
    return total, dict(sorted(hist.items()))


def timed_step(opt: torch.optim.Optimizer) -> tuple[float, float]:
    """(wall seconds, process CPU seconds over all threads) of one ``step()``."""
    t0, c0 = time.perf_counter(), time.process_time()
    opt.step()
    return time.perf_counter() - t0, time.process_time() - c0


def set_impl(opt: torch.optim.Optimizer, fused, backend=None) -> None:
    for g in opt.param_groups:
        g["fused"], g["backend"] = fused, backend


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    ap.add_argument("--rounds", type=int, default=7, help="timed rounds of the fast paths")
    ap.add_argument(
        "--ref-rounds", type=int, default=2, help="timed rounds of the reference and per-tensor compiled paths (0: skip)"
    )
    ap.add_argument("--layers", type=int, default=12, help="encoder layers (12: BERT-base)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    named = [(n, torch.nn.Parameter(torch.randn(s) * 0.02)) for n, s in bert_base_shapes(args.layers)]
    for _, p in named:
        p.grad = torch.randn_like(p) * 1e-3
    params = [p for _, p in named]
    n_total = sum(p.numel() for p in params)
    groups = sage_param_groups(named, family="bert", weight_decay=0.01)
    n_sage = sum(p.numel() for g in groups if g["sage"] for p in g["params"])
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, {len(params)} tensors, "
        f"{n_total / 1e6:.1f}M parameters ({n_sage / 1e6:.1f}M in SAGE groups)"
    )

    try:
        base = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, fused=True)
        base_name = "torch AdamW fused"
        first = {base_name: timed_step(base)}
    except (RuntimeError, ValueError) as err:
        print(f"(torch AdamW fused=True unavailable: {err}; using foreach)")
        base = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, foreach=True)
        base_name = "torch AdamW foreach"
        first = {base_name: timed_step(base)}
    opts = {
        base_name: base,
        "AdamW-SAGE": AdamWSAGE(groups, lr=1e-5, beta3=0.85),
        "Adamax-SAGE": AdamaxSAGE(groups, lr=2e-5, beta3=0.85),
    }
    impl = {}
    for name in ("AdamW-SAGE", "Adamax-SAGE"):
        first[name] = timed_step(opts[name])  # auto path; compiles once
        impl[name] = opts[name]._impl(opts[name].param_groups[0], params)

    times: dict[str, list[tuple[float, float]]] = {name: [] for name in opts}
    for _ in range(args.rounds):
        for name, opt in opts.items():
            times[name].append(timed_step(opt))
    if args.ref_rounds:
        with_compiled = compiled.usable()
        for name in ("AdamW-SAGE", "Adamax-SAGE"):
            times[f"{name} (reference loop)"] = []
            if with_compiled:
                times[f"{name} (compiled per tensor)"] = []
                set_impl(opts[name], fused=True, backend="compiled")  # compile outside the timing
                opts[name].step()
        for _ in range(args.ref_rounds):
            for name in ("AdamW-SAGE", "Adamax-SAGE"):
                opt = opts[name]
                set_impl(opt, fused=False)
                times[f"{name} (reference loop)"].append(timed_step(opt))
                if with_compiled:
                    set_impl(opt, fused=True, backend="compiled")
                    times[f"{name} (compiled per tensor)"].append(timed_step(opt))
                set_impl(opt, fused=None)
            times[base_name].append(timed_step(base))

    def med(name, k):
        return statistics.median(t[k] for t in times[name])

    ref_wall, ref_cpu = med(base_name, 0), med(base_name, 1)
    print(f"\nmedians over rounds; ratio = / {base_name}; CPU = process time of all threads (less sensitive to other processes)")
    print(f"{'optimizer':36s} {'wall ms':>9s} {'ratio':>6s} {'CPU ms':>9s} {'ratio':>6s} {'first step ms':>14s}")
    for name in times:
        wall, cpu = med(name, 0), med(name, 1)
        path = f" [{impl[name]}]" if name in impl else ""
        firsts = f"{first[name][0] * 1e3:14.0f}" if name in first else ""
        print(f"{name + path:36s} {wall * 1e3:9.1f} {wall / ref_wall:5.2f}x {cpu * 1e3:9.1f} {cpu / ref_cpu:5.2f}x {firsts}")
    print(f"\n{'optimizer state':36s} {'MB':>10s}  full-size state tensors per param: count")
    for name, opt in opts.items():
        total, hist = state_bytes(opt)
        print(f"{name:36s} {total / 2**20:10.1f}  {hist}")
    print(f"(SAGE state - base state should be {n_sage * 4 / 2**20:.1f} MB: one fp32 Ī per SAGE entry)")


if __name__ == "__main__":
    main()
