"""SAGE optimizers and schedule (the schedules/sage package) against an independent
transcription of docs/algorithms.md §1."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from adaptune.common.errors import ConfigError
from adaptune.common.families import family_patterns
from adaptune.schedules import build_schedule, optimizer_class
from adaptune.schedules.sage import AdamaxSAGE, AdamWSAGE, SAGESchedule, compiled, cpu_kernel, sage_param_groups
from adaptune.schedules.sage import optimizer as optimizer_mod

ROOT = Path(__file__).resolve().parents[1]
BASE_KEYS = {AdamWSAGE: {"step", "exp_avg", "exp_avg_sq"}, AdamaxSAGE: {"step", "exp_avg", "exp_inf"}}
IMPLS = {
    "reference": {"fused": False},
    "fused": {"fused": True},
    "compiled": {"fused": True, "backend": "compiled"},
    "grouped": {"fused": True, "backend": "compiled_grouped"},
}

BERT = family_patterns("bert")  # the patterns a GLUE task supplies for a BERT model


# ---------------------------------------------------------------------------------- transcription
class SpecSAGE:
    """Plain float64 transcription of docs/algorithms.md §1, one tensor at a time, no torch optimizer."""

    def __init__(self, kind, params, groups, lr, betas, beta3, eps, bias_correction=True):
        self.kind, self.lr, self.betas, self.beta3, self.eps = kind, lr, betas, beta3, eps
        self.bc = bias_correction
        self.theta = [p.detach().double().clone() for p in params]
        self.groups = groups  # per param: (sage, weight_decay)
        z = lambda: [torch.zeros_like(t) for t in self.theta]  # noqa: E731
        self.m, self.v, self.sbar, self.t = z(), z(), z(), [0] * len(params)

    def step(self, grads, lr):
        b1, b2 = self.betas
        b3, eps = self.beta3, self.eps
        for i, g in enumerate(grads):
            if g is None:
                continue
            g = g.double()
            theta, (sage, wd) = self.theta[i], self.groups[i]
            self.t[i] += 1
            t = self.t[i]
            self.m[i] = b1 * self.m[i] + (1 - b1) * g
            I = (theta * g).abs()  # noqa: E741  (the paper's symbol)
            self.sbar[i] = b3 * self.sbar[i] + (1 - b3) * I
            if self.kind == "adamw":
                self.v[i] = b2 * self.v[i] + (1 - b2) * g * g
                if self.bc:
                    ihat = self.sbar[i] / (1 - b3**t)
                    mult = (I - ihat).abs() / (ihat + eps**2) if sage else 1.0
                    s = lr * mult * math.sqrt(1 - b2**t) / (1 - b1**t)
                else:
                    mult = (I - self.sbar[i]).abs() / (self.sbar[i] + eps**2) if sage else 1.0
                    s = lr * mult
                theta = theta - s * self.m[i] / (self.v[i].sqrt() + eps)
                theta = theta - lr * wd * theta
            else:
                self.v[i] = torch.maximum(b2 * self.v[i], g.abs() + eps)
                d = self.m[i] / (self.v[i] + eps)
                if wd > 0:
                    d = d + wd * theta
                s = lr * (I - self.sbar[i]).abs() / (self.sbar[i] + eps**2) if sage else lr
                theta = theta - s * d
            self.theta[i] = theta


def make_params(dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(6, 4), (4,), (3, 5), (5,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)) for s in shapes]
    with torch.no_grad():
        params[0][0, 0] = 0.0  # I = 0 entry: multiplier 0/(0 + eps²)
    return params


def groups_for(params, wd):
    # group 0 relies on the default sage=True; group 1 is plain; group 2 is SAGE without decay
    return [
        {"params": params[:2], "weight_decay": wd},
        {"params": [params[2]], "sage": False, "weight_decay": wd},
        {"params": [params[3]], "sage": True, "weight_decay": 0.0},
    ]


SPEC_GROUPS = lambda wd: [(True, wd), (True, wd), (False, wd), (True, 0.0)]  # noqa: E731


def grads_for(params, step, gen, skip_every=4):
    grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) for p in params]
    if step % skip_every == 0:
        grads[1] = None  # a tensor without gradient: skipped, its step does not advance
    return grads


def lr_at(step, lr0=1e-2, total=80):
    return lr0 * (1 - step / total)  # what an external LR scheduler writes into the groups


def run_optimizer(cls, params, steps, impl="reference", wd=0.01, seed=1, start=1, opt=None, **kw):
    opt = opt or cls(groups_for(params, wd), lr=1e-2, beta3=0.8, eps=1e-6, **IMPLS[impl], **kw)
    gen = torch.Generator().manual_seed(seed)
    for step in range(1, start + steps):
        grads = grads_for(params, step, gen)
        if step < start:
            continue
        for p, g in zip(params, grads):
            p.grad = g
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.step()
    return opt


CASES = [("adamw", AdamWSAGE, bc, wd) for bc in (True, False) for wd in (0.0, 0.01)] + [
    ("adamax", AdamaxSAGE, None, wd) for wd in (0.0, 0.01)
]


def cpu_kernel_or_skip():
    if cpu_kernel.kernels() is None:
        pytest.skip(f"the SAGE CPU kernel cannot be built here: {cpu_kernel.failure()}")


def use_compiled_kernel(monkeypatch):
    """Let the torch.compile kernels (the CUDA path) run on this CPU, tiny tensors included; the
    tests pick them with ``backend="compiled"`` (per tensor) or ``"compiled_grouped"``."""
    if not compiled.usable():
        pytest.skip("torch.compile is not usable here")
    monkeypatch.setattr(compiled, "MIN_TENSOR", 0)  # compile even these tiny tensors
    monkeypatch.setattr(compiled, "_broken", False)  # a failure elsewhere must not hide this path


@pytest.mark.e2e
@pytest.mark.parametrize("impl", ["reference", "fused", "compiled", "grouped"])
@pytest.mark.parametrize("kind,cls,bc,wd", CASES)
def test_matches_spec_transcription(kind, cls, bc, wd, impl, monkeypatch):
    """Every implementation against the float64 transcription, step by step, in double
    precision (fused on CPU: the C++ multi-tensor kernel; compiled: the fused path's
    torch.compile backend, as on CUDA, per tensor; grouped: its multi-tensor form)."""
    compiled_path = impl in ("compiled", "grouped")
    if compiled_path:
        use_compiled_kernel(monkeypatch)
    elif impl == "fused":
        cpu_kernel_or_skip()
    params = make_params()
    spec = SpecSAGE(kind, params, SPEC_GROUPS(wd), lr=1e-2, betas=(0.9, 0.999), beta3=0.8, eps=1e-6, bias_correction=bool(bc))
    extra = {"bias_correction": bc} if cls is AdamWSAGE else {}
    steps = 60
    opt = run_optimizer(cls, params, steps, impl=impl, wd=wd, **extra)
    gen = torch.Generator().manual_seed(1)
    for step in range(1, steps + 1):
        spec.step(grads_for(params, step, gen), lr_at(step))
    for i, p in enumerate(params):
        torch.testing.assert_close(p.detach(), spec.theta[i], rtol=1e-10, atol=1e-12)
        st = opt.state[p]
        assert int(st["step"]) == spec.t[i]
        torch.testing.assert_close(st["exp_avg"], spec.m[i], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(st["exp_avg_sq" if kind == "adamw" else "exp_inf"], spec.v[i], rtol=1e-10, atol=1e-12)
        if SPEC_GROUPS(wd)[i][0]:
            torch.testing.assert_close(st["exp_avg_sens"], spec.sbar[i], rtol=1e-10, atol=1e-12)
    assert spec.t == [60, 45, 60, 60]
    assert not (compiled_path and compiled._broken)  # the compiled kernels ran, not the eager fallback
    # the run moved every tensor substantially (the comparison is not vacuous)
    assert all((p.detach() - q).abs().max() > 1e-3 for p, q in zip(params, make_params()))


def test_first_step_leaves_sage_tensors_unchanged(monkeypatch):
    monkeypatch.setattr(compiled, "MIN_TENSOR", 0)
    impls = ("reference", "fused") if optimizer_mod.fused_usable(torch.device("cpu")) else ("reference",)
    for impl in impls:
        params = make_params(torch.float32)
        before = [p.detach().clone() for p in params]
        opt = AdamWSAGE(groups_for(params, 0.0), lr=1e-2, beta3=0.85, bias_correction=True, **IMPLS[impl])
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        # SAGE tensors (0, 1, 3) exactly unchanged; the plain tensor (2) moved by about lr
        for i in (0, 1, 3):
            assert torch.equal(params[i].detach(), before[i]), impl
        g = params[2].grad.abs()  # plain Adam step 1: lr·|g|/(|g| + ε/sqrt(1-β2))
        torch.testing.assert_close(
            (before[2] - params[2].detach()).abs(), 1e-2 * g / (g + 1e-6 / math.sqrt(1 - 0.999)), rtol=0, atol=1e-6
        )
        torch.testing.assert_close(
            opt.state[params[0]]["exp_avg_sens"], (1 - 0.85) * (before[0] * params[0].grad).abs(), rtol=1e-6, atol=0
        )
        for p in params:
            p.grad = torch.randn_like(p)  # (with the same I again, Î would stay equal to I)
        opt.step()  # step 2 moves them
        assert not torch.equal(params[0].detach(), before[0])


def test_first_step_with_decay_only_decays():
    params = make_params(torch.float32)
    before = params[0].detach().clone()
    opt = AdamWSAGE(groups_for(params, 0.1), lr=1e-2, fused=False)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    torch.testing.assert_close(params[0].detach(), before * (1 - 1e-2 * 0.1), rtol=0, atol=0)


def _same_as_reference(cls, impl: str, steps: int) -> bool:
    """Whether ``impl`` leaves bit-identical parameters to the reference loop after ``steps``."""
    runs = []
    for name in ("reference", impl):
        params = make_params(torch.float32)
        run_optimizer(cls, params, steps, impl=name)
        runs.append(params)
    return all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.e2e
@pytest.mark.parametrize("backend", ["cpu_kernel", "compiled", "grouped"])
def test_fused_matches_reference(backend, monkeypatch):
    """Every fused backend (both optimizers, SAGE and plain groups; bf16 in test_bf16_*)."""
    calls = []
    if backend in ("compiled", "grouped"):
        use_compiled_kernel(monkeypatch)
        run = compiled.run
        monkeypatch.setattr(
            compiled,
            "run",
            lambda fn, fallback, *a: (
                calls.append((fn.__name__, len(a[0]) if isinstance(a[0], list) else 1)),
                run(fn, fallback, *a),
            ),
        )
    else:
        cpu_kernel_or_skip()
        monkeypatch.setattr(compiled, "run", lambda *a: pytest.fail("compiled kernel called"))
    for cls in (AdamWSAGE, AdamaxSAGE):
        runs = {}
        fused = "fused" if backend == "cpu_kernel" else backend
        for impl in ("reference", fused):
            params = make_params(torch.float32)
            runs[impl] = (params, run_optimizer(cls, params, 20, impl=impl))
        (pr, optr), (pf, optf) = runs["reference"], runs[fused]
        for a, b in zip(pr, pf):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
            for key in optr.state[a]:
                torch.testing.assert_close(optf.state[b][key], optr.state[a][key], rtol=1e-5, atol=1e-6)
    if backend == "compiled":
        assert not compiled._broken
        assert {"adamw_fused_kernel", "adamax_fused_kernel"} <= {k.split("/")[0] for k in compiled._cache}
        assert {name for name, _ in calls} == {"adamw_fused_kernel", "adamax_fused_kernel"}
    if backend == "grouped":
        # one call per group and step (two in group 0 once its second tensor, which skips every
        # 4th step, lags the first): 72 calls per optimizer carry all 75 tensor updates
        assert not compiled._broken
        for name in ("adamw_fused_kernel_grouped", "adamax_fused_kernel_grouped"):
            mine = [n for c, n in calls if c == name]
            assert len(mine) == 72 and sum(mine) == 75
        assert len(calls) == 144


@pytest.mark.parametrize("cls", [AdamWSAGE, AdamaxSAGE])
def test_compiled_path_sends_small_tensors_to_reference(cls, monkeypatch):
    """With the compiled kernels, tensors below MIN_TENSOR take the reference loop (same numbers)."""
    monkeypatch.setattr(compiled, "MIN_TENSOR", 1 << 30)
    monkeypatch.setattr(compiled, "run", lambda *a: pytest.fail("compiled kernel called"))
    assert _same_as_reference(cls, "compiled", 5)


class CountingKernels:
    """Wraps the CPU kernel module and records the tensors of every call."""

    def __init__(self, module):
        self.module, self.calls = module, []

    def __getattr__(self, name):
        fn = getattr(self.module, name)

        def call(params, *args):
            self.calls.append((name, [tuple(p.shape) for p in params]))
            return fn(params, *args)

        return call


@pytest.mark.parametrize("cls", [AdamWSAGE, AdamaxSAGE])
def test_cpu_kernel_one_call_per_group_and_step_bucket(cls, monkeypatch):
    """All tensors of a group, tiny ones included, go to one kernel call; tensors whose step
    counter lags (skipped gradients) get a call of their own with their own bias correction."""
    cpu_kernel_or_skip()
    counting = CountingKernels(cpu_kernel.kernels())
    monkeypatch.setattr(cpu_kernel, "kernels", lambda: counting)
    params = make_params(torch.float32)
    run_optimizer(cls, params, 5, impl="fused")  # step 4 skips params[1]: at step 5 its counter says 4
    name = cls._cpu_kernel
    assert {n for n, _ in counting.calls} == {name}
    shapes = [s for _, s in counting.calls]
    assert shapes[:9] == [[(6, 4), (4,)], [(3, 5)], [(5,)]] * 3  # steps 1-3
    assert shapes[9:12] == [[(6, 4)], [(3, 5)], [(5,)]]  # step 4
    assert shapes[12:] == [[(6, 4)], [(4,)], [(3, 5)], [(5,)]]  # step 5


@pytest.mark.parametrize("cls", [AdamWSAGE, AdamaxSAGE])
def test_cpu_kernel_non_contiguous_tensors_take_the_reference(cls, monkeypatch):
    cpu_kernel_or_skip()
    counting = CountingKernels(cpu_kernel.kernels())
    monkeypatch.setattr(cpu_kernel, "kernels", lambda: counting)
    runs = {}
    for impl in ("reference", "fused"):
        p = torch.nn.Parameter(torch.randn(5, 3, generator=torch.Generator().manual_seed(0)))
        q = torch.nn.Parameter(torch.randn(7, generator=torch.Generator().manual_seed(1)))
        opt = cls([p, q], lr=1e-2, beta3=0.8, weight_decay=0.01, **IMPLS[impl])
        gen = torch.Generator().manual_seed(2)
        for _ in range(5):
            p.grad = torch.randn(3, 5, generator=gen).t()  # a transposed (strided) gradient
            q.grad = torch.randn(7, generator=gen)
            opt.step()
        runs[impl] = (p, q)
    assert {tuple(shapes) for _, shapes in counting.calls} == {((7,),)}  # only the contiguous one
    for a, b in zip(runs["reference"], runs["fused"]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [AdamWSAGE, AdamaxSAGE])
def test_cpu_kernel_bit_identical_across_thread_counts(cls):
    """Elementwise and without reductions, so the thread split cannot change a single bit."""
    cpu_kernel_or_skip()
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            gen = torch.Generator().manual_seed(0)
            p = torch.nn.Parameter(torch.randn(300_001, generator=gen))  # several 64K chunks
            opt = cls([p], lr=1e-2, beta3=0.8, fused=True)
            for _ in range(3):
                p.grad = torch.randn(p.shape, generator=gen)
                opt.step()
            runs.append((p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}))
    finally:
        torch.set_num_threads(threads)
    (p1, s1), (p2, s2) = runs
    assert torch.equal(p1, p2) and all(torch.equal(s1[k], s2[k]) for k in s1)


def test_cpu_kernel_propagates_nan_like_the_reference():
    cpu_kernel_or_skip()
    for cls in (AdamWSAGE, AdamaxSAGE):
        out = {}
        for impl in ("reference", "fused"):
            p = torch.nn.Parameter(torch.ones(4))
            opt = cls([p], lr=1e-2, **IMPLS[impl])
            p.grad = torch.tensor([1.0, float("nan"), 2.0, float("inf")])
            opt.step()
            out[impl] = [torch.isnan(t) for t in (p.detach(), *opt.state[p].values()) if t.dim()]
        assert all(torch.equal(a, b) for a, b in zip(out["reference"], out["fused"])), cls.__name__


def test_cpu_kernel_source_ships_with_the_package():
    """The kernel tests skip where the build fails, so check the source is where it is looked for."""
    assert cpu_kernel.SOURCE.is_file() and cpu_kernel.SOURCE.parent.parent.name == "sage"


def test_cpu_kernel_build_failure_falls_back(monkeypatch):
    """Where the kernel cannot be built, fused=True still runs (compiled or eager), same maths."""
    monkeypatch.setattr(cpu_kernel, "kernels", lambda: None)
    opt = AdamWSAGE([torch.nn.Parameter(torch.zeros(3))], fused=True)
    if compiled.usable():  # the compiled backend
        assert opt._impl(opt.param_groups[0], opt.param_groups[0]["params"]) == "compiled"
    monkeypatch.setattr(compiled, "_broken", True)  # and no torch.compile either
    assert opt._impl(opt.param_groups[0], opt.param_groups[0]["params"]) == "reference"
    assert _same_as_reference(AdamWSAGE, "fused", 5)


def test_auto_implementation_choice():
    """One policy (fused_backend), chosen per optimizer and group by constructor arguments."""

    def impl(opt, group=0):
        return opt._impl(opt.param_groups[group], opt.param_groups[group]["params"])

    small = AdamWSAGE([torch.nn.Parameter(torch.zeros(10))])
    assert impl(small) == "reference"
    expected = optimizer_mod.fused_backend(torch.device("cpu")) or "reference"
    assert expected in ("cpu_kernel", "compiled", "reference")
    forced = AdamWSAGE([torch.nn.Parameter(torch.zeros(10))], fused=True)
    assert impl(forced) == expected
    big = AdamWSAGE([torch.nn.Parameter(torch.zeros(10))], fused_min_numel=5)
    assert impl(big) == expected
    explicit = AdamWSAGE([torch.nn.Parameter(torch.zeros(10))], fused=False)
    assert impl(explicit) == "reference"
    if compiled.usable():  # a backend per group, as torch's fused / foreach
        mixed = AdamaxSAGE(
            [
                {"params": [torch.nn.Parameter(torch.zeros(10))], "backend": "compiled_grouped"},
                {"params": [torch.nn.Parameter(torch.zeros(10))]},
            ],
            fused=True,
        )
        assert (impl(mixed, 0), impl(mixed, 1)) == ("compiled_grouped", expected)
    with pytest.raises(ValueError, match="Invalid backend: 'cuda_graph'"):
        AdamWSAGE([torch.nn.Parameter(torch.zeros(10))], backend="cuda_graph")
    with pytest.raises(ValueError, match="Invalid fused_min_numel"):
        AdamWSAGE([torch.nn.Parameter(torch.zeros(10))], fused_min_numel=-1)


# ---------------------------------------------------------------------------------- state
@pytest.mark.parametrize("cls", [AdamWSAGE, AdamaxSAGE])
def test_state_dict_roundtrip_weights_only(cls, tmp_path):
    full = make_params(torch.float32)
    run_optimizer(cls, full, 24)  # uninterrupted: steps 1..24

    half = make_params(torch.float32)
    opt = run_optimizer(cls, half, 12)  # steps 1..12, then save
    path = tmp_path / "opt.pt"
    torch.save({"params": [p.detach() for p in half], "opt": opt.state_dict()}, path)
    data = torch.load(path, weights_only=True)
    resumed = [torch.nn.Parameter(t.clone()) for t in data["params"]]
    opt2 = cls(groups_for(resumed, 0.01), lr=1e-2, beta3=0.8, eps=1e-6, fused=False)
    opt2.load_state_dict(data["opt"])
    assert int(opt2.state[resumed[0]]["step"]) == 12
    assert opt2.param_groups[1]["sage"] is False and opt2.param_groups[0]["sage"] is True
    run_optimizer(cls, resumed, 12, start=13, opt=opt2)  # steps 13..24
    for a, b in zip(full, resumed):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls", [AdamWSAGE, AdamaxSAGE])
def test_state_dict_from_before_foreach_was_dropped_loads(cls):
    """Checkpoints written when the groups still had a ``foreach`` key resume identically."""
    full = make_params(torch.float32)
    run_optimizer(cls, full, 8)
    half = make_params(torch.float32)
    saved = run_optimizer(cls, half, 4).state_dict()
    for group in saved["param_groups"]:
        group["foreach"] = True  # as the old default groups did
    opt = cls(groups_for(half, 0.01), lr=1e-2, beta3=0.8, eps=1e-6)
    opt.load_state_dict(saved)
    assert all("foreach" not in g for g in opt.param_groups)
    run_optimizer(cls, half, 4, start=5, opt=opt)
    for a, b in zip(full, half):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls", [AdamWSAGE, AdamaxSAGE])
def test_exactly_one_extra_state_tensor_per_sage_param(cls):
    params = make_params(torch.float32)
    opt = run_optimizer(cls, params, 3)
    for i, p in enumerate(params):
        keys = set(opt.state[p])
        extra = keys - BASE_KEYS[cls]
        if i == 2:  # sage=False group
            assert keys == BASE_KEYS[cls]
        else:
            assert extra == {"exp_avg_sens"} and keys >= BASE_KEYS[cls]
            assert opt.state[p]["exp_avg_sens"].shape == p.shape
    # the base state is the same set of tensors torch's own optimizer keeps
    ref = (torch.optim.AdamW if cls is AdamWSAGE else torch.optim.Adamax)([params[2]])
    params[2].grad = torch.ones_like(params[2])
    ref.step()
    assert set(ref.state[params[2]]) == BASE_KEYS[cls]


# ---------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("cls", [AdamWSAGE, AdamaxSAGE])
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"lr": -1e-3}, "learning rate"),
        ({"betas": (1.0, 0.999)}, "beta parameter at index 0"),
        ({"betas": (0.9, -0.1)}, "beta parameter at index 1"),
        ({"beta3": 1.0}, "beta3"),
        ({"beta3": -0.5}, "beta3"),
        ({"eps": -1e-8}, "epsilon"),
        ({"weight_decay": -0.01}, "weight_decay"),
    ],
)
def test_validation(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls([torch.nn.Parameter(torch.zeros(3))], **kwargs)


@pytest.mark.parametrize("cls", [AdamWSAGE, AdamaxSAGE])
@pytest.mark.parametrize("value", [True, False, None])
def test_foreach_is_not_an_argument(cls, value):
    """The foreach implementation was dropped: the keyword is as unknown as any other."""
    with pytest.raises(TypeError, match="foreach"):
        cls([torch.nn.Parameter(torch.zeros(3))], foreach=value)


def test_sparse_gradients_rejected():
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.zeros(4).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        AdamaxSAGE([p]).step()


# ---------------------------------------------------------------------------------- precision
@pytest.mark.parametrize("cls", [AdamWSAGE, AdamaxSAGE])
def test_grad_scaler_skips_overflowing_step(cls):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = cls(model.parameters(), lr=1e-2, weight_decay=0.01, fused=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x = torch.randn(8, 4)

    def backward():
        opt.zero_grad()
        scaler.scale(model(x).pow(2).sum()).backward()

    backward()
    scaler.step(opt)
    scaler.update()
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict()["state"])
    backward()
    model.weight.grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**9
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    after = opt.state_dict()["state"]
    for k, st in state.items():
        for key, value in st.items():
            assert torch.equal(after[k][key], value), key
    backward()
    scaler.step(opt)
    scaler.update()
    assert int(opt.state[model.weight]["step"]) == 2
    assert torch.isfinite(model.weight).all() and not torch.equal(model.weight.detach(), params[0])


# one bf16 compile (Adamax-SAGE, the config default) keeps the file quick
@pytest.mark.parametrize(
    "cls,impl",
    [(AdamWSAGE, "reference"), (AdamWSAGE, "fused"), (AdamaxSAGE, "reference"), (AdamaxSAGE, "fused"), (AdamaxSAGE, "compiled")],
)
def test_bf16_params_and_grads(cls, impl, monkeypatch):
    if impl == "compiled":
        use_compiled_kernel(monkeypatch)
        impl = "fused"
    elif impl == "fused":
        cpu_kernel_or_skip()
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(32, 16, generator=gen).bfloat16()
    grads = [torch.randn(32, 16, generator=gen).bfloat16() for _ in range(4)]
    runs = {}
    for dtype in (torch.bfloat16, torch.float32):
        p = torch.nn.Parameter(w0.to(dtype).clone())
        opt = cls([p], lr=0.05, beta3=0.75, weight_decay=0.0, **IMPLS[impl])
        for g in grads:
            p.grad = g.to(dtype)
            opt.step()
        runs[dtype] = (p, opt)
    p16, opt16 = runs[torch.bfloat16]
    p32, _ = runs[torch.float32]
    assert p16.dtype == torch.bfloat16
    assert all(v.dtype == torch.bfloat16 for k, v in opt16.state[p16].items() if k != "step")
    d16, d32 = (p16.detach().float() - w0.float()), (p32.detach() - w0.float())
    assert torch.isfinite(d16).all() and d32.abs().mean() > 0.02
    # same update up to bf16 rounding of parameters and state
    assert (d16 - d32).abs().mean() < 0.1 * d32.abs().mean()
    assert torch.nn.functional.cosine_similarity(d16.flatten(), d32.flatten(), dim=0) > 0.98


# ---------------------------------------------------------------------------------- schedule
def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=60,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=3,
    )
    return BertForSequenceClassification(cfg)


def sage_cfg(**over):
    cfg = {
        "name": "sage",
        "base": "adamax",
        "lr": 2e-4,
        "betas": [0.9, 0.999],
        "beta3": 0.85,
        "eps": 1e-6,
        "weight_decay": 0.01,
        "bias_correction": True,
        "lr_schedule": "linear",
        "warmup_ratio": 0.1,
        "warmup_steps": None,
        "sage_patterns": None,
        "no_decay_patterns": None,
    }
    cfg.update(over)
    return cfg


def train_steps(model, sched, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        ids = torch.randint(0, 60, (4, 8), generator=gen)
        labels = torch.randint(0, 3, (4,), generator=gen)
        model(input_ids=ids, labels=labels).loss.backward()
        sched.optimizer.step()
        sched.lr_scheduler.step()
        sched.optimizer.zero_grad(set_to_none=True)  # as the runner's loop does before logging


@pytest.mark.parametrize("base,cls", [("adamax", AdamaxSAGE), ("adamw", AdamWSAGE)])
def test_schedule_builds_on_tiny_bert(base, cls):
    model = tiny_bert()
    sched = build_schedule(sage_cfg(base=base))
    assert isinstance(sched, SAGESchedule)
    sched.setup(model, BERT, total_steps=20)
    opt = sched.optimizer
    assert type(opt) is cls and opt.defaults["beta3"] == 0.85
    if base == "adamw":
        assert opt.defaults["bias_correction"] is True
    flag = {id(p): g["sage"] for g in opt.param_groups for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert len(flag) == len(names)
    encoder_linears = (
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    )
    n_sage = 0
    for name, p in names.items():
        expected = name.startswith("bert.encoder.") and "LayerNorm" not in name and any(f".{s}." in name for s in encoder_linears)
        assert flag[id(p)] is expected, name
        n_sage += expected
        assert decay[id(p)] == (0.0 if ("bias" in name or "LayerNorm" in name) else 0.01), name
    assert n_sage == 2 * 6 * 2  # 2 layers x 6 linears x (weight, bias)
    for name in (
        "bert.embeddings.word_embeddings.weight",
        "bert.embeddings.LayerNorm.weight",
        "bert.pooler.dense.weight",
        "classifier.weight",
        "bert.encoder.layer.0.output.LayerNorm.weight",
    ):
        assert flag[id(names[name])] is False
    assert opt.param_groups[0]["lr"] == 0.0  # linear warmup starts at 0 (2 warmup steps)
    assert sched.log_metrics(0) == {"lr": 0.0}  # nothing to summarise before the first step

    train_steps(model, sched, 1)
    m = sched.log_metrics(1)
    assert m["lr"] == pytest.approx(1e-4)
    assert m["sage/sens_mean"] > 0
    assert set(m) == {"lr"} | {f"sage/{a}_{b}" for a in ("sens", "lr_mult") for b in ("mean", "p10", "p50", "p90")}
    if base == "adamax":
        # after one step Ī = (1-β3)·I, so the multiplier is β3/(1-β3 + ε²/I): just below
        # 0.85/0.15 for this tiny random model's small sensitivities (I ~ 1e-8 .. 1e-5)
        assert 0.85 / 0.15 * (1 - 2e-3) < m["sage/lr_mult_p50"] <= 0.85 / 0.15
        assert 0.85 / 0.15 * (1 - 2e-3) < m["sage/lr_mult_p90"] <= 0.85 / 0.15
    else:
        # bias-corrected: Î = I at step 1, the multiplier is 0 (SAGE tensors did not move)
        assert m["sage/lr_mult_p90"] < 1e-5
    train_steps(model, sched, 3, seed=1)
    m = sched.log_metrics(4)
    assert all(math.isfinite(v) and v >= 0 for v in m.values())
    assert m["sage/lr_mult_p10"] <= m["sage/lr_mult_p50"] <= m["sage/lr_mult_p90"]


def test_log_metrics_multiplier_matches_state():
    """The summary's multiplier is |I - Ī|/(Ī + ε²) of the last step, on the probe entries."""
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.intermediate = torch.nn.Module()
    model.intermediate.dense = torch.nn.Linear(50, 40)
    sched = SAGESchedule(sage_cfg(base="adamw", bias_correction=False, warmup_ratio=0.0))
    sched.setup(model, BERT, total_steps=10)
    x = torch.randn(7, 50)
    for _ in range(3):
        model.intermediate.dense(x).pow(2).sum().backward()
        sens = {id(p): (p.detach().double() * p.grad.double()).abs().flatten() for p in model.parameters()}
        sched.optimizer.step()
        sched.optimizer.zero_grad(set_to_none=True)
    probe = sched._probe
    assert sum(len(i) for _, i in probe) == min(SAGESchedule.PROBE_SIZE, 50 * 40 + 40)
    expected = []
    for p, idx in probe:
        sbar = sched.optimizer.state[p]["exp_avg_sens"].flatten().double()[idx]
        expected.append((sens[id(p)][idx] - sbar).abs() / (sbar + 1e-12))
    expected = torch.cat(expected)
    m = sched.log_metrics(3)
    assert m["sage/lr_mult_mean"] == pytest.approx(float(expected.mean()), rel=1e-9)
    assert m["sage/lr_mult_p50"] == pytest.approx(float(torch.quantile(expected, 0.5)), rel=1e-9)
    assert m["sage/lr_mult_p90"] > m["sage/lr_mult_p10"] > 0


