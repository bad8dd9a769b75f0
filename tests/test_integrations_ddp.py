"""The integrations under DDP: two CPU processes (``torchrun``, gloo) running
``tests/ddp_integration_driver.py`` (``transformers.Trainer`` with ``DPSCallback`` Dense / Mix and
with Adamax-SAGE through ``optimizer_cls_and_kwargs``; ``AccelerateDPS`` Dense, and Mix with
``make_sage_optimizer``), 6 optimizer steps of 2 accumulated micro-batches, DPS phases of 2 steps
(explore 1-2, select 3-4, explore 5-6).

- The two ranks end bit-identical: parameters, every step's gradients right before
  ``optimizer.step()``, DPS's masks and Mix draws, DPS's whole state and the optimizer's state.
  The accelerate runs seed the ranks apart (``set_seed(0, device_specific=True)``) and start rank 1
  from perturbed weights, which DDP overwrites with rank 0's.
- They match one process given the same global batch (8 examples per micro-batch: 2 x 4 under DDP):
  masks and Mix draws exactly, gradients within 1e-6, parameters within 1e-5 (AdamW / Adamax divide
  by the gradient's running magnitude, which turns the ~1e-8 reduction-order differences of small
  gradient entries into ~1e-6 parameter differences after 6 steps).

Two settings make the one-process comparison exact, for reasons outside the integrations (see
the driver): ``average_tokens_across_devices=False`` (else the Trainer scales a BERT
classifier's plain-mean loss by the number of processes) and a 3-label head (with 2 labels the
head's gradient rows are negatives of each other, so its DPS scores come in pairs equal up to
rounding and the odd keep count always puts a pair on the threshold: one process and two break that
tie differently, flipping one entry of ``classifier.weight``'s mask).

Also: DPS-Mix patched after DDP wrapped the model is refused under DDP (it hid those weights'
gradients from DDP's all-reduce: the ranks drifted apart in the Trainer, and accelerate's DDP
raised at the second forward).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

from conftest import REPO  # noqa: E402
from ddp_integration_driver import STEPS, tiny_bert  # noqa: E402

pytestmark = pytest.mark.e2e  # the module's fixture runs torchrun (two processes) for every test

DRIVER = Path(__file__).with_name("ddp_integration_driver.py")
TRAINING = ["hf_dense", "hf_mix", "hf_sage", "acc_dense", "acc_mix_sage"]
SCENARIOS = [*TRAINING, "errors"]
DPS_SCENARIOS = [s for s in TRAINING if s != "hf_sage"]
MIX_SCENARIOS = ["hf_mix", "acc_mix_sage"]
SELECTION_STEPS = (3, 4)


def _run(cmd: list[str], what: str) -> None:
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        WANDB_DISABLED="true",
    )
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{what} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``{"one": {scenario: result}, "two": {scenario: [rank0, rank1]}}``."""
    out = tmp_path_factory.mktemp("ddp_integrations")
    (out / "one").mkdir()
    (out / "two").mkdir()
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found")
    _run([sys.executable, str(DRIVER), str(out / "one"), *SCENARIOS], "one process")
    _run([torchrun, "--standalone", "--nproc_per_node=2", str(DRIVER), str(out / "two"), *SCENARIOS], "torchrun x2")

    def load(path):
        return torch.load(path, weights_only=True)

    return {
        "one": {s: load(out / "one" / f"{s}.rank0.pt") for s in SCENARIOS},
        "two": {s: [load(out / "two" / f"{s}.rank{r}.pt") for r in (0, 1)] for s in SCENARIOS},
    }


