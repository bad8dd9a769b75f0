"""The Hugging Face Trainer integration on a tiny random BERT: SAGE through
``optimizer_cls_and_kwargs`` equals a hand loop step for step; ``DPSCallback`` masks exactly what
:class:`adaptune.schedules.dps.DPS` masks in a hand loop; a hook the Trainer never fires is an error."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from adaptune.common.errors import ConfigError  # noqa: E402
from adaptune.schedules.dps import DPS, linear_weights  # noqa: E402
from adaptune.schedules.integrations.hf import (  # noqa: E402
    AdamaxSAGEForTrainer,
    DPSCallback,
    make_sage_optimizer,
    sage_optimizer_cls_and_kwargs,
)
from adaptune.schedules.sage import AdamaxSAGE, AdamWSAGE  # noqa: E402

N, LEN, BATCH = 24, 8, 4


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=60,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)


class Rows(torch.utils.data.Dataset):
    def __init__(self, n: int = N, seed: int = 1):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 60, (n, LEN), generator=g)
        self.labels = (self.ids[:, 0] % 2).long()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(LEN, dtype=torch.long), "labels": self.labels[i]}

    def batches(self, size: int):
        for i in range(0, len(self), size):
            yield {
                "input_ids": self.ids[i : i + size],
                "attention_mask": torch.ones_like(self.ids[i : i + size]),
                "labels": self.labels[i : i + size],
            }


def args(tmp_path, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        per_device_train_batch_size=BATCH,
        max_steps=N // BATCH,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        logging_strategy="no",
        eval_strategy="no",
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        seed=0,
        disable_tqdm=True,
    )
    base.update(kw)
    return TrainingArguments(**base)


def hand_loop(model, data, optimizer, *, steps, accum=1, max_norm=1.0, dps=None, record=None):
    """The Trainer's order: backward of each micro-batch, clip, DPS, step. Under accumulation the
    Trainer (transformers 5) passes ``num_items_in_batch`` (labels in the whole window) to a model
    whose forward takes ``**kwargs``, which then normalises the loss by it."""
    batches = list(data.batches(BATCH))
    for step in range(1, steps + 1):
        if dps is not None:
            dps.on_step_begin(step)
        window = [batches[((step - 1) * accum + k) % len(batches)] for k in range(accum)]
        items = torch.tensor(sum(len(b["labels"]) for b in window))
        for batch in window:
            out = model(**batch, **({"num_items_in_batch": items} if accum > 1 else {}))
            out.loss.backward()
        if max_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        if dps is not None:
            dps.on_gradients(step)
            if record is not None:
                record.append(masks_of(dps))
        optimizer.step()
        optimizer.zero_grad()


def masks_of(dps: DPS):
    return [None if m is None else m.clone() for m in dps.masks]


# ------------------------------------------------------------------------------ SAGE
@pytest.mark.parametrize("base,cls", [("adamax", AdamaxSAGE), ("adamw", AdamWSAGE)])
def test_sage_via_optimizer_cls_and_kwargs_matches_hand_loop(tmp_path, base, cls):
    model, ref = tiny_bert(), tiny_bert()
    data = Rows()
    opt_cls, kwargs = sage_optimizer_cls_and_kwargs(model, base=base, lr=1e-3, beta3=0.8)
    trainer = Trainer(model=model, args=args(tmp_path), train_dataset=data, optimizer_cls_and_kwargs=(opt_cls, kwargs))
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer, cls)
    flags = [g["sage"] for g in trainer.optimizer.param_groups]
    assert flags.count(True) >= 1 and flags.count(False) >= 1
    sage_ids = {id(p) for g in trainer.optimizer.param_groups if g["sage"] for p in g["params"]}
    names = [n for n, p in model.named_parameters() if id(p) in sage_ids]
    assert all("encoder.layer" in n and "LayerNorm" not in n for n in names) and len(names) == 2 * 12

    opt = make_sage_optimizer(ref, base=base, lr=1e-3, beta3=0.8)
    assert type(opt) is cls
    ref.train()
    hand_loop(ref, data, opt, steps=N // BATCH)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7, msg=name)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), tiny_bert().parameters()))


def test_sage_groups_refuse_a_different_model():
    _, kwargs = sage_optimizer_cls_and_kwargs(tiny_bert(), lr=1e-3)
    with pytest.raises(ValueError, match="do not hold"):
        AdamaxSAGEForTrainer(tiny_bert().parameters(), **kwargs)
    with pytest.raises(ConfigError, match="base='sgd' is unknown"):
        sage_optimizer_cls_and_kwargs(tiny_bert(), base="sgd", lr=1e-3)


# ------------------------------------------------------------------------------ DPS
class Spy(TrainerCallback):
    """After DPSCallback: the masks DPS holds at each optimizer step, and that masked grads are 0."""

    def __init__(self, dps_cb):
        self.cb, self.masks, self.zero_checked = dps_cb, [], 0

    def on_pre_optimizer_step(self, args, state, control, **kw):
        dps = self.cb.dps
        self.masks.append(masks_of(dps))
        for t, m in zip(dps.params, dps.masks):
            if m is not None:
                assert t.grad is not None and bool((t.grad[~m] == 0).all())
                self.zero_checked += 1


@pytest.mark.e2e
@pytest.mark.parametrize("accum", [1, 2])
def test_dps_callback_masks_what_dps_masks_in_a_hand_loop(tmp_path, accum):
    steps = 8
    data = Rows(n=BATCH * steps * accum)
    model, ref = tiny_bert(), tiny_bert()
    cb = DPSCallback(p=0.3, update_ratio=0.25)
    spy = Spy(cb)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    trainer = Trainer(
        model=model,
        args=args(tmp_path, max_steps=steps, gradient_accumulation_steps=accum),
        train_dataset=data,
        callbacks=[cb, spy],
        optimizers=(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)),
    )
    trainer.train()
    assert cb.dps.phase_len == 2 and cb.masked_step == steps
    assert any("classifier" in n for n in cb.dps.names) and all("embeddings" not in n for n in cb.dps.names)
    assert spy.zero_checked == 4 * len(cb.dps.names)  # steps 3, 4, 7, 8 select

    ref_dps = DPS(linear_weights(ref), steps, 0.3, 0.25, "dense", patterns=cb.dps.names)
    record: list = []
    ref.train()
    hand_loop(ref, data, torch.optim.SGD(ref.parameters(), lr=0.5), steps=steps, accum=accum, dps=ref_dps, record=record)
    assert len(record) == len(spy.masks) == steps
    for step, (mine, theirs) in enumerate(zip(spy.masks, record), 1):
        for a, b in zip(mine, theirs):
            assert (a is None) == (b is None), step
            if a is not None:
                assert torch.equal(a, b), step
                assert 0.69 < a.float().mean() < 0.75
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)


def test_dps_mix_callback_patches_the_forward_and_trains(tmp_path):
    model = tiny_bert()
    cb = DPSCallback(variant="mix", p=0.3, update_ratio=0.34)
    before = copy.deepcopy(model.state_dict())
    Trainer(model=model, args=args(tmp_path, max_steps=6), train_dataset=Rows(), callbacks=[cb]).train()
    assert cb.dps.mix is not None and cb.masked_step == 6
    assert "bert.encoder.layer.0.attention.self.query.parametrizations.weight.original" in dict(model.named_parameters())
    after = model.state_dict()
    assert set(after) == set(before)  # state_dict keys unchanged by the parametrization
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_hook_never_fired_is_an_error(tmp_path, monkeypatch):
    from transformers.trainer_callback import CallbackHandler

    monkeypatch.setattr(CallbackHandler, "on_pre_optimizer_step", lambda self, args, state, control: control)
    trainer = Trainer(model=tiny_bert(), args=args(tmp_path), train_dataset=Rows(), callbacks=[DPSCallback(update_ratio=0.5)])
    with pytest.raises(RuntimeError, match="on_pre_optimizer_step never fired"):
        trainer.train()
    assert trainer.state.global_step == 1
    state = SimpleNamespace(global_step=0, max_steps=10)
    with pytest.raises(RuntimeError, match="before on_train_begin"):
        DPSCallback().on_step_end(None, state, None)


def test_dps_callback_refuses_sharded_training_and_bad_settings():
    state = SimpleNamespace(global_step=0, max_steps=100)
    for sharded, word in (
        (SimpleNamespace(deepspeed="ds.json", fsdp=None), "DeepSpeed"),
        (SimpleNamespace(deepspeed=None, fsdp=True), "FSDP"),
    ):
        with pytest.raises(ConfigError, match=f"DPSCallback: {word} shard"):
            DPSCallback().on_train_begin(sharded, state, None, model=tiny_bert())
    with pytest.raises(ConfigError, match="DPSCallback.variant"):
        DPSCallback(variant="sparse")
    with pytest.raises(ConfigError, match="DPSCallback.update_ratio"):
        DPSCallback().on_train_begin(SimpleNamespace(), SimpleNamespace(global_step=0, max_steps=10), None, model=tiny_bert())
    with pytest.raises(ConfigError, match="DPSCallback.patterns"):
        DPSCallback(patterns=["nosuch"]).on_train_begin(SimpleNamespace(), state, None, model=tiny_bert())


# ------------------------------------------------------------------------------ DPS: resume
@pytest.mark.e2e
@pytest.mark.parametrize("variant", ["dense", "mix"])
def test_dps_resumed_from_a_trainer_checkpoint_ends_bit_identical(tmp_path, variant):
    """The callback's state travels with ``checkpoint-<step>/``: ``train(resume_from_checkpoint=...)``
    continues DPS's phases, and the run ends equal to an uninterrupted one (parameters, masks)."""
    data, steps = Rows(n=BATCH * 12), 12

    def trainer(out, **kw):
        cb = DPSCallback(p=0.3, update_ratio=0.25, variant=variant, seed=5)
        tr = Trainer(
            model=tiny_bert(),
            args=args(
                tmp_path, output_dir=str(out), max_steps=steps, save_strategy="steps", save_steps=5, max_grad_norm=0.0, **kw
            ),
            train_dataset=data,
            callbacks=[cb],
        )
        return tr, cb

    full, full_cb = trainer(tmp_path / "full")
    full.train()
    first, _ = trainer(tmp_path / "resumed")
    first.train()  # saves checkpoint-5 and -10 on the way; resume from checkpoint-5 below
    assert (tmp_path / "resumed" / "checkpoint-5" / DPSCallback.STATE_FILE).is_file()
    resumed, cb = trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-5"))
    assert cb.masked_step == steps and cb.dps.state_dict()["begun_step"] == steps
    pairs = list(zip(masks_of(cb.dps), masks_of(full_cb.dps)))
    assert any(a is not None for a, _ in pairs)
    assert all((a is None and b is None) or (a is not None and b is not None and torch.equal(a, b)) for a, b in pairs)
    for (name, p), q in zip(resumed.model.named_parameters(), full.model.parameters()):
        assert torch.equal(p, q), name