def test_schedule_config_errors():
    with pytest.raises(ConfigError, match=r"schedule\.base='sgd' is unknown; allowed: adamax, adamw"):
        SAGESchedule(sage_cfg(base="sgd"))
    for bad in (1.0, -0.1):
        with pytest.raises(ConfigError, match=r"schedule\.beta3 must be a number in \[0, 1\)"):
            SAGESchedule(sage_cfg(beta3=bad))
    with pytest.raises(ConfigError, match=r"schedule\.beta3: .*could not be converted"):
        SAGESchedule(sage_cfg(beta3="x"))
    with pytest.raises(ConfigError, match=r"schedule\.bias_correction"):
        SAGESchedule(sage_cfg(bias_correction="maybe"))
    sched = SAGESchedule(sage_cfg(sage_patterns=["no.such.module"]))
    with pytest.raises(ConfigError, match=r"schedule\.sage_patterns"):
        sched.setup(tiny_bert(), BERT, total_steps=10)


@pytest.mark.parametrize("impl,fused", [("loop", False), ("fused", True), ("auto", None)])
def test_schedule_impl_selects_the_sage_path(impl, fused):
    sched = build_schedule(sage_cfg(impl=impl))
    sched.setup(tiny_bert(), BERT, total_steps=10)
    assert all(g["fused"] is fused for g in sched.optimizer.param_groups)
    assert "foreach" not in sched.optimizer.defaults
    with pytest.raises(
        ConfigError, match="schedule.impl=foreach: AdamaxSAGE has no foreach implementation; allowed: auto, fused, loop"
    ):
        build_schedule(sage_cfg(impl="foreach")).setup(tiny_bert(), BERT, total_steps=10)
    with pytest.raises(ConfigError, match="schedule.foreach: not a key of schedule=sage; its keys: "):
        build_schedule(sage_cfg(foreach=True))  # no longer a setting