def assert_same(a, b, path: str = "", atol: float | None = None) -> None:
    """Recursive equality of plain containers; tensors bit-identical (``atol`` None) or float
    tensors within ``atol`` (integer / bool tensors and non-tensor values always exactly)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype, path
        if atol is None or not a.is_floating_point():
            assert torch.equal(a, b), path
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=atol, msg=path)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}", atol)
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]", atol)
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


@pytest.mark.parametrize("scenario", TRAINING)
def test_two_ranks_end_bit_identical(runs, scenario):
    r0, r1 = runs["two"][scenario]
    for r in (r0, r1):
        assert r["world"] == 2 and r["ddp"] == "DistributedDataParallel"
        assert r["global_step"] == STEPS and len(r["steps"]) == STEPS
    assert_same(r0["params"], r1["params"], "params")
    assert_same(r0["steps"], r1["steps"], "steps")  # grads, masks, Mix draws of every step
    assert_same(r0["dps"], r1["dps"], "dps")  # seed, generator, scores, selection record
    assert_same(r0["optimizer"], r1["optimizer"], "optimizer")
    assert r0["optimizer"]["state"], "the optimizer never stepped"
    initial = tiny_bert().state_dict()
    assert any(not torch.equal(initial[k], v) for k, v in r0["params"].items())
    if scenario == "hf_sage":
        groups, state = r0["optimizer"]["param_groups"], r0["optimizer"]["state"].values()
        sage = sum(len(g["params"]) for g in groups if g["sage"])
        assert sum("exp_avg_sens" in s for s in state) == sage >= 1  # the sensitivity EMA of the SAGE group


@pytest.mark.parametrize("scenario", DPS_SCENARIOS)
def test_dps_phases_and_masks_under_ddp(runs, scenario):
    rank0 = runs["two"][scenario][0]
    dps, mix = rank0["dps"], scenario in MIX_SCENARIOS
    assert dps["phase_len"] == 2 and dps["selections"] == 1 and dps["variant"] == ("mix" if mix else "dense")
    assert any("classifier" in n for n in dps["names"]) and any("encoder.layer" in n for n in dps["names"])
    for step, rec in enumerate(rank0["steps"], 1):
        selecting = step in SELECTION_STEPS
        for name, mask, noise in zip(dps["names"], rec["masks"], rec["noise"]):
            patched = name[: -len("weight")] + "parametrizations.weight.original"  # Mix's parameter name
            grad = rec["grads"][name if name in rec["grads"] else patched]
            if selecting:
                assert mask is not None and 0.69 < mask.float().mean() < 0.75, (step, name)
                assert bool((grad[~mask] == 0).all()) and bool((grad[mask] != 0).any()), (step, name)
            else:
                assert mask is None, (step, name)
                if mix:  # exploration: g *= N, N per input column
                    assert noise is not None and 0.3 < noise.float().mean() < 0.95, (step, name)
                    assert bool((grad[:, ~noise[0]] == 0).all()), (step, name)
    if mix:  # N is redrawn every exploration step
        assert any(not torch.equal(a, b) for a, b in zip(rank0["steps"][0]["noise"], rank0["steps"][1]["noise"]))


@pytest.mark.parametrize("scenario", TRAINING)
def test_two_ranks_match_one_process_with_the_same_global_batch(runs, scenario):
    one, (two, _) = runs["one"][scenario], runs["two"][scenario]
    assert one["world"] == 1 and one["ddp"] != "DistributedDataParallel" and one["global_step"] == STEPS
    for step, (a, b) in enumerate(zip(one["steps"], two["steps"]), 1):
        for key in ("masks", "noise"):
            assert_same(a.get(key), b.get(key), f"step {step} {key}")
        assert_same(a["grads"], b["grads"], f"step {step} grads", atol=1e-6)
    assert_same(one["params"], two["params"], "params", atol=1e-5)
    if one["dps"] is not None:
        assert one["dps"]["seed"] == two["dps"]["seed"]
        assert_same(one["dps"], two["dps"], "dps", atol=1e-5)
    assert_same(one["optimizer"], two["optimizer"], "optimizer", atol=1e-5)


def test_mix_patched_after_the_ddp_wrap_is_refused(runs):
    assert runs["one"]["errors"]["hf"] is None and runs["one"]["errors"]["acc"] is None  # one process: fine
    for rank in runs["two"]["errors"]:
        assert "DPSCallback: DPS-Mix under DDP must patch the forward before the Trainer wraps" in rank["hf"]
        assert "Trainer(callbacks=[...])" in rank["hf"]
        assert "AccelerateDPS: DPS-Mix under DDP" in rank["acc"] and "AccelerateDPS.prepare_mix(model)" in rank["acc"]
