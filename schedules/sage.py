"""SAGE: sensitivity-guided adaptive learning rate (Liang et al., ICLR 2022; ALGORITHMS.md §1).

Sensitivity ``I = |θ ⊙ g|`` estimates how much the loss changes if an entry is zeroed. SAGE keeps
an exponential moving average ``Ī`` of it and scales each entry's step by the local uncertainty
``|I - Ī| / (Ī + ε²)``: entries whose smoothed sensitivity is low get larger steps.

This module holds

- :class:`AdamWSAGE` and :class:`AdamaxSAGE`, plain ``torch.optim.Optimizer`` subclasses
  (registered as ``adamw_sage`` / ``adamax_sage``). A parameter group with ``sage=False`` is
  updated by the plain base optimizer's maths; groups that do not say get ``sage=True``.
- :func:`sage_param_groups`, optimizer-ready groups for users outside the runner::

      groups = sage_param_groups(model, family="bert", weight_decay=0.01)
      opt = AdamaxSAGE(groups, lr=2e-4, beta3=0.85)     # works with HF Trainer(optimizers=(opt, sched))

- :class:`SAGESchedule`, the ``schedule=sage`` entry of the runner.

Implementation choices shared by both optimizers (**(choice)** marks a decision the spec leaves to us):

- **(choice)** The multiplier is evaluated in an algebraically identical form. With ``c_t = 1 - β3^t``
  when AdamW-SAGE bias-corrects and ``c_t = 1`` otherwise, ``Î_t = Ī_t / c_t`` and
  ``Ī_t = β3·Ī_{t-1} + (1-β3)·I``::

      |I - Î_t| / (Î_t + ε²)  =  c_t·|I - Î_t| / (Ī_t + c_t·ε²)
                              =  β3·|c_{t-1}·I - Ī_{t-1}| / (Ī_t + c_t·ε²)

  The right-hand side subtracts the *previous* average from I instead of an average that already
  contains (1-β3)·I, so there is less cancellation, and it makes the spec's first-step property
  exact in floating point on every path: at ``t = 1``, ``c_0 = 0`` and ``Ī_0 = 0``, so the
  numerator is exactly 0 and bias-corrected AdamW-SAGE leaves SAGE tensors bit-for-bit unchanged.
- **(choice)** Step counter: a per-parameter float32 0-dim tensor ``state["step"]`` like the torch
  optimizers (exact up to 2^24 steps; round-trips through ``state_dict`` and
  ``torch.load(weights_only=True)``). A parameter whose ``.grad`` is None is skipped and its counter
  does not advance.
- State: the base optimizer's tensors plus exactly one, ``state["exp_avg_sens"]`` (``Ī``), for
  parameters of ``sage=True`` groups. Tensors have the parameter's dtype (bf16 parameters get
  bf16 state, as in ``torch.optim.AdamW``).
- Gradients are used as given: clip globally and unscale (AMP) before ``step()``. Under
  ``torch.amp.GradScaler`` a step whose gradients overflowed is skipped by the scaler, so
  parameters and state stay untouched.
- Three implementations of the same maths, chosen per step and group:

  * ``reference`` (``foreach=False``): a plain per-tensor loop, the readable transcription.
  * ``foreach`` (``foreach=True``): ``torch._foreach_*`` ops over the group, in chunks of at most
    2^24 elements so temporaries stay bounded; the op sequence mirrors ``reference`` (same
    numbers, bit for bit on CPU).
  * ``fused`` (``fused=True``): the update of an element written as one expression that reads θ,
    g and the state once and writes them once (no temporaries), in one of two backends:

    - on CPU, a multi-tensor C++ kernel (``csrc/sage_cpu.cpp``, built once per machine by
      :mod:`schedules.sage_cpu`): **one call per group** runs a single OpenMP loop over 64K-element
      chunks of all its tensors, biases and LayerNorms included, so the per-tensor call overhead
      is gone and the update streams at memory bandwidth;
    - elsewhere (CUDA), or where that kernel cannot be built, the same expression per tensor,
      compiled once per process with ``torch.compile(dynamic=True)``; tensors under 2^15
      elements take the foreach ops there, since each compiled call costs ~40 µs of Python.

    Non-contiguous tensors take the eager path. Both backends compute low-precision dtypes in
    float32 and contract multiply-adds, so they match the reference to rounding (float64 runs
    match the spec transcription to 1e-10 over 60 steps; see the tests).

  **(choice)** ``foreach=None, fused=None`` (auto): ``fused`` when the optimizer holds at least
  2^22 elements (below that the one-off build or compile, ~30 s, costs more than it saves) and
  it can run here; otherwise ``foreach`` on accelerators and ``reference`` on CPU (on CPU the
  foreach ops allocate a full-size temporary per op, which measured slower than the per-tensor
  loop). If the C++ build fails, the compiled backend is tried, then the eager paths; each
  failure logs one warning.

Speed (``bench/bench_sage.py``, BERT-base shapes, 109.5M parameters, 85M in SAGE groups, 2
threads on the project's idle 2-core AMD EPYC VM; medians of 7 interleaved rounds): torch
``AdamW(fused=True)`` 62 ms, AdamW-SAGE 77 ms (1.24x), Adamax-SAGE 77 ms (1.24x); one thread
1.21x; the reference loop ~10x and foreach ~14-18x. SAGE must stream five full-size tensors (θ, g, m, v, Ī) where AdamW
streams four, so 1.22x over the whole model is the memory-traffic ratio ((85·9 + 24.5·7)/(109.5·7)
reads and writes). The per-tensor compiled kernels it replaced measured 1.41x: ~150 calls of
Python overhead and a less efficient loop.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from . import sage_cpu
from .base import Schedule
from common.errors import ConfigError
from .param_groups import build_param_groups, strip_names
from .patterns import family_patterns

log = logging.getLogger(__name__)

__all__ = ["AdamWSAGE", "AdamaxSAGE", "SAGESchedule", "sage_param_groups", "sensitivity_summary"]

_FOREACH_CHUNK = 1 << 24        # elements per foreach chunk (bounds the temporaries)
_FUSED_MIN_NUMEL = 1 << 22      # auto picks the fused path from this many elements on
_FUSED_MIN_TENSOR = 1 << 15     # compiled backend: smaller tensors take the foreach ops instead
_USE_CPU_KERNEL = True          # fused on CPU: the C++ kernel (False: the compiled per-tensor one)
_COMPILED: dict[str, Callable] = {}
_COMPILE_BROKEN = False


# ====================================================================================== kernels
# The fused kernels: one expression per tensor, compiled by torch.compile. Hyper-parameters come
# in as 0-dim tensors so that changing the learning rate or the step never recompiles.

def _adamw_fused_kernel(p: Tensor, g: Tensor, m: Tensor, v: Tensor, s: Tensor | None,
                        beta1: Tensor, beta2: Tensor, beta3: Tensor, c_prev: Tensor,
                        c_eps2: Tensor, step_size: Tensor, eps: Tensor, keep: Tensor) -> None:
    m_new = m * beta1 + g * (1 - beta1)
    v_new = v * beta2 + g * g * (1 - beta2)
    if s is not None:
        sens = (p * g).abs()
        num = (sens * c_prev - s).abs() * beta3
        s_new = s * beta3 + sens * (1 - beta3)
        # mult·m/(sqrt(v)+ε) with one division (measured ~5-10% faster than two at 1 thread)
        update = num * m_new / ((s_new + c_eps2) * (v_new.sqrt() + eps))
        s.copy_(s_new)
    else:
        update = m_new / (v_new.sqrt() + eps)
    p.copy_((p - step_size * update) * keep)
    m.copy_(m_new)
    v.copy_(v_new)


def _adamax_fused_kernel(p: Tensor, g: Tensor, m: Tensor, u: Tensor, s: Tensor | None,
                         beta1: Tensor, beta2: Tensor, beta3: Tensor, eps: Tensor,
                         eps2: Tensor, weight_decay: Tensor, lr: Tensor) -> None:
    m_new = m * beta1 + g * (1 - beta1)
    u_new = torch.maximum(u * beta2, g.abs() + eps)
    u_eps = u_new + eps
    if s is not None:
        sens = (p * g).abs()
        num = (sens - s).abs() * beta3
        s_new = s * beta3 + sens * (1 - beta3)
        # mult·(m/(u+ε) + λθ) with one division
        d = num * (m_new + weight_decay * p * u_eps) / ((s_new + eps2) * u_eps)
        s.copy_(s_new)
    else:
        d = m_new / u_eps + weight_decay * p
    p.copy_(p - lr * d)
    m.copy_(m_new)
    u.copy_(u_new)


def _compiled(fn: Callable) -> Callable:
    """``torch.compile(fn)``, one per thread count.

    Inductor's C++ backend picks a serial or an OpenMP loop from the thread count and from the
    size of the first tensor it sees, and caches that choice on disk for every size. Making the
    thread count part of the options (hence of the cache key) and ``min_chunk_size=1`` gives a
    parallel loop whenever there are several threads, whatever size came first, and a plain
    serial loop (measured ~15% faster than a one-thread OpenMP loop) with one thread.
    ``-ffp-contract=fast`` lets the compiler fuse multiply-adds (measured ~12% faster at one
    thread, where the loop was partly compute-bound; with it, the SAGE loop runs within ~5% of a
    loop that only streams the same five tensors).
    """
    threads = torch.get_num_threads()
    key = f"{fn.__name__}/threads={threads}"
    if key not in _COMPILED:
        log.info("SAGE: compiling %s with torch.compile (once per process)", fn.__name__)
        _COMPILED[key] = torch.compile(fn, dynamic=True, fullgraph=True, options={
            "cpp.threads": threads, "cpp.min_chunk_size": 1,
            "cpp.enable_floating_point_contract_flag": "fast"})
    return _COMPILED[key]


def _compile_usable() -> bool:
    if _COMPILE_BROKEN:
        return False
    try:
        import torch._dynamo

        if not torch._dynamo.is_dynamo_supported():
            return False
        return not torch.compiler.is_compiling()
    except Exception:  # pragma: no cover - exotic builds
        return False


def _fused_usable(device: torch.device) -> bool:
    """Whether the fused path can run on ``device`` (builds the CPU kernel on first use)."""
    if device.type == "cpu" and _USE_CPU_KERNEL and sage_cpu.kernels() is not None:
        return True
    return _compile_usable()


def _fused_call(fn: Callable, fallback: Callable[[], None], *args) -> None:
    """Run the compiled ``fn``; on a compile failure warn once and run ``fallback`` from then on.

    Compilation happens before the kernel touches its inputs, so falling back is safe.
    """
    global _COMPILE_BROKEN
    if not _COMPILE_BROKEN:
        try:
            _compiled(fn)(*args)
            return
        except Exception as err:  # BackendCompilerFailed, missing C++ compiler, ...
            _COMPILE_BROKEN = True
            log.warning("SAGE: torch.compile of the fused update failed (%s: %s); using the eager "
                        "implementation from now on", type(err).__name__, (str(err).splitlines() or [""])[0])
    fallback()


def _flat(t: Tensor) -> Tensor:
    return t.detach().view(-1)


def _chunks(indices: Sequence[int], sizes: Sequence[int]) -> Iterable[list[int]]:
    """Split ``indices`` into runs whose total size stays below the foreach chunk budget."""
    run: list[int] = []
    total = 0
    for i in indices:
        if run and total + sizes[i] > _FOREACH_CHUNK:
            yield run
            run, total = [], 0
        run.append(i)
        total += sizes[i]
    if run:
        yield run


# ====================================================================================== base class
class _SAGEOptimizer(torch.optim.Optimizer):
    """Shared parts: validation, state initialisation, implementation choice, the step loop."""

    _base_keys: tuple[str, ...] = ()           # base optimizer state tensors, set by subclasses
    _fused_kernel: Callable                    # the compiled per-tensor update, set by subclasses
    _cpu_kernel: str                           # its multi-tensor C++ twin in sage_cpu, by name

    def __init__(self, params, defaults: dict[str, Any]):
        lr, betas, beta3 = defaults["lr"], defaults["betas"], defaults["beta3"]
        eps, weight_decay = defaults["eps"], defaults["weight_decay"]
        if isinstance(lr, Tensor) or not isinstance(lr, (int, float)) or not lr >= 0.0:
            raise ValueError(f"Invalid learning rate: {lr!r} (must be a number >= 0)")
        if len(betas) != 2:
            raise ValueError(f"Invalid betas: {betas!r} (must be two numbers in [0, 1))")
        for i, b in enumerate(betas):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {b} (must be in [0, 1))")
        if not 0.0 <= beta3 < 1.0:
            raise ValueError(f"Invalid beta3 value: {beta3} (must be in [0, 1))")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps} (must be >= 0)")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay} (must be >= 0)")
        if defaults["foreach"] and defaults["fused"]:
            raise ValueError("foreach=True and fused=True are mutually exclusive")
        defaults = {**defaults, "betas": tuple(float(b) for b in betas), "sage": True}
        super().__init__(params, defaults)
        self._auto_fused: bool | None = None

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("sage", True)
            group.setdefault("foreach", None)
            group.setdefault("fused", None)
        self._auto_fused = None

    # ----------------------------------------------------------------- state
    def _init_group(self, group: dict) -> tuple[list[Tensor], list[Tensor], list[dict]]:
        params, grads, states = [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            if torch.is_complex(p):
                raise RuntimeError(f"{type(self).__name__} does not support complex parameters")
            state = self.state[p]
            if len(state) == 0:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                for key in self._base_keys:
                    state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["sage"] and "exp_avg_sens" not in state:
                state["exp_avg_sens"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            states.append(state)
        return params, grads, states

    def _impl(self, group: dict, params: list[Tensor]) -> str:
        """The implementation for this group: ``fused``, ``foreach`` or ``reference``."""
        fused, foreach = group["fused"], group["foreach"]
        device = params[0].device
        eager = "reference" if device.type == "cpu" else "foreach"
        if fused:
            return "fused" if _fused_usable(device) else eager
        if foreach is not None:
            return "foreach" if foreach else "reference"
        if fused is None and self._use_auto_fused(device):
            return "fused"
        return eager

    def _use_auto_fused(self, device: torch.device) -> bool:
        if self._auto_fused is None:
            numel = sum(p.numel() for g in self.param_groups for p in g["params"])
            self._auto_fused = numel >= _FUSED_MIN_NUMEL
        return self._auto_fused and _fused_usable(device)

    # ----------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, states = self._init_group(group)
            if not params:
                continue
            for st in states:
                st["step"] += 1
            impl = self._impl(group, params)
            # bucket by step value (one bucket unless some tensor skipped steps), device and dtype
            buckets: dict[tuple, list[int]] = {}
            for i, (p, st) in enumerate(zip(params, states)):
                buckets.setdefault((int(st["step"].item()), p.device, p.dtype), []).append(i)
            for (t, _, _), idx in buckets.items():
                self._update(impl, group, t, [params[i] for i in idx], [grads[i] for i in idx],
                             [states[i] for i in idx])
        return loss

    def _update(self, impl: str, group: dict, t: int, params, grads, states) -> None:
        """Update tensors that share step ``t``, device and dtype with implementation ``impl``."""
        if impl == "fused":
            params, grads, states = self._fused(group, t, params, grads, states)
            impl = "foreach"
        if impl == "foreach":
            sizes = [p.numel() for p in params]
            for run in _chunks(range(len(params)), sizes):
                self._foreach(group, t, [params[i] for i in run], [grads[i] for i in run],
                              [states[i] for i in run])
        else:
            self._reference(group, t, params, grads, states)

    def _fused(self, group: dict, t: int, params, grads, states) -> tuple[list, list, list]:
        """The fused update of what it can take; returns the tensors left for the foreach ops.

        On CPU all contiguous tensors go to the C++ kernel in one call. Elsewhere (or where that
        kernel cannot be built) each contiguous tensor from ``_FUSED_MIN_TENSOR`` elements on gets
        one call of the compiled kernel.
        """
        keys = (*self._base_keys, "exp_avg_sens") if group["sage"] else self._base_keys
        coefficients = self._kernel_coefficients(group, t)
        contiguous = [all(x.is_contiguous() for x in (p, g, *(st[k] for k in keys)))
                      for p, g, st in zip(params, grads, states)]
        cpu_kernels = (sage_cpu.kernels() if _USE_CPU_KERNEL and params[0].device.type == "cpu"
                       else None)
        if cpu_kernels is not None:
            take = [i for i, ok in enumerate(contiguous) if ok]
            if take:
                state_lists = [[states[i][k] for i in take] for k in keys]
                if not group["sage"]:
                    state_lists.append([])
                getattr(cpu_kernels, self._cpu_kernel)(
                    [params[i] for i in take], [grads[i] for i in take], *state_lists, *coefficients)
        else:
            take, scalars = [], None
            for i, (p, g, st) in enumerate(zip(params, grads, states)):
                if p.numel() < _FUSED_MIN_TENSOR or not contiguous[i]:
                    continue
                if scalars is None:
                    scalars = self._scalars(p.device, p.dtype, coefficients)
                _fused_call(self._fused_kernel,
                            lambda i=i: self._reference(group, t, [params[i]], [grads[i]], [states[i]]),
                            _flat(p), _flat(g), *(_flat(st[k]) for k in self._base_keys),
                            _flat(st["exp_avg_sens"]) if group["sage"] else None, *scalars)
                take.append(i)
        taken = set(take)
        rest = [i for i in range(len(params)) if i not in taken]
        return ([params[i] for i in rest], [grads[i] for i in rest], [states[i] for i in rest])

    @staticmethod
    def _scalars(device: torch.device, dtype: torch.dtype, values: Sequence[float]) -> list[Tensor]:
        sdtype = torch.float64 if dtype == torch.float64 else torch.float32
        return [torch.tensor(v, dtype=sdtype, device=device) for v in values]


# ====================================================================================== AdamW-SAGE
class AdamWSAGE(_SAGEOptimizer):
    r"""AdamW with SAGE (reference name ``UnstructAwareAdamW``; ALGORITHMS.md §1).

    For each parameter of a ``sage=True`` group, with ``t`` its step counter::

        m = β1·m + (1-β1)·g
        v = β2·v + (1-β2)·g²
        I = |θ ⊙ g|                           (θ before this step's update)
        Ī = β3·Ī + (1-β3)·I
        bias_correction: s = lr_t·|I - Î|/(Î + ε²)·sqrt(1-β2^t)/(1-β1^t),  Î = Ī/(1-β3^t)
        otherwise:       s = lr_t·|I - Ī|/(Ī + ε²)
        θ -= s·m/(sqrt(v) + ε)
        θ -= lr_t·λ·θ

    With bias correction the first step leaves SAGE parameters unchanged (``Î = I``), as in the
    reference.

    **(choice)** Decoupled decay uses the group's current (scheduled) ``lr``, as
    ``torch.optim.AdamW`` does; the reference used the base lr because it scheduled inside the
    optimizer.

    **(choice)** ``sage=False`` groups use the same maths without the SAGE factor (the original
    Hugging Face ``AdamW`` the reference derives from):
    ``θ -= lr_t·sqrt(1-β2^t)/(1-β1^t)·m/(sqrt(v)+ε)``
    (``lr_t`` alone without bias correction), then ``θ -= lr_t·λ·θ``. This differs from
    ``torch.optim.AdamW`` only in where ε sits and in applying decay after the update.

    Args:
        params: parameters or groups; a group may set ``sage`` (default True) and ``weight_decay``.
        lr: learning rate (the LR scheduler scales the group's ``lr``).
        betas: (β1, β2), each in [0, 1).
        beta3: EMA coefficient of the sensitivity, in [0, 1); the paper uses 0.6–0.9.
        eps: ε (the multiplier's denominator uses ε²), >= 0.
        weight_decay: λ, >= 0.
        bias_correction: bias-correct m, v and Ī (default True, the reference's default).
        foreach / fused: implementation choice, see the module docstring (None: automatic).
    """

    _base_keys = ("exp_avg", "exp_avg_sq")
    _fused_kernel = staticmethod(_adamw_fused_kernel)
    _cpu_kernel = "adamw_sage_"

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 beta3: float = 0.75, eps: float = 1e-6, weight_decay: float = 0.0,
                 bias_correction: bool = True, *, foreach: bool | None = None,
                 fused: bool | None = None):
        super().__init__(params, {"lr": lr, "betas": betas, "beta3": beta3, "eps": eps,
                                  "weight_decay": weight_decay,
                                  "bias_correction": bool(bias_correction),
                                  "foreach": foreach, "fused": fused})

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("bias_correction", True)

    @staticmethod
    def _coefficients(group: dict, t: int) -> tuple[float, float, float]:
        """(step size without the SAGE factor, c_{t-1}, c_t) for step ``t``; c_t = 1-β3^t or 1."""
        beta1, beta2 = group["betas"]
        if group["bias_correction"]:
            beta3 = group["beta3"]
            return (group["lr"] * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t),
                    1 - beta3 ** (t - 1), 1 - beta3 ** t)
        return group["lr"], 1.0, 1.0

    def _kernel_coefficients(self, group: dict, t: int) -> list[float]:
        """The fused kernels' hyper-parameters, in their argument order."""
        beta1, beta2 = group["betas"]
        eps, lr, wd = group["eps"], group["lr"], group["weight_decay"]
        step_size, c_prev, c = self._coefficients(group, t)
        return [beta1, beta2, group["beta3"], c_prev, c * eps * eps, step_size, eps, 1 - lr * wd]

    def _reference(self, group, t, params, grads, states) -> None:
        """The readable per-tensor loop."""
        beta1, beta2 = group["betas"]
        beta3, eps, lr, wd = group["beta3"], group["eps"], group["lr"], group["weight_decay"]
        step_size, c_prev, c = self._coefficients(group, t)
        for param, grad, state in zip(params, grads, states):
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)                   # m
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)      # v
            update = exp_avg / exp_avg_sq.sqrt().add_(eps)                   # m / (sqrt(v) + ε)
            if group["sage"]:
                exp_avg_sens = state["exp_avg_sens"]
                sens = torch.mul(param, grad).abs_()                          # I = |θ ⊙ g|
                # c_t·|I - Î_t| = β3·|c_{t-1}·I - Ī_{t-1}|  (module docstring)
                num = torch.mul(sens, c_prev).sub_(exp_avg_sens).abs_().mul_(beta3)
                exp_avg_sens.mul_(beta3).add_(sens, alpha=1 - beta3)          # Ī_t
                update.mul_(num.div_(exp_avg_sens + c * eps * eps))           # × |I - Î|/(Î + ε²)
            param.add_(update, alpha=-step_size)
            if wd != 0:
                param.mul_(1 - lr * wd)                                       # θ -= lr·λ·θ

    def _foreach(self, group, t, params, grads, states) -> None:
        """The reference loop's op sequence as multi-tensor ops over one chunk."""
        beta1, beta2 = group["betas"]
        beta3, eps, lr, wd = group["beta3"], group["eps"], group["lr"], group["weight_decay"]
        step_size, c_prev, c = self._coefficients(group, t)
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(denom, eps)
        update = torch._foreach_div(exp_avgs, denom)
        del denom
        if group["sage"]:
            sens_bar = [s["exp_avg_sens"] for s in states]
            sens = torch._foreach_mul(params, grads)
            torch._foreach_abs_(sens)
            num = torch._foreach_mul(sens, c_prev)
            torch._foreach_sub_(num, sens_bar)
            torch._foreach_abs_(num)
            torch._foreach_mul_(num, beta3)
            torch._foreach_mul_(sens_bar, beta3)
            torch._foreach_add_(sens_bar, sens, alpha=1 - beta3)
            del sens
            torch._foreach_div_(num, torch._foreach_add(sens_bar, c * eps * eps))
            torch._foreach_mul_(update, num)
            del num
        torch._foreach_add_(params, update, alpha=-step_size)
        if wd != 0:
            torch._foreach_mul_(params, 1 - lr * wd)


# ====================================================================================== Adamax-SAGE
class AdamaxSAGE(_SAGEOptimizer):
    r"""Adamax with SAGE (reference name ``UnstructAwareAdamax``; ALGORITHMS.md §1).

    For each parameter of a ``sage=True`` group (no bias correction anywhere in this variant)::

        m = β1·m + (1-β1)·g
        u = max(β2·u, |g| + ε)
        d = m/(u + ε) + λ·θ                  (decay inside the update, so SAGE scales it too)
        I = |θ ⊙ g|,  Ī = β3·Ī + (1-β3)·I    (θ before this step's update)
        θ -= lr_t·|I - Ī|/(Ī + ε²)·d

    ``sage=False`` groups use the reference (MT-DNN) Adamax maths without the SAGE scaling:
    ``θ -= lr_t·d`` with the same ``m``, ``u`` and ``d``. Note this is not ``torch.optim.Adamax``
    (which bias-corrects m and adds ε only once).

    Args:
        params: parameters or groups; a group may set ``sage`` (default True) and ``weight_decay``.
        lr: learning rate. betas: (β1, β2) in [0, 1). beta3: in [0, 1), the paper uses 0.6–0.9
        (0.85 for MNLI). eps: ε >= 0. weight_decay: λ >= 0 (0.01 for weights in the reference;
        use 0 for biases and LayerNorm, as :func:`sage_param_groups` does).
        foreach / fused: implementation choice, see the module docstring (None: automatic).
    """

    _base_keys = ("exp_avg", "exp_inf")
    _fused_kernel = staticmethod(_adamax_fused_kernel)
    _cpu_kernel = "adamax_sage_"

    def __init__(self, params, lr: float = 2e-4, betas: tuple[float, float] = (0.9, 0.999),
                 beta3: float = 0.75, eps: float = 1e-6, weight_decay: float = 0.01, *,
                 foreach: bool | None = None, fused: bool | None = None):
        super().__init__(params, {"lr": lr, "betas": betas, "beta3": beta3, "eps": eps,
                                  "weight_decay": weight_decay, "foreach": foreach, "fused": fused})

    def _kernel_coefficients(self, group: dict, t: int) -> list[float]:
        """The fused kernels' hyper-parameters, in their argument order."""
        beta1, beta2 = group["betas"]
        eps = group["eps"]
        return [beta1, beta2, group["beta3"], eps, eps * eps, group["weight_decay"], group["lr"]]

    def _reference(self, group, t, params, grads, states) -> None:
        """The readable per-tensor loop."""
        beta1, beta2 = group["betas"]
        beta3, eps, lr, wd = group["beta3"], group["eps"], group["lr"], group["weight_decay"]
        for param, grad, state in zip(params, grads, states):
            exp_avg, exp_inf = state["exp_avg"], state["exp_inf"]
            exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)                   # m
            torch.maximum(exp_inf.mul_(beta2), grad.abs().add_(eps), out=exp_inf)  # u
            update = exp_avg / (exp_inf + eps)                                # d = m / (u + ε)
            if wd != 0:
                update.add_(param, alpha=wd)                                  # d += λ·θ
            if group["sage"]:
                exp_avg_sens = state["exp_avg_sens"]
                sens = torch.mul(param, grad).abs_()                          # I = |θ ⊙ g|
                # |I - Ī_t| = β3·|I - Ī_{t-1}|  (module docstring)
                num = torch.sub(sens, exp_avg_sens).abs_().mul_(beta3)
                exp_avg_sens.mul_(beta3).add_(sens, alpha=1 - beta3)          # Ī_t
                update.mul_(num.div_(exp_avg_sens + eps * eps))               # × |I - Ī| / (Ī + ε²)
            param.add_(update, alpha=-lr)

    def _foreach(self, group, t, params, grads, states) -> None:
        """The reference loop's op sequence as multi-tensor ops over one chunk."""
        beta1, beta2 = group["betas"]
        beta3, eps, lr, wd = group["beta3"], group["eps"], group["lr"], group["weight_decay"]
        exp_avgs = [s["exp_avg"] for s in states]
        exp_infs = [s["exp_inf"] for s in states]
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
        torch._foreach_mul_(exp_infs, beta2)
        grad_abs = torch._foreach_abs(grads)
        torch._foreach_add_(grad_abs, eps)
        torch._foreach_maximum_(exp_infs, grad_abs)
        del grad_abs
        update = torch._foreach_div(exp_avgs, torch._foreach_add(exp_infs, eps))
        if wd != 0:
            torch._foreach_add_(update, params, alpha=wd)
        if group["sage"]:
            sens_bar = [s["exp_avg_sens"] for s in states]
            sens = torch._foreach_mul(params, grads)
            torch._foreach_abs_(sens)
            num = torch._foreach_sub(sens, sens_bar)
            torch._foreach_abs_(num)
            torch._foreach_mul_(num, beta3)
            torch._foreach_mul_(sens_bar, beta3)
            torch._foreach_add_(sens_bar, sens, alpha=1 - beta3)
            del sens
            torch._foreach_div_(num, torch._foreach_add(sens_bar, eps * eps))
            torch._foreach_mul_(update, num)
            del num
        torch._foreach_add_(params, update, alpha=-lr)


# ====================================================================================== groups
def sage_param_groups(model_or_named_params, family: str = "bert",
                      sage_patterns: Sequence[str] | None = None,
                      no_decay: Sequence[str] | None = None,
                      weight_decay: float = 0.01) -> list[dict]:
    """Optimizer-ready parameter groups for SAGE, for use outside the runner.

    Args:
        model_or_named_params: an ``nn.Module`` or an iterable of ``(name, parameter)``.
        family: model family whose default patterns apply (``bert``, ``roberta``, ``deberta``,
            ``fairseq_transformer``, ``vit``; see ``schedules/patterns.py``).
        sage_patterns: name substrings of the SAGE tensors (default: the family's).
        no_decay: name substrings of tensors without weight decay (default: the family's).
        weight_decay: decay of the other tensors.

    Returns:
        Groups with ``params``, ``weight_decay`` and ``sage`` (no ``names``), ready for
        :class:`AdamWSAGE` / :class:`AdamaxSAGE`. A pattern list matching no parameter raises
        :class:`~schedules.errors.ConfigError`.
    """
    named = (model_or_named_params.named_parameters()
             if isinstance(model_or_named_params, torch.nn.Module) else model_or_named_params)
    groups = build_param_groups(
        named, weight_decay=weight_decay,
        no_decay=tuple(no_decay) if no_decay is not None else family_patterns(family, "no_decay"),
        flag="sage",
        flag_patterns=tuple(sage_patterns) if sage_patterns else family_patterns(family, "sage"),
        flag_key="sage_patterns")
    return strip_names(groups)


# ====================================================================================== summary
def _probe_indices(optimizer: torch.optim.Optimizer, k: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    """A fixed uniform random sample of ``k`` entries over all SAGE tensors: (param, flat indices)."""
    params = [p for g in optimizer.param_groups if g.get("sage", True) for p in g["params"]]
    if not params:
        return []
    sizes = torch.tensor([p.numel() for p in params], dtype=torch.int64)
    ends = torch.cumsum(sizes, 0)
    total = int(ends[-1])
    gen = torch.Generator().manual_seed(seed)
    pos = torch.randint(total, (min(k, total),), generator=gen).sort().values
    owner = torch.searchsorted(ends, pos, right=True)
    probe = []
    for i in owner.unique().tolist():
        local = pos[owner == i] - (ends[i] - sizes[i])
        probe.append((params[i], local.to(params[i].device)))
    return probe


def _quantiles(x: Tensor, prefix: str, qs=(0.1, 0.5, 0.9)) -> dict[str, float]:
    out = {f"{prefix}_mean": float(x.mean())}
    vals = torch.quantile(x, torch.tensor(qs, dtype=x.dtype))
    out.update({f"{prefix}_p{round(q * 100)}": float(v) for q, v in zip(qs, vals)})
    return out


def sensitivity_summary(optimizer: torch.optim.Optimizer, probe: list[tuple[Tensor, Tensor]],
                        last_sens: dict[int, Tensor] | None = None) -> dict[str, float]:
    """Summary of Ī and of the per-entry learning-rate multiplier on a fixed subsample.

    ``sage/sens_*``: the (bias-corrected, where the optimizer bias-corrects) sensitivity EMA Î.
    ``sage/lr_mult_*``: ``|I - Î| / (Î + ε²)``, the factor SAGE applied to the entry's step in
    the last update, from ``last_sens`` (I of the probe entries recorded just before that update;
    keyed by ``id(param)``). Without it only the ``sens`` statistics are returned.
    """
    lookup = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    sens, mult = [], []
    for p, idx in probe:
        state = optimizer.state.get(p)
        if not state or "exp_avg_sens" not in state:
            continue
        group = lookup[id(p)]
        t = float(state["step"])
        c3 = 1 - group["beta3"] ** t if group.get("bias_correction", False) else 1.0
        s_hat = state["exp_avg_sens"].reshape(-1)[idx].double() / c3
        sens.append(s_hat)
        if last_sens is not None and id(p) in last_sens:
            mult.append((last_sens[id(p)] - s_hat).abs() / (s_hat + group["eps"] ** 2))
    out: dict[str, float] = {}
    if sens:
        out.update(_quantiles(torch.cat(sens).cpu(), "sage/sens"))
    if mult:
        out.update(_quantiles(torch.cat(mult).cpu(), "sage/lr_mult"))
    return out


# ====================================================================================== schedule
class SAGESchedule(Schedule):
    """``schedule=sage``: AdamW-SAGE or Adamax-SAGE with the shared LR schedules.

    Config keys (``conf/schedule/sage.yaml``): ``base`` (adamw | adamax), ``lr``, ``betas``,
    ``beta3``, ``eps``, ``weight_decay``, ``bias_correction`` (AdamW-SAGE only; Adamax-SAGE has no
    bias correction), ``lr_schedule``, ``warmup_ratio``, ``warmup_steps``, ``sage_patterns``,
    ``no_decay_patterns``; optional ``foreach`` / ``fused`` pick the optimizer implementation.

    ``log_metrics`` returns ``lr`` and the :func:`sensitivity_summary` of a fixed random sample of
    4096 SAGE entries (chosen once, seed 0). **(choice)** The multiplier needs the step's I, which
    the optimizer does not keep: a step pre-hook on the optimizer records I = |θ ⊙ g| on the sample
    entries just before each update that really happens (a GradScaler-skipped step does not call
    it). That costs one small gather per SAGE tensor per step and no full-size state.
    """

    name = "sage"
    config_keys = Schedule.config_keys | {"base", "beta3", "bias_correction", "sage_patterns",
                                          "foreach", "fused"}
    BASES = {"adamw": "adamw_sage", "adamax": "adamax_sage"}
    PROBE_SIZE = 4096

    def __init__(self, cfg: Mapping[str, Any]):
        super().__init__(cfg)
        base = self.cfg.get("base", "adamax")
        if base not in self.BASES:
            raise ConfigError(f"schedule.base='{base}' is unknown; allowed: {', '.join(self.BASES)}")
        beta3 = self.cfg.get("beta3", 0.75)
        if isinstance(beta3, bool) or not isinstance(beta3, (int, float)) or not 0.0 <= beta3 < 1.0:
            raise ConfigError(f"schedule.beta3 must be a number in [0, 1), got {beta3!r}")
        if not isinstance(self.cfg.get("bias_correction", True), bool):
            raise ConfigError(
                f"schedule.bias_correction must be true or false, got {self.cfg['bias_correction']!r}")
        self._probe: list[tuple[Tensor, Tensor]] = []
        self._last_sens: dict[int, Tensor] = {}

    def setup(self, model: torch.nn.Module, family: str, total_steps: int) -> None:
        groups = self.param_groups(model, family, flag="sage")
        base = self.cfg.get("base", "adamax")
        extra: dict[str, Any] = {"beta3": float(self.cfg.get("beta3", 0.75))}
        if base == "adamw":
            extra["bias_correction"] = bool(self.cfg.get("bias_correction", True))
        for key in ("foreach", "fused"):
            if self.cfg.get(key) is not None:
                extra[key] = bool(self.cfg[key])
        self.optimizer = self.make_optimizer(self.BASES[base], groups, **extra)
        self.lr_scheduler = self.make_lr_scheduler(total_steps)
        self._probe = _probe_indices(self.optimizer, self.PROBE_SIZE, seed=0)
        self.optimizer.register_step_pre_hook(self._record_sensitivity)

    def _record_sensitivity(self, optimizer, args, kwargs) -> None:
        with torch.no_grad():
            self._last_sens = {
                id(p): (p.detach().reshape(-1)[idx].double() * p.grad.reshape(-1)[idx].double()).abs()
                for p, idx in self._probe if p.grad is not None}

    def log_metrics(self, step: int) -> dict[str, float]:
        out = {"lr": self.optimizer.param_groups[0]["lr"]}
        out.update(sensitivity_summary(self.optimizer, self._probe, self._last_sens))
        return out
