"""The ``torch.compile`` backend of the fused path: its process-wide state and helpers.

Each optimizer writes its fused update once, as one expression per tensor (``adamw_fused_kernel``
in :mod:`.adamw`, ``adamax_fused_kernel`` in :mod:`.adamax`) that reads θ, g and the state once
and writes them once. Here it is compiled once per process with ``torch.compile(dynamic=True)``
and called once per tensor: the fused path on CUDA, and on CPU where the C++ kernel
(:mod:`.cpu_kernel`) cannot be built. Hyper-parameters come in as 0-dim tensors (:func:`scalars`)
so that changing the learning rate or the step never recompiles.

Tensors under :data:`MIN_TENSOR` elements take the reference loop instead, since each compiled
call has a fixed Python cost. Where compilation fails, :func:`run` logs one warning and this
backend stays off for the rest of the process.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch
from torch import Tensor

log = logging.getLogger(__name__)

MIN_TENSOR = 1 << 15  # smaller tensors take the reference loop instead (per_tensor backend)
GROUPED_RECOMPILE_LIMIT = 64  # grouped graphs allowed per process (see :func:`run`)
_cache: dict[str, Callable] = {}  # "kernel name/threads=N" -> compiled kernel
_grouped: dict[Callable, Callable] = {}  # per-tensor update -> its multi-tensor wrapper
_broken = False  # a compilation failed: use the eager path from now on


def kernel(fn: Callable) -> Callable:
    """``torch.compile(fn)``, one per thread count.

    Inductor's C++ backend picks a serial or an OpenMP loop from the thread count and from the
    size of the first tensor it sees, and caches that choice on disk for every size. Making the
    thread count part of the options (hence of the cache key) and ``min_chunk_size=1`` gives a
    parallel loop whenever there are several threads, whatever size came first, and a plain
    serial loop (faster than a one-thread OpenMP loop) with one thread. ``-ffp-contract=fast``
    lets the compiler fuse multiply-adds (the one-thread loop is partly compute-bound). Timings:
    docs/benchmarks.md.
    """
    threads = torch.get_num_threads()
    key = f"{fn.__name__}/threads={threads}"
    if key not in _cache:
        log.info("SAGE: compiling %s with torch.compile (once per process)", fn.__name__)
        options = {"cpp.threads": threads, "cpp.min_chunk_size": 1, "cpp.enable_floating_point_contract_flag": "fast"}
        if getattr(fn, "_multi_tensor", False) and torch.cuda.is_available():
            options["combo_kernels"] = True  # horizontal fusion: few launches for the whole group
        _cache[key] = torch.compile(fn, dynamic=True, fullgraph=True, options=options)
    return _cache[key]


def grouped(fn: Callable) -> Callable:
    """The multi-tensor form of a per-tensor update ``fn(p, g, m, v, s, *scalars)``: the same
    arguments as lists (``s`` a list or None), ``fn`` applied to each tensor in turn. Compiled by
    :func:`kernel` as one graph per group (recompiled when the group's tensor count changes), so a
    step costs one Python call per group instead of one per tensor."""
    if fn not in _grouped:

        def multi(ps, gs, ms, vs, ss, *scalars):
            for i in range(len(ps)):
                fn(ps[i], gs[i], ms[i], vs[i], None if ss is None else ss[i], *scalars)

        multi.__name__ = f"{fn.__name__}_grouped"
        multi._multi_tensor = True
        _grouped[fn] = multi
    return _grouped[fn]


def usable() -> bool:
    """Whether torch.compile can run here (and has not failed in this process)."""
    if _broken:
        return False
    try:
        import torch._dynamo

        if not torch._dynamo.is_dynamo_supported():
            return False
        return not torch.compiler.is_compiling()
    except Exception:  # pragma: no cover - exotic builds
        return False


def run(fn: Callable, fallback: Callable[[], None], *args) -> None:
    """Run the compiled ``fn``; on a compile failure warn once and run ``fallback`` from then on.

    Compilation happens before the kernel touches its inputs, so falling back is safe.
    """
    global _broken
    if not _broken:
        try:
            if getattr(fn, "_multi_tensor", False):
                # one graph per group signature (tensor count, SAGE or plain, optimizer): more than
                # dynamo's default of 8 recompiles per code object, all sharing ``multi``'s code
                import torch._dynamo

                with torch._dynamo.config.patch(recompile_limit=GROUPED_RECOMPILE_LIMIT):
                    kernel(fn)(*args)
            else:
                kernel(fn)(*args)
            return
        except Exception as err:  # BackendCompilerFailed, missing C++ compiler, ...
            _broken = True
            log.warning(
                "SAGE: torch.compile of the fused update failed (%s: %s); using the eager implementation from now on",
                type(err).__name__,
                (str(err).splitlines() or [""])[0],
            )
    fallback()


def flat(t: Tensor) -> Tensor:
    """A 1-d view of a contiguous tensor, detached (what the kernels take)."""
    return t.detach().view(-1)


def scalars(device: torch.device, dtype: torch.dtype, values: Sequence[float]) -> list[Tensor]:
    """The kernels' hyper-parameters as 0-dim tensors (float64 for float64 tensors, else float32)."""
    sdtype = torch.float64 if dtype == torch.float64 else torch.float32
    return [torch.tensor(v, dtype=sdtype, device=device) for v in values]
