"""DPS (schedules/dps.py) against docs/algorithms.md §2, on tiny models (CPU, a few seconds)."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from adaptune.schedules import build_schedule
from adaptune.schedules.dps import DPS, DPSSchedule, attach_mix, disable_dropout, keep_count, linear_weights, phase_length
from adaptune.common.errors import ConfigError
from adaptune.common.families import family_patterns

ROOT = Path(__file__).resolve().parents[1]
MLP_PATTERNS = ("0", "2", "4")  # the three Linears of tiny_mlp()

BERT = family_patterns("bert")  # the patterns a GLUE task supplies for a BERT model


def tiny_mlp(seed: int = 0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 3)).to(dtype)


def batch(step: int, size: int = 8, dtype=torch.float64):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(size, 6, generator=g, dtype=dtype), torch.randint(0, 3, (size,), generator=g)


def build(variant="dense", T=40, ratio=0.1, p=0.3, seed=0, dps_seed=7, dtype=torch.float64):
    model = tiny_mlp(seed, dtype)
    mix = attach_mix(model, MLP_PATTERNS) if variant == "mix" else None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    dps = DPS(linear_weights(model), T, p=p, update_ratio=ratio, variant=variant, patterns=MLP_PATTERNS, mix=mix, seed=dps_seed)
    return model, opt, dps


def run_steps(model, opt, dps, first, last, micro=1, record=None):
    """The shared loop's hook order; ``micro`` micro-batches per optimizer step, summed."""
    model.train()
    for step in range(first, last + 1):
        dps.on_step_begin(step)
        x, y = batch(step, dtype=dps.params[0].dtype)
        for xs, ys in zip(x.chunk(micro), y.chunk(micro)):
            loss = nn.functional.cross_entropy(model(xs), ys, reduction="sum") / len(x)
            loss.backward()
        if record is not None:
            record.setdefault("before", {})[step] = [t.grad.clone() for t in dps.params]
            record.setdefault("noise", {})[step] = [None if n is None else n.clone() for n in dps.noise]
        dps.on_gradients(step)
        if record is not None:
            record.setdefault("after", {})[step] = [t.grad.clone() for t in dps.params]
            record.setdefault("masks", {})[step] = [None if m is None else m.clone() for m in dps.masks]
        opt.step()
        opt.zero_grad(set_to_none=True)


def reference_mask(score: torch.Tensor, p: float) -> torch.Tensor:
    """Full sort: keep entries >= the value of rank ceil(n(1-p)) in descending order."""
    keep = keep_count(score.numel(), p)
    tau = score.reshape(-1).sort(descending=True).values[keep - 1]
    return score >= tau