def test_sage_param_groups_helper():
    model = tiny_bert()
    groups = sage_param_groups(model, family="bert", weight_decay=0.02)
    assert all("names" not in g for g in groups)
    assert [(g["sage"], g["weight_decay"]) for g in groups] == [(True, 0.02), (True, 0.0), (False, 0.02), (False, 0.0)]
    n = sum(len(g["params"]) for g in groups)
    assert n == len(list(model.parameters()))
    opt = AdamaxSAGE(groups, lr=2e-4)  # optimizer-ready
    assert opt.param_groups[0]["sage"] is True
    custom = sage_param_groups(model.named_parameters(), sage_patterns=["intermediate.dense"])
    assert sum(p.numel() for g in custom if g["sage"] for p in g["params"]) == 2 * (32 * 16 + 32)
    with pytest.raises(ConfigError, match="sage_patterns"):
        sage_param_groups(model, sage_patterns=["nothing.matches"])


def test_registry_and_configs():
    assert optimizer_class("adamw_sage") is AdamWSAGE and optimizer_class("adamax_sage") is AdamaxSAGE
    from conftest import compose

    cfg = compose(["schedule=sage"]).schedule
    assert cfg.name == "sage" and cfg.base == "adamax" and cfg.eps == 1e-6 and cfg.beta3 == 0.75
    assert cfg.bias_correction is True and cfg.lr_schedule == "linear" and cfg.warmup_ratio == 0.1
    assert isinstance(build_schedule(cfg), SAGESchedule)
    exp = compose(["experiment=sage_glue"])
    assert exp.task.name == "mnli" and exp.task.model.name == "bert-base-uncased"
    assert exp.schedule.base == "adamax" and exp.schedule.lr == 2e-4 and exp.schedule.beta3 == 0.85
    assert exp.trainer.batch_size == 32 and exp.trainer.epochs == 3 and exp.trainer.max_grad_norm == 1.0
    assert exp.seed == 2018 and exp.name == "sage_glue" and exp.schedule.warmup_ratio == 0.1


