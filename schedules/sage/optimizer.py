"""What AdamW-SAGE and Adamax-SAGE share: validation, state, the choice of implementation, the step loop.

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
- Two implementations of the same maths, chosen per step and group; each optimizer's module
  (:mod:`.adamw`, :mod:`.adamax`) writes both once:

  * ``reference`` (``fused=False``): a plain per-tensor loop, the readable transcription.
  * ``fused`` (``fused=True``): the update of an element written as one expression that reads θ,
    g and the state once and writes them once (no temporaries), in one of two backends:

    - on CPU, a multi-tensor C++ kernel (``csrc/sage_cpu.cpp``, built once per machine by
      :mod:`.cpu_kernel`): **one call per group** runs a single OpenMP loop over 64K-element
      chunks of all its tensors, biases and LayerNorms included, so the per-tensor call overhead
      is gone and the update streams at memory bandwidth;
    - elsewhere (CUDA), or where that kernel cannot be built, the same expression per tensor,
      compiled once per process with ``torch.compile(dynamic=True)`` (:mod:`.compiled`); tensors
      under 2^15 elements take the reference loop there (each compiled call has a fixed Python
      cost). Its multi-tensor form (``backend="compiled_grouped"``: one compiled call per
      group, small tensors included) is ready for CUDA and tested on CPU, but not yet timed on a
      GPU, so it is not the default (``bench/gpu_check.sh`` times both).

  The choice is per optimizer and group, as torch's ``fused`` / ``foreach``: ``fused`` (None: auto)
  and ``backend`` (None: :func:`fused_backend`'s policy; or one of :data:`BACKENDS`) are
  constructor arguments and param-group keys; ``fused_min_numel`` sets auto's size threshold.

    Non-contiguous tensors take the reference loop. Both backends compute low-precision dtypes in
    float32 and contract multiply-adds, so they match the reference to rounding (float64 runs
    match the spec transcription to 1e-10 over 60 steps; see the tests).

  **(choice)** ``fused=None`` (auto): ``fused`` when the optimizer holds at least 2^22 elements
  (below that the one-off build or compile costs more than it saves) and it can run
  here; otherwise ``reference``. If the C++ build fails, the compiled backend is tried, then the
  reference loop; each failure logs one warning.

  **(choice)** There is no ``foreach`` implementation (``torch._foreach_*`` ops over the group)
  and no ``foreach`` argument (passing one is a TypeError, as for any unknown keyword): on CPU it
  was slower than the reference loop (the foreach ops allocate a full-size temporary per op), and
  the fused path serves every device that needs speed.

Speed: ``bench/bench_sage.py``; measured numbers in docs/benchmarks.md ("SAGE's fused CPU kernel").
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from . import compiled, cpu_kernel

#: ``fused=None`` (auto) picks the fused path for optimizers of at least this many elements
FUSED_MIN_NUMEL = 1 << 22
#: the fused path's backends (the ``backend`` argument; None: :func:`fused_backend` picks):
#: ``cpu_kernel`` the multi-tensor C++ kernel (CPU only), ``compiled`` the torch.compile kernel per
#: tensor, ``compiled_grouped`` its multi-tensor form (one compiled call per group)
BACKENDS = ("cpu_kernel", "compiled", "compiled_grouped")


def fused_backend(device: torch.device, backend: str | None = None) -> str | None:
    """The one policy for the fused path on ``device``: the backend that runs ``backend`` (None:
    the C++ kernel on CPU, the per-tensor compiled kernel elsewhere), falling back from the C++
    kernel to ``compiled`` where it cannot be built; None when no fused backend can run here
    (the step then takes the reference loop)."""
    if backend is None:
        backend = "cpu_kernel" if device.type == "cpu" else "compiled"
    if backend == "cpu_kernel":
        if device.type == "cpu" and cpu_kernel.kernels() is not None:
            return "cpu_kernel"
        backend = "compiled"
    return backend if compiled.usable() else None


def fused_usable(device: torch.device, backend: str | None = None) -> bool:
    """Whether the fused path can run on ``device`` (builds the CPU kernel on first use)."""
    return fused_backend(device, backend) is not None


class SAGEOptimizer(torch.optim.Optimizer):
    """Shared parts: validation, state initialisation, implementation choice, the step loop.

    A subclass sets :attr:`_base_keys`, :attr:`_fused_kernel` and :attr:`_cpu_kernel` and writes
    the maths: ``_reference`` (the readable loop) and ``_kernel_coefficients`` (the fused
    kernels' hyper-parameters for step ``t``, in their argument order).
    """

    _base_keys: tuple[str, ...] = ()  # base optimizer state tensors, set by subclasses
    _fused_kernel: Callable  # the compiled per-tensor update, set by subclasses
    _cpu_kernel: str  # its multi-tensor C++ twin in cpu_kernel, by name

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
        backend = defaults.get("backend")
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"Invalid backend: {backend!r} (must be None or one of {', '.join(BACKENDS)})")
        fused_min_numel = defaults.pop("fused_min_numel", FUSED_MIN_NUMEL)
        if not isinstance(fused_min_numel, int) or fused_min_numel < 0:
            raise ValueError(f"Invalid fused_min_numel: {fused_min_numel!r} (must be an integer >= 0)")
        defaults = {"backend": None, **defaults, "betas": tuple(float(b) for b in betas), "sage": True}
        super().__init__(params, defaults)
        self.fused_min_numel = fused_min_numel
        self._auto_fused: bool | None = None

    def __setstate__(self, state):
        super().__setstate__(state)
        # state saved before the foreach implementation was dropped still names it: ignore it
        self.defaults.pop("foreach", None)
        for group in self.param_groups:
            group.pop("foreach", None)
            group.setdefault("sage", True)
            group.setdefault("fused", None)
            group.setdefault("backend", None)
        self.__dict__.setdefault("fused_min_numel", FUSED_MIN_NUMEL)
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

    # ----------------------------------------------------------------- implementation choice
    def _impl(self, group: dict, params: list[Tensor]) -> str:
        """The implementation for this group: a fused backend (:data:`BACKENDS`) or ``reference``."""
        fused = group["fused"]
        if fused is None:
            fused = self._use_auto_fused()
        backend = fused_backend(params[0].device, group["backend"]) if fused else None
        return backend or "reference"

    def _use_auto_fused(self) -> bool:
        """Whether the optimizer is large enough for auto to pick the fused path."""
        if self._auto_fused is None:
            numel = sum(p.numel() for g in self.param_groups for p in g["params"])
            self._auto_fused = numel >= self.fused_min_numel
        return self._auto_fused

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
                self._update(impl, group, t, [params[i] for i in idx], [grads[i] for i in idx], [states[i] for i in idx])
        return loss

    def _update(self, impl: str, group: dict, t: int, params, grads, states) -> None:
        """Update tensors that share step ``t``, device and dtype with implementation ``impl``."""
        if impl != "reference":
            params, grads, states = self._fused(impl, group, t, params, grads, states)
        if params:
            self._reference(group, t, params, grads, states)

    def _fused(self, backend: str, group: dict, t: int, params, grads, states) -> tuple[list, list, list]:
        """The fused update of what ``backend`` can take; returns the tensors left for the reference loop.

        ``cpu_kernel``: all contiguous tensors in one call of the C++ kernel. ``compiled``: each
        contiguous tensor from ``compiled.MIN_TENSOR`` elements on, one call of the compiled kernel.
        ``compiled_grouped``: all contiguous tensors in one call of its compiled multi-tensor form.
        """
        keys = (*self._base_keys, "exp_avg_sens") if group["sage"] else self._base_keys
        coefficients = self._kernel_coefficients(group, t)
        contiguous = [all(x.is_contiguous() for x in (p, g, *(st[k] for k in keys))) for p, g, st in zip(params, grads, states)]
        if backend == "cpu_kernel":
            cpu_kernels = cpu_kernel.kernels()
            take = [i for i, ok in enumerate(contiguous) if ok]
            if take:
                state_lists = [[states[i][k] for i in take] for k in keys]
                if not group["sage"]:
                    state_lists.append([])
                getattr(cpu_kernels, self._cpu_kernel)(
                    [params[i] for i in take], [grads[i] for i in take], *state_lists, *coefficients
                )
        elif backend == "compiled_grouped":
            take = [i for i, ok in enumerate(contiguous) if ok]
            if take:
                flat = compiled.flat
                lists = [
                    [flat(params[i]) for i in take],
                    [flat(grads[i]) for i in take],
                    *([flat(states[i][k]) for i in take] for k in self._base_keys),
                    [flat(states[i]["exp_avg_sens"]) for i in take] if group["sage"] else None,
                ]
                compiled.run(
                    compiled.grouped(self._fused_kernel),
                    lambda: self._reference(
                        group, t, [params[i] for i in take], [grads[i] for i in take], [states[i] for i in take]
                    ),
                    *lists,
                    *compiled.scalars(params[0].device, params[0].dtype, coefficients),
                )
        else:
            take, scalars = [], None
            flat = compiled.flat
            for i, (p, g, st) in enumerate(zip(params, grads, states)):
                if p.numel() < compiled.MIN_TENSOR or not contiguous[i]:
                    continue
                if scalars is None:
                    scalars = compiled.scalars(p.device, p.dtype, coefficients)
                compiled.run(
                    self._fused_kernel,
                    lambda i=i: self._reference(group, t, [params[i]], [grads[i]], [states[i]]),
                    flat(p),
                    flat(g),
                    *(flat(st[k]) for k in self._base_keys),
                    flat(st["exp_avg_sens"]) if group["sage"] else None,
                    *scalars,
                )
                take.append(i)
        taken = set(take)
        rest = [i for i in range(len(params)) if i not in taken]
        return ([params[i] for i in rest], [grads[i] for i in rest], [states[i] for i in rest])

    # ----------------------------------------------------------------- the maths (subclasses)
    def _kernel_coefficients(self, group: dict, t: int) -> list[float]:
        """The fused kernels' hyper-parameters for step ``t``, in their argument order."""
        raise NotImplementedError

    def _reference(self, group: dict, t: int, params, grads, states) -> None:
        """The readable per-tensor loop: update ``params`` (all at step ``t``) in place."""
        raise NotImplementedError