# --------------------------------------------------------------------------- phases
def test_phase_table():
    _, _, dps = build(T=40, ratio=0.1)  # U = 4
    assert dps.phase_len == 4
    table = [(s, dps.phase(s), dps.is_selection(s)) for s in range(1, 41)]
    expected = [(s, (s - 1) // 4 + 1, ((s - 1) // 4) % 2 == 1) for s in range(1, 41)]
    assert table == expected
    assert [dps.is_selection(s) for s in range(1, 13)] == [False] * 4 + [True] * 4 + [False] * 4
    # The paper's RTE setting: T = 468, r = 0.05 -> U = int(23.4) = 23.
    assert phase_length(468, 0.05) == 23
    _, _, rte = build(T=468, ratio=0.05)
    assert [rte.phase(s) for s in (1, 23, 24, 46, 47, 468)] == [1, 1, 2, 2, 3, 21]
    assert [rte.is_selection(s) for s in (23, 24, 46, 47, 468)] == [False, True, True, False, False]
    assert phase_length(690, 0.05) == 34 and phase_length(1605, 0.05) == 80


def test_keep_count_is_exact():
    assert keep_count(10, 0.3) == 7
    assert keep_count(100, 0.3) == 70  # 100 * (1 - 0.3) is 70.00000000000001 in floats
    assert keep_count(7, 0.3) == 5  # ceil(4.9)
    assert keep_count(13, 0.0) == 13
    assert keep_count(1, 0.99) == 1


# --------------------------------------------------------------------------- selection mask
def _one_weight(values: torch.Tensor, p: float):
    """DPS with U = 1 over one (4, 5) weight whose step-1 squared gradient is ``values``."""
    w = nn.Parameter(torch.zeros(4, 5, dtype=torch.float64))
    dps = DPS([("layer.weight", w), ("layer.bias", nn.Parameter(torch.zeros(4)))], total_steps=10, p=p, update_ratio=0.1)
    assert dps.names == ["layer.weight"]  # biases (1-D) are never selected
    w.grad = values.sqrt().reshape(4, 5).clone()
    dps.on_step_begin(1)
    dps.on_gradients(1)  # exploration: G = g^2
    torch.testing.assert_close(dps.scores[0], values.reshape(4, 5), rtol=0, atol=1e-12)
    dps.on_step_begin(2)  # selection: mask from G
    return dps


def test_mask_is_exact_top_k():
    values = torch.arange(1, 21, dtype=torch.float64) ** 2  # distinct scores 1..400
    values = values[torch.randperm(20, generator=torch.Generator().manual_seed(3))]
    dps = _one_weight(values, p=0.3)
    mask = dps.masks[0].reshape(-1)
    assert mask.dtype == torch.bool
    assert int(mask.sum()) == 14 == math.ceil(20 * 0.7)
    assert torch.equal(mask, values >= 7**2)  # exactly the top 14
    assert dps.kept_fraction() == pytest.approx(14 / 20)


def test_mask_keeps_all_ties_at_threshold():
    values = torch.arange(1, 21, dtype=torch.float64) ** 2
    values[values < 49] = 0.0
    values[3:8] = 49.0  # ranks 12..16 tie at the rank-14 value
    dps = _one_weight(values, p=0.3)
    mask = dps.masks[0].reshape(-1)
    assert torch.equal(mask, values >= 49.0)
    assert int(mask.sum()) == int((values >= 49.0).sum()) > 14


def test_selection_masks_gradients_every_step_and_recomputes_per_phase():
    model, opt, dps = build("dense", T=40, ratio=0.1, p=0.3)  # U = 4
    rec = {}
    run_steps(model, opt, dps, 1, 16, record=rec)
    for phase_steps, score_steps in ((range(5, 9), range(1, 5)), (range(13, 17), range(9, 13))):
        first = phase_steps[0]
        for i in range(len(dps.params)):
            # The mask is the top ceil(n(1-p)) of the previous exploration's sum of g^2.
            g2 = sum(rec["before"][s][i] ** 2 for s in score_steps)
            expected = reference_mask(g2, 0.3)
            assert torch.equal(rec["masks"][first][i], expected)
            for s in phase_steps:
                assert torch.equal(rec["masks"][s][i], expected)  # fixed in the phase
                assert torch.equal(rec["after"][s][i], rec["before"][s][i] * expected)  # masked entries: 0
                assert bool((rec["after"][s][i][~expected] == 0).all())
    assert any(not torch.equal(a, b) for a, b in zip(rec["masks"][5], rec["masks"][13]))  # recomputed
    for s in list(range(1, 5)) + list(range(9, 13)):  # exploration: untouched
        assert all(torch.equal(a, b) for a, b in zip(rec["after"][s], rec["before"][s]))
        assert all(m is None for m in rec["masks"][s])


def test_scores_reset_at_each_exploration_phase():
    model, opt, dps = build("dense", T=40, ratio=0.1)
    rec = {}
    run_steps(model, opt, dps, 1, 8, record=rec)
    assert all(s is None for s in dps.scores)  # scores live only in exploration
    run_steps(model, opt, dps, 9, 9, record=rec)
    for i, s in enumerate(dps.scores):
        assert s.dtype == dps.params[i].dtype == torch.float64
        assert torch.equal(s, rec["before"][9][i] ** 2)  # reset to g^2: phase 1 is gone
    run_steps(model, opt, dps, 10, 10, record=rec)
    for i, s in enumerate(dps.scores):
        g9, g10 = rec["before"][9][i], rec["before"][10][i]
        torch.testing.assert_close(s, g9 * g9 + g10 * g10, rtol=1e-14, atol=0)  # addcmul may fuse


# --------------------------------------------------------------------------- DPS-Mix
def _w_eff(n_or_m, w, ref, p):
    n_or_m = n_or_m.to(w.dtype)
    return ((1 - n_or_m) * ref + n_or_m * w - p * ref) / (1 - p)


def test_mix_exploration_forward_gradients_and_scores():
    p = 0.3
    model, opt, dps = build("mix", T=40, ratio=0.1, p=p)
    w_pre = [w.detach().clone() for w in dps.params]
    with torch.no_grad():  # move W away from W_pre
        for t in dps.params:
            t.add_(0.1 * torch.randn_like(t))
    rec = {}
    run_steps(model, opt, dps, 1, 1, record=rec)
    noise = rec["noise"][1]
    for i, (lin, t) in enumerate(zip((model[0], model[2], model[4]), dps.params)):
        assert noise[i].shape == (1, t.shape[1]) and noise[i].dtype == torch.bool  # per input column
        assert torch.equal(dps.w_pre[i], w_pre[i])
        # Gradient masked by N (whole columns), G = g^2 N, C = N.
        assert bool((rec["after"][1][i][:, ~noise[i][0]] == 0).all())
        assert torch.equal(dps.scores[i], rec["after"][1][i] ** 2)
        assert torch.equal(dps.counts[i], noise[i][0].double())
    # Forward formula (after step 2's draw), by hand; eval mode uses the raw W.
    dps.on_step_begin(2)
    x, _ = batch(2)
    model.train()
    h = x
    for i, lin in enumerate((model[0], model[2], model[4])):
        raw = lin.parametrizations.weight.original
        expected = _w_eff(dps.noise[i], raw, w_pre[i], p)
        torch.testing.assert_close(lin.weight, expected, rtol=0, atol=1e-12)
        h = nn.functional.linear(h, expected, lin.bias)
        h = torch.tanh(h) if i < 2 else h
    torch.testing.assert_close(model(x), h, rtol=0, atol=1e-12)
    model.eval()
    for lin in (model[0], model[2], model[4]):
        assert lin.weight is lin.parametrizations.weight.original
    plain = tiny_mlp(seed=5)  # never wrapped: the state dict keys agree
    plain.load_state_dict(model.state_dict())
    plain.eval()
    assert torch.equal(model(x), plain(x))


def test_mix_noise_is_redrawn_each_step_with_rate_1_minus_p():
    model = nn.Sequential(nn.Linear(64, 4))
    mix = attach_mix(model)
    dps = DPS(linear_weights(model), 1000, p=0.3, update_ratio=0.5, variant="mix", mix=mix, seed=1)
    draws = []
    for step in range(1, 201):
        dps.on_step_begin(step)
        draws.append(dps.noise[0].clone())
    assert not torch.equal(draws[0], draws[1])
    rate = torch.cat(draws).double().mean().item()
    assert abs(rate - 0.7) < 0.02
    assert dps.kept_fraction() == pytest.approx(draws[-1].double().mean().item())


def test_mix_selection_mask_snapshot_and_forward():
    p = 0.3
    model, opt, dps = build("mix", T=40, ratio=0.1, p=p)  # U = 4 < 50: score = G / max(C, 1)
    rec = {}
    run_steps(model, opt, dps, 1, 4, record=rec)
    g2n = [sum(rec["after"][s][i] ** 2 for s in range(1, 5)) for i in range(3)]
    counts = [sum(rec["noise"][s][i][0].double() for s in range(1, 5)) for i in range(3)]
    w_before = [t.detach().clone() for t in dps.params]
    dps.on_step_begin(5)
    for i, t in enumerate(dps.params):
        assert torch.equal(dps.masks[i], reference_mask(g2n[i] / counts[i].clamp(min=1), p))
        assert torch.equal(dps.w_tgt[i], w_before[i])  # W_tgt = W at the phase's first step
    with torch.no_grad():
        for t in dps.params:
            t.add_(0.1 * torch.randn_like(t))
    model.train()
    for i, lin in enumerate((model[0], model[2], model[4])):
        expected = _w_eff(dps.masks[i], lin.parametrizations.weight.original, w_before[i], p)
        torch.testing.assert_close(lin.weight, expected, rtol=0, atol=1e-12)
    x, y = batch(5)
    nn.functional.cross_entropy(model(x), y).backward()
    dps.on_gradients(5)
    for i, t in enumerate(dps.params):
        assert bool((t.grad[~dps.masks[i]] == 0).all())


def test_mix_score_decay_when_phase_is_long():
    model = nn.Sequential(nn.Linear(10, 8))
    mix = attach_mix(model)
    dps = DPS(linear_weights(model), 1000, p=0.3, update_ratio=0.05, variant="mix", mix=mix)  # U = 50
    g = torch.Generator().manual_seed(5)
    G = torch.rand(8, 10, generator=g)
    C = torch.randint(0, 51, (10,), generator=g).float()
    dps.scores, dps.counts, dps.score_phase = [G.clone()], [C.clone()], 1
    dps.on_step_begin(51)
    expected = reference_mask(G / C.clamp(min=1) * torch.exp(-C / 50), 0.3)
    assert torch.equal(dps.masks[0], expected)


# --------------------------------------------------------------------------- accumulation, resume
@pytest.mark.parametrize("variant", ["dense", "mix"])
def test_gradient_accumulation_counts_optimizer_steps(variant):
    a = build(variant, T=40, ratio=0.1)
    b = build(variant, T=40, ratio=0.1)
    rec_a, rec_b = {}, {}
    run_steps(*a, 1, 14, micro=1, record=rec_a)
    run_steps(*b, 1, 14, micro=2, record=rec_b)  # same steps, two micro-batches each
    for s in range(1, 15):
        for ma, mb in zip(rec_a["masks"][s], rec_b["masks"][s]):
            assert (ma is None and mb is None) or torch.equal(ma, mb)
        for na, nb in zip(rec_a["noise"][s], rec_b["noise"][s]):
            assert (na is None and nb is None) or torch.equal(na, nb)
    for sa, sb in zip(a[2].scores, b[2].scores):
        torch.testing.assert_close(sa, sb, rtol=1e-6, atol=1e-9)
    for pa, pb in zip(a[0].parameters(), b[0].parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("variant", ["dense", "mix"])
@pytest.mark.parametrize("stop", [2, 4, 6, 10])  # mid-exploration, phase end, mid-selection, ...
def test_resume_continues_bit_identically(variant, stop):
    T = 16
    ref = build(variant, T=40, ratio=0.1)
    run_steps(*ref, 1, T)

    first = build(variant, T=40, ratio=0.1)
    run_steps(*first, 1, stop)
    buffer = io.BytesIO()
    torch.save({"model": first[0].state_dict(), "opt": first[1].state_dict(), "dps": first[2].state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed = build(variant, T=40, ratio=0.1, seed=99, dps_seed=12345)  # other init, other DPS seed
    resumed[0].load_state_dict(saved["model"])
    resumed[1].load_state_dict(saved["opt"])
    resumed[2].load_state_dict(saved["dps"])
    run_steps(*resumed, stop + 1, T)

    for pa, pb in zip(ref[0].state_dict().values(), resumed[0].state_dict().values()):
        assert torch.equal(pa, pb)
    for field in ("scores", "counts", "masks", "w_tgt", "noise"):
        for ta, tb in zip(getattr(ref[2], field), getattr(resumed[2], field)):
            assert (ta is None and tb is None) or torch.equal(ta, tb), field
    assert torch.equal(ref[2].generator.get_state(), resumed[2].generator.get_state())


def test_resume_rejects_other_settings():
    _, _, dps = build("dense", T=40, ratio=0.1)
    _, _, other = build("dense", T=40, ratio=0.1, p=0.2)
    with pytest.raises(ConfigError, match=r"DPS p=0.3 \(schedule.drop_p\), this run has 0.2"):
        other.load_state_dict(dps.state_dict())


# --------------------------------------------------------------------------- errors
def test_errors_name_the_values():
    model = tiny_mlp()
    with pytest.raises(ConfigError, match=r"schedule\.dps_patterns=\['nothing'\] matches no parameter"):
        DPS(linear_weights(model), 40, patterns=["nothing"])
    with pytest.raises(ConfigError, match=r"int\(10 \* 0\.05\) = 0 < 1"):
        DPS(linear_weights(model), 10, update_ratio=0.05)
    # DPS checks its own arguments and names them (not a config key the caller never typed)
    for p in (1.0, -0.1, "0.3"):
        with pytest.raises(ValueError, match=r"^p must be in \[0, 1\), got") as err:
            DPS(linear_weights(model), 40, p=p)
        assert not isinstance(err.value, ConfigError)
    for r in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"^update_ratio must be in \(0, 1\], got"):
            DPS(linear_weights(model), 40, update_ratio=r)
    with pytest.raises(ValueError, match="^variant must be 'dense' or 'mix', got 'sparse'"):
        DPS(linear_weights(model), 40, variant="sparse")
    with pytest.raises(ValueError, match="attach_mix"):
        DPS(linear_weights(model), 40, variant="mix")
    with pytest.raises(ConfigError, match=r"^schedule.drop_p must be a number in \[0, 1\), got 1.0"):
        build_schedule({"name": "dps", "lr": 1e-3, "drop_p": 1.0})
    with pytest.raises(ConfigError, match="schedule.variant"):
        build_schedule({"name": "dps", "lr": 1e-3, "variant": "both"})
    with pytest.raises(ConfigError, match=r"int\(10 \* 0\.05\)"):
        DPSSchedule({"name": "dps", "lr": 1e-3}).setup(_tiny_bert(), BERT, 10)


# --------------------------------------------------------------------------- the schedule on BERT
def _tiny_bert(dropout: float = 0.0, attn: str = "eager"):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=2,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        attn_implementation=attn,
    )
    return BertForSequenceClassification(config)


def _bert_batch(step: int):
    g = torch.Generator().manual_seed(step)
    return {"input_ids": torch.randint(0, 50, (4, 10), generator=g), "labels": torch.randint(0, 2, (4,), generator=g)}


def _dps_cfg(**extra):
    from omegaconf import OmegaConf

    from conftest import compose

    cfg = OmegaConf.to_container(compose(["schedule=dps"]).schedule)
    cfg.update(extra)
    return cfg


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_preset_turns_dropout_off(attn):
    torch.manual_seed(0)
    model = _tiny_bert(dropout=0.5, attn=attn).train()
    ids = _bert_batch(0)["input_ids"]
    assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
    kept = _tiny_bert(dropout=0.5, attn=attn).train()
    DPSSchedule(_dps_cfg(disable_dropout=False)).prepare_model(kept, BERT)
    assert not torch.equal(kept(input_ids=ids).logits, kept(input_ids=ids).logits)  # overridable
    DPSSchedule(_dps_cfg()).prepare_model(model, BERT)
    assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, nn.Dropout))
    assert model.config.hidden_dropout_prob == 0.0 == model.config.attention_probs_dropout_prob
    assert disable_dropout(model) == 0


@pytest.mark.parametrize("variant", ["dense", "mix"])
def test_schedule_on_bert(variant):
    model = _tiny_bert(dropout=0.1)
    sched = build_schedule(_dps_cfg(variant=variant))
    assert isinstance(sched, DPSSchedule)
    sched.prepare_model(model, BERT)
    sched.setup(model, BERT, total_steps=20)  # U = 1
    names = sched.dps.names
    assert "bert.encoder.layer.0.attention.self.query.weight" in names
    assert "bert.encoder.layer.1.output.dense.weight" in names
    assert "bert.pooler.dense.weight" in names and "classifier.weight" in names
    assert not any("embeddings" in n or n.endswith("bias") or "LayerNorm" in n for n in names)
    assert len(names) == 2 * 6 + 2
    model.train()
    logs = {}
    for step in range(1, 5):
        sched.on_step_begin(step)
        model(**_bert_batch(step)).loss.backward()
        sched.on_before_clip(step)  # DPS masks before the global clip (the reference order)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        sched.on_gradients(step)
        sched.optimizer.step()
        sched.lr_scheduler.step()
        sched.optimizer.zero_grad(set_to_none=True)
        sched.after_step(step)
        logs[step] = sched.log_metrics(step)
    assert logs[1]["dps/phase"] == 1.0 and logs[1]["dps/selection"] == 0.0
    assert logs[2]["dps/phase"] == 2.0 and logs[2]["dps/selection"] == 1.0
    if variant == "dense":
        assert 0.7 <= logs[2]["dps/kept_fraction"] < 0.71
    else:  # U = 1: columns that N dropped at step 1 all score 0; ties at the threshold are kept
        assert logs[2]["dps/kept_fraction"] >= 0.7
    assert logs[1]["dps/kept_fraction"] == (1.0 if variant == "dense" else pytest.approx(0.7, abs=0.1))
    assert "lr" in logs[1]
    # Checkpoints: the model's state dict keeps plain names and round-trips into a fresh attached
    # model and into a plain one; the schedule state round-trips through weights_only loading.
    state = model.state_dict()
    assert "bert.pooler.dense.weight" in state and not any("parametrizations" in k for k in state)
    buffer = io.BytesIO()
    torch.save({"model": state, "schedule": sched.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    fresh = _tiny_bert(dropout=0.1)
    fresh_sched = build_schedule(_dps_cfg(variant=variant))
    fresh_sched.prepare_model(fresh, BERT)
    fresh_sched.setup(fresh, BERT, total_steps=20)
    fresh.load_state_dict(saved["model"])
    fresh_sched.load_state_dict(saved["schedule"])
    assert sched.dps.mask_phase == fresh_sched.dps.mask_phase
    plain = _tiny_bert()
    plain.load_state_dict(saved["model"])
    model.eval(), fresh.eval(), plain.eval()
    ids = _bert_batch(9)["input_ids"]
    assert torch.equal(model(input_ids=ids).logits, fresh(input_ids=ids).logits)
    assert torch.equal(model(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_memory_is_bool_masks_and_scores_only_for_selected():
    model, opt, dps = build("dense", T=40, ratio=0.1, dtype=torch.float32)
    n = sum(t.numel() for t in dps.params)
    run_steps(model, opt, dps, 1, 2)
    assert dps.memory_bytes() == {"scores": 4 * n, "masks": 0, "snapshots": 0}
    run_steps(model, opt, dps, 3, 5)
    assert dps.memory_bytes() == {"scores": 0, "masks": n, "snapshots": 0}
    assert all(m.dtype == torch.bool for m in dps.masks)


# --------------------------------------------------------------------------- protocol fixes (#12)
def test_mix_gradient_is_the_reference_backward_without_the_1_over_1_minus_p_factor():
    """The reference op returns grad(W_eff) ⊙ N, although its forward divides by (1-p)."""
    p = 0.3
    model, opt, dps = build("mix", T=40, ratio=0.1, p=p)
    for step, mask_of in ((1, lambda i: dps.noise[i]), (5, lambda i: dps.masks[i])):  # explore, select
        if step == 5:
            run_steps(model, opt, dps, 1, 4)
        dps.on_step_begin(step)
        model.train()
        x, y = batch(step)
        # grad(W_eff) by hand: the same network with W_eff as a leaf
        effs = [lin.weight.detach().clone().requires_grad_(True) for lin in (model[0], model[2], model[4])]
        h = x
        for i, lin in enumerate((model[0], model[2], model[4])):
            h = nn.functional.linear(h, effs[i], lin.bias)
            h = torch.tanh(h) if i < 2 else h
        nn.functional.cross_entropy(h, y).backward()
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        for i, lin in enumerate((model[0], model[2], model[4])):
            expected = effs[i].grad * mask_of(i).to(effs[i].dtype)
            torch.testing.assert_close(lin.parametrizations.weight.original.grad, expected, rtol=1e-12, atol=0)
            assert not torch.allclose(expected / (1 - p), expected)  # the factor would be visible
        opt.zero_grad(set_to_none=True)


def test_dense_mask_is_applied_before_global_clipping_in_the_loop(tmp_path, monkeypatch):
    """The runner fires DPS in on_before_clip: the clip's total norm is the masked gradient's."""
    from conftest import compose, glue_overrides, write_glue
    from adaptune.runner.loop import run

    norms = []
    original = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *a, **k):
        params = list(params)
        norms.append((original(params, max_norm, *a, **k), [p.grad.clone() if p.grad is not None else None for p in params]))
        return norms[-1][0]

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    masked_at_clip = []

    import adaptune.schedules.dps.algorithm as algorithm

    on_gradients = algorithm.DPS.on_gradients

    def record(self, step):
        on_gradients(self, step)
        if self.is_selection(step):
            masked_at_clip.append([(t.grad.clone(), m.clone()) for t, m in zip(self.params, self.masks)])

    monkeypatch.setattr(algorithm.DPS, "on_gradients", record)
    data = write_glue(tmp_path / "rte", "rte", n_train=32, n_dev=8)
    cfg = compose(
        glue_overrides(
            data,
            "rte",
            "schedule=dps",
            "trainer.batch_size=8",
            "trainer.max_steps=4",
            "schedule.update_ratio=0.25",
            "trainer.max_grad_norm=1e-3",
        )
    )
    run(cfg, tmp_path / "run")
    assert masked_at_clip, "no selection step ran"
    # at each clip of a selection step (steps 2 and 4), the masked entries' gradients are zero
    (_, grads2), (_, grads4) = norms[1], norms[3]
    for grads_at_clip in (grads2, grads4):
        zeroed = [g for g in grads_at_clip if g is not None and g.dim() == 2 and (g == 0).float().mean() > 0.25]
        assert zeroed, "the clip saw unmasked gradients"
    for grad, mask in masked_at_clip[0]:
        assert bool((grad[~mask] == 0).all())


def test_schedule_T_sets_the_phase_length_independently_of_the_run_length():
    from adaptune.common.families import family_patterns

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    sched = build_schedule(_dps_cfg(T=32, update_ratio=0.05))
    sched.prepare_model(model, family_patterns("bert"))
    sched.setup(model, {"dps": ("0", "2"), "sage": (), "no_decay": ("bias",)}, total_steps=96)
    assert sched.dps.total_steps == 32 and sched.dps.phase_len == 1  # U = int(32 * 0.05) = 1
    # the LR schedule still spans the run: warmup 10% of 96 steps
    assert sched.lr_scheduler is not None
    with pytest.raises(ConfigError, match=r"schedule\.T"):
        bad = build_schedule(_dps_cfg(T=10, update_ratio=0.05))
        bad.setup(nn.Sequential(nn.Linear(4, 2)), {"dps": ("0",), "sage": (), "no_decay": ("bias",)}, total_steps=96)


def test_an_overflowed_step_is_recorded_and_adds_nothing_to_the_scores(tmp_path, monkeypatch):
    """fp16 overflow, forced at step 2 of an exploration phase: results.json lists the step, and
    DPS's scores accumulate the other exploration steps only (the reference
    added the loss-scaled gradients of such steps; we skip them, docs/algorithms.md §2)."""
    from conftest import compose, glue_overrides, write_glue

    import adaptune.schedules.dps.algorithm as algorithm
    from adaptune.runner.loop import run
    from adaptune.runner.precision import Precision

    seen = []
    on_gradients = algorithm.DPS.on_gradients

    def record(self, step):
        on_gradients(self, step)
        if not self.is_selection(step):
            seen.append((step, [s.clone() for s in self.scores]))

    monkeypatch.setattr(algorithm.DPS, "on_gradients", record)
    monkeypatch.setattr(Precision, "overflowed", lambda self, grads: self._step_no() == 2)
    counter = {"n": 0}

    def step_no(self):
        counter["n"] += 1
        return counter["n"]

    monkeypatch.setattr(Precision, "_step_no", step_no, raising=False)
    data = write_glue(tmp_path / "rte", "rte", n_train=48, n_dev=8)
    cfg = compose(
        glue_overrides(data, "rte", "schedule=dps", "trainer.batch_size=8", "trainer.max_steps=6", "schedule.update_ratio=0.5")
    )  # U = 3: steps 1-3 explore, 4-6 select
    res = run(cfg, tmp_path / "run")
    assert res["fp16_overflow_steps"] == [2]
    assert [s for s, _ in seen] == [1, 3]  # step 2 never reached DPS's scores