def test_dps_resume_without_its_state_is_an_error(tmp_path):
    data = Rows(n=BATCH * 8)
    tr = Trainer(model=tiny_bert(), args=args(tmp_path, max_steps=8, save_strategy="steps", save_steps=4), train_dataset=data)
    tr.train()  # a checkpoint written without the callback
    cb = DPSCallback(update_ratio=0.25)
    tr = Trainer(
        model=tiny_bert(),
        args=args(tmp_path, max_steps=8, save_strategy="steps", save_steps=4),
        train_dataset=data,
        callbacks=[cb],
    )
    with pytest.raises(ConfigError, match="resumes at step 4 but .*adaptune_dps.pt does not exist"):
        tr.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-4"))


# ------------------------------------------------------------------------------ SageTrainer
def test_sage_trainer_reads_training_arguments_and_optim_args(tmp_path):
    """``learning_rate=3e-4`` and ``optim_args="beta3=0.8,base=adamw"`` reach the optimizer, and it
    trains exactly as make_sage_optimizer with those values in a hand loop."""
    from adaptune.schedules.integrations.hf import SageTrainer

    data = Rows()
    targs = args(
        tmp_path, learning_rate=3e-4, weight_decay=0.05, adam_beta2=0.98, adam_epsilon=1e-6, optim_args="beta3=0.8,base=adamw"
    )
    trainer = SageTrainer(model=tiny_bert(), args=targs, train_dataset=data)
    trainer.train()
    opt = trainer.optimizer.optimizer
    assert type(opt) is AdamWSAGE
    assert opt.defaults["lr"] == 3e-4 and opt.defaults["beta3"] == 0.8 and opt.defaults["betas"] == (0.9, 0.98)
    assert opt.defaults["eps"] == 1e-6
    assert sorted({g["weight_decay"] for g in opt.param_groups}) == [0.0, 0.05]

    ref = tiny_bert()
    ref.train()
    hand = make_sage_optimizer(ref, base="adamw", lr=3e-4, beta3=0.8, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.05)
    hand_loop(ref, data, hand, steps=N // BATCH)
    for (name, p), q in zip(trainer.model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7, msg=name)


def test_sage_trainer_builds_groups_from_the_model_of_each_model_init_run(tmp_path):
    """As ``hyperparameter_search`` runs it: ``model_init`` makes a new model per trial and the
    trial sets ``args.learning_rate``; each run's optimizer holds that model's parameters and lr."""
    from adaptune.schedules.integrations.hf import SageTrainer

    seeds = iter(range(10))
    trainer = SageTrainer(model_init=lambda *_: tiny_bert(next(seeds)), args=args(tmp_path), train_dataset=Rows())
    for lr in (1e-3, 5e-4):
        trainer.args.learning_rate = lr
        trainer.optimizer, trainer.lr_scheduler = None, None
        trainer.train()
        params = {id(p) for p in trainer.model.parameters()}
        held = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
        assert held == params and trainer.optimizer.optimizer.defaults["lr"] == lr


@pytest.mark.parametrize(
    "optim_args,message",
    [
        ("beta4=0.8", "'beta4=0.8' is not one of SageTrainer's settings (beta3=..., base=..., bias_correction=..., family=...)"),
        ("beta3=high", "beta3=high is not a float"),
        ("bias_correction=true", "bias_correction applies to base=adamw only"),
    ],
)
def test_sage_trainer_bad_optim_args_are_one_line_errors(tmp_path, optim_args, message):
    from adaptune.schedules.integrations.hf import SageTrainer

    trainer = SageTrainer(model=tiny_bert(), args=args(tmp_path, optim_args=optim_args), train_dataset=Rows())
    with pytest.raises(ConfigError) as err:
        trainer.train()
    assert str(err.value) == f"optim_args: {message}"


@pytest.mark.e2e
def test_sage_trainer_under_hyperparameter_search(tmp_path):
    """Trainer.hyperparameter_search (Optuna) over the lr: every trial's SAGE optimizer holds the
    trial's lr and the trial's fresh model."""
    pytest.importorskip("optuna")
    from adaptune.schedules.integrations.hf import SageTrainer

    seen = []

    class Recording(SageTrainer):
        def create_optimizer(self, model=None):
            opt = super().create_optimizer(model)
            seen.append(
                (
                    opt.defaults["lr"],
                    {id(p) for g in opt.param_groups for p in g["params"]},
                    {id(p) for p in self.model.parameters()},
                )
            )
            return opt

    trainer = Recording(model_init=lambda *_: tiny_bert(), args=args(tmp_path), train_dataset=Rows(), eval_dataset=Rows(n=8))
    best = trainer.hyperparameter_search(
        direction="minimize",
        backend="optuna",
        n_trials=2,
        hp_space=lambda trial: {"learning_rate": trial.suggest_float("learning_rate", 1e-4, 1e-2, log=True)},
    )
    assert len(seen) == 2 and seen[0][0] != seen[1][0]
    assert all(held == params for _, held, params in seen)
    assert best.hyperparameters["learning_rate"] in (seen[0][0], seen[1][0])