def test_mtdnn_adamax_is_adamax_sage_without_sage_and_not_torch_adamax():
    """schedule.optimizer=adamax_mtdnn (the SAGE paper's GLUE baseline): m not bias-corrected,
    u = max(b2·u, |g| + eps), theta -= lr·(m/(u + eps) + wd·theta), step by step by hand."""
    from adaptune.schedules import optimizer_class
    from adaptune.schedules.sage import AdamaxSAGE, MTDNNAdamax

    assert optimizer_class("adamax_mtdnn") is MTDNNAdamax
    torch.manual_seed(0)
    w0 = torch.randn(4, 3, dtype=torch.float64)
    grads = [torch.randn(4, 3, dtype=torch.float64) for _ in range(3)]
    lr, (b1, b2), eps, wd = 0.1, (0.9, 0.999), 1e-6, 0.01
    a, b, c = (torch.nn.Parameter(w0.clone()) for _ in range(3))
    mine = MTDNNAdamax([a], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    sage_off = AdamaxSAGE([{"params": [b], "sage": False}], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    plain = torch.optim.Adamax([c], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    theta, m, u = w0.clone(), torch.zeros_like(w0), torch.zeros_like(w0)
    for g in grads:
        for p, opt in ((a, mine), (b, sage_off), (c, plain)):
            p.grad = g.clone()
            opt.step()
        m = b1 * m + (1 - b1) * g
        u = torch.maximum(b2 * u, g.abs() + eps)
        theta = theta - lr * (m / (u + eps) + wd * theta)
        torch.testing.assert_close(a.detach(), theta, rtol=1e-12, atol=1e-12)
        assert torch.equal(a, b)
    assert "exp_avg_sens" not in mine.state[a]
    assert not torch.allclose(c.detach(), theta, rtol=1e-6, atol=1e-9)  # torch's Adamax is other maths


def test_hf_adamw_follows_transformers_4_7_adamw_step_by_step():
    """schedule.optimizer=adamw_hf (the DPS reference arms' optimizer): eps added to the
    uncorrected sqrt(v), the step scaled by sqrt(1-b2^t)/(1-b1^t), weight decay after the update;
    100 steps against a float64 transcription, and visibly not torch.optim.AdamW at |g| ~ 1e-6."""
    from adaptune.schedules import optimizer_class
    from adaptune.schedules.sage import AdamWSAGE, HFAdamW

    assert optimizer_class("adamw_hf") is HFAdamW
    torch.manual_seed(0)
    w0 = torch.randn(5, 4, dtype=torch.float64)
    grads = [1e-6 * torch.randn(5, 4, dtype=torch.float64) for _ in range(100)]
    lr, (b1, b2), eps, wd = 1e-2, (0.9, 0.999), 1e-8, 0.01
    a, b, c = (torch.nn.Parameter(w0.clone()) for _ in range(3))
    mine = HFAdamW([a], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    sage_off = AdamWSAGE([{"params": [b], "sage": False}], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    torch_adamw = torch.optim.AdamW([c], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    theta, m, v = w0.clone(), torch.zeros_like(w0), torch.zeros_like(w0)
    for t, g in enumerate(grads, 1):
        for p, opt in ((a, mine), (b, sage_off), (c, torch_adamw)):
            p.grad = g.clone()
            opt.step()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        theta = theta - lr * math.sqrt(1 - b2**t) / (1 - b1**t) * m / (v.sqrt() + eps)
        theta = theta - lr * wd * theta
        torch.testing.assert_close(a.detach(), theta, rtol=1e-12, atol=1e-15)
        assert torch.equal(a, b)
    assert "exp_avg_sens" not in mine.state[a]
    moved_hf, moved_torch = (a.detach() - w0).abs().mean(), (c.detach() - w0).abs().mean()
    assert abs(moved_torch / moved_hf - 1) > 0.005  # eps placement matters at |g| ~ 1e-6
