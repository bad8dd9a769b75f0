"""DPS in a plain accelerate loop (mask, then clip: the reference order) and the runnable example."""

from __future__ import annotations

import sys

import pytest
import torch

accelerate = pytest.importorskip("accelerate")

from conftest import REPO  # noqa: E402
from adaptune.schedules.dps import DPS, linear_weights  # noqa: E402
from adaptune.schedules.integrations.accelerate import AccelerateDPS  # noqa: E402
from test_integrations_hf import BATCH, Rows, tiny_bert  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps its state (gradient accumulation, sync flags) in process-wide singletons
    that an earlier Trainer (e.g. a hyperparameter search) leaves set: each test starts clean."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield


def _train(acc, model, opt, dps, batches):
    for batch in batches:
        with acc.accumulate(model):
            dps.before_forward()
            acc.backward(model(**batch).loss)
            dps.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
            opt.zero_grad()


def test_accelerate_dps_masks_before_clipping_like_a_hand_loop():
    steps, accum = 8, 2
    data = Rows(n=BATCH * steps * accum)
    batches = list(data.batches(BATCH))
    acc = accelerate.Accelerator(gradient_accumulation_steps=accum, cpu=True)
    model, ref = tiny_bert(), tiny_bert()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model, opt = acc.prepare(model, opt)
    dps = AccelerateDPS(acc, model, total_steps=steps, update_ratio=0.25, optimizer=opt)
    _train(acc, model, opt, dps, batches)
    assert dps.step == steps and dps.dps.phase_len == 2

    ref_dps = DPS(linear_weights(ref), steps, 0.3, 0.25, "dense", patterns=dps.dps.names)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    for step in range(1, steps + 1):
        for batch in batches[(step - 1) * accum : step * accum]:
            (ref(**batch).loss / accum).backward()
        ref_dps.on_gradients(step)  # mask ...
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)  # ... then clip
        ref_opt.step()
        ref_opt.zero_grad()
    for a, b in zip(dps.dps.masks, ref_dps.masks):
        assert a is not None and torch.equal(a, b)
    for (name, p), q in zip(acc.unwrap_model(model).named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)


def test_forgetting_the_hook_raises_at_the_optimizer_step():
    acc = accelerate.Accelerator(cpu=True)
    model = tiny_bert()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = acc.prepare(model, opt)
    AccelerateDPS(acc, model, total_steps=10, update_ratio=0.2, optimizer=opt)
    acc.backward(model(**next(Rows().batches(BATCH))).loss)
    with pytest.raises(RuntimeError, match="DPS never saw its gradients"):
        opt.step()


@pytest.mark.e2e
@pytest.mark.parametrize("flags", [[], ["--mix", "--sage"]], ids=["dense", "mix_sage"])
def test_example_runs_and_learns(flags, capsys):
    sys.path.insert(0, str(REPO / "examples"))
    try:
        import accelerate_dps
    finally:
        sys.path.pop(0)
    last = accelerate_dps.main(["--steps", "20", *flags])
    out = capsys.readouterr().out
    assert "20 optimizer steps" in out and last == last


@pytest.mark.e2e
@pytest.mark.parametrize("variant", ["dense", "mix"])
def test_save_state_and_load_state_resume_dps_bit_identically(tmp_path, variant):
    """``register_for_checkpointing(dps)``: a run stopped after 5 of 12 steps and resumed from
    ``accelerator.save_state`` in fresh objects ends bit-identical to an uninterrupted one."""
    from adaptune.schedules.integrations.accelerate import total_steps

    accum, batches = 2, list(Rows(n=BATCH * 24).batches(BATCH))
    steps = total_steps(batches, epochs=1, gradient_accumulation_steps=accum)
    assert steps == 12

    def fresh():
        acc = accelerate.Accelerator(gradient_accumulation_steps=accum, cpu=True)
        model = tiny_bert()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model, opt = acc.prepare(model, opt)
        dps = AccelerateDPS(acc, model, total_steps=steps, update_ratio=0.25, variant=variant, seed=3, optimizer=opt)
        acc.register_for_checkpointing(dps)
        return acc, model, opt, dps

    acc, model, opt, dps = fresh()
    _train(acc, model, opt, dps, batches)
    full = {k: v.clone() for k, v in acc.unwrap_model(model).state_dict().items()}
    full_masks = [m.clone() for m in dps.dps.masks if m is not None]

    acc, model, opt, dps = fresh()
    _train(acc, model, opt, dps, batches[: 5 * accum])
    acc.save_state(str(tmp_path / "state"))
    acc, model, opt, dps = fresh()
    acc.load_state(str(tmp_path / "state"))
    assert dps.step == 5 and dps.dps.state_dict()["begun_step"] == 5
    _train(acc, model, opt, dps, batches[5 * accum :])
    assert dps.step == steps
    assert [m for m in dps.dps.masks if m is not None] and all(
        torch.equal(a, b) for a, b in zip(full_masks, [m for m in dps.dps.masks if m is not None])
    )
    for k, v in acc.unwrap_model(model).state_dict().items():
        assert torch.equal(full[k], v), k


def test_total_steps_counts_partial_accumulation_groups():
    from adaptune.schedules.integrations.accelerate import total_steps

    assert total_steps(10, epochs=3, gradient_accumulation_steps=4) == 9  # 4 + 4 + 2 per epoch
    assert total_steps(range(8), epochs=2) == 16
    with pytest.raises(ValueError, match="positive"):
        total_steps(0, epochs=1)
