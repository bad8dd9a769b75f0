"""Driver of ``tests/test_integrations_ddp.py``: the integrations on a tiny random BERT, run as one
process (``python``) or as DDP ranks (``torchrun --nproc_per_node=2``, CPU, gloo), with the same
global batch either way (``GLOBAL_BATCH`` examples per micro-batch, split over the ranks).

    python tests/ddp_integration_driver.py OUT SCENARIO [SCENARIO ...]

Each rank writes ``OUT/<scenario>.rank<r>.pt``: its final parameters (plain ``state_dict`` keys),
per optimizer step the gradients right before ``optimizer.step()`` and DPS's masks / Mix draws, the
final DPS state and the optimizer state.

Scenarios: ``hf_dense`` / ``hf_mix`` (``DPSCallback`` in ``transformers.Trainer``, its default
AdamW), ``hf_sage`` (Adamax-SAGE through ``optimizer_cls_and_kwargs``), ``acc_dense`` (``AccelerateDPS``,
AdamW) and ``acc_mix_sage`` (``AccelerateDPS`` Mix with ``make_sage_optimizer``). The accelerate
scenarios then call ``accelerate.utils.set_seed(0, device_specific=True)`` (a different global seed
on every rank, as accelerate offers) and perturb the weights of ranks > 0: ``accelerator.prepare``
(DDP) broadcasts rank 0's weights.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

VOCAB, LEN = 60, 8
STEPS, ACCUM, GLOBAL_BATCH = 6, 2, 8  # DPS: update_ratio 0.34 -> phases of 2 steps: explore, select, explore
P, UPDATE_RATIO = 0.3, 0.34


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)


class Rows(torch.utils.data.Dataset):
    def __init__(self, n: int = STEPS * ACCUM * GLOBAL_BATCH, seed: int = 1):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (n, LEN), generator=g)
        self.labels = (self.ids[:, 0] % 3).long()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(LEN, dtype=torch.long), "labels": self.labels[i]}


def _clone(ts):
    return [None if t is None else t.detach().clone() for t in ts]


def record_step(model, dps) -> dict:
    """What one rank has right before ``optimizer.step()``."""
    model = getattr(model, "module", model)  # DDP: names without "module."
    rec = {"grads": {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}}
    if dps is not None:
        rec.update(masks=_clone(dps.masks), noise=_clone(dps.noise), kept=dps.kept_fraction())
    return rec


def _plain(state):
    """A state_dict with every tensor cloned (``torch.save`` of plain containers)."""
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, dict):
        return {k: _plain(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return [_plain(v) for v in state]
    return state


def _inner(optimizer):
    while hasattr(optimizer, "optimizer") and isinstance(optimizer.optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


# ------------------------------------------------------------------------------ transformers.Trainer
def run_hf(name: str, out: Path, world: int) -> dict:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from adaptune.schedules.integrations.hf import DPSCallback, sage_optimizer_cls_and_kwargs

    class Recorder(TrainerCallback):
        def __init__(self, dps_cb):
            self.cb, self.steps = dps_cb, []

        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            self.steps.append(record_step(model, self.cb.dps if self.cb else None))

    model = tiny_bert()
    variant = {"hf_dense": "dense", "hf_mix": "mix", "hf_sage": None}[name]
    dps_cb = DPSCallback(p=P, update_ratio=UPDATE_RATIO, variant=variant) if variant else None
    recorder = Recorder(dps_cb)
    extra = {}
    if name == "hf_sage":
        extra["optimizer_cls_and_kwargs"] = sage_optimizer_cls_and_kwargs(model, lr=3e-3, beta3=0.8)
    args = TrainingArguments(
        output_dir=str(out / "trainer" / name),
        use_cpu=True,
        ddp_backend="gloo" if world > 1 else None,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        per_device_train_batch_size=GLOBAL_BATCH // world,
        gradient_accumulation_steps=ACCUM,
        max_steps=STEPS,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        seed=0,
        # BERT's forward takes **kwargs, so the Trainer believes it normalises the loss by the gathered
        # num_items_in_batch and multiplies it by the number of processes; the classification head
        # ignores that count (a plain mean), so the DDP gradient would be world_size times one
        # process's. Off, every rank's loss is the mean of its micro-batch, as in one process.
        average_tokens_across_devices=False,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=Rows(), callbacks=[cb for cb in (dps_cb, recorder) if cb is not None], **extra
    )
    trainer.train()
    return {
        "global_step": trainer.state.global_step,
        "steps": recorder.steps,
        "params": _plain(model.state_dict()),
        "dps": _plain(dps_cb.dps.state_dict()) if dps_cb else None,
        "optimizer": _plain(_inner(trainer.optimizer).state_dict()),
        "ddp": type(trainer.model_wrapped).__name__,
    }


# ------------------------------------------------------------------------------ accelerate
def run_accelerate(name: str, out: Path, world: int) -> dict:
    import accelerate
    from accelerate.state import AcceleratorState

    from adaptune.schedules.integrations.accelerate import AccelerateDPS
    from adaptune.schedules.integrations.hf import make_sage_optimizer

    AcceleratorState._reset_state(reset_partial_state=True)  # a Trainer of this process configured it
    acc = accelerate.Accelerator(gradient_accumulation_steps=ACCUM, cpu=True)
    model = tiny_bert()
    accelerate.utils.set_seed(0, device_specific=True)  # global seed 0 + rank (rank 0: as one process)
    if acc.process_index:  # ranks start from different weights
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
    opt = (
        make_sage_optimizer(model, lr=3e-3, beta3=0.8)
        if name == "acc_mix_sage"
        else torch.optim.AdamW(model.parameters(), lr=3e-3)
    )
    loader = torch.utils.data.DataLoader(Rows(), batch_size=GLOBAL_BATCH // world, shuffle=False)
    if name == "acc_mix_sage":
        AccelerateDPS.prepare_mix(model)  # Mix under DDP: patch before prepare wraps
    model, opt, loader = acc.prepare(model, opt, loader)
    dps = AccelerateDPS(
        acc,
        model,
        total_steps=STEPS,
        p=P,
        update_ratio=UPDATE_RATIO,
        variant="mix" if name == "acc_mix_sage" else "dense",
        optimizer=opt,
    )
    model.train()
    steps = []
    for batch in loader:
        with acc.accumulate(model):
            dps.before_forward()
            acc.backward(model(**batch).loss)
            if dps.clip_grad_norm_(model.parameters(), 1.0) is not None:
                steps.append(record_step(model, dps.dps))
            opt.step()
            opt.zero_grad()
    return {
        "global_step": dps.step,
        "steps": steps,
        "params": _plain(acc.unwrap_model(model).state_dict()),
        "dps": _plain(dps.dps.state_dict()),
        "optimizer": _plain(_inner(opt).state_dict()),
        "ddp": type(model).__name__,
    }


def run_errors(name: str, out: Path, world: int) -> dict:
    """Mix patched after DDP wrapped the model is refused (``None``: no error, as in one process)."""
    import accelerate
    from accelerate.state import AcceleratorState
    from transformers import Trainer, TrainingArguments

    from adaptune.common.errors import ConfigError
    from adaptune.schedules.integrations.accelerate import AccelerateDPS
    from adaptune.schedules.integrations.hf import DPSCallback

    found = {}
    args = TrainingArguments(
        output_dir=str(out / "trainer" / name),
        use_cpu=True,
        ddp_backend="gloo" if world > 1 else None,
        report_to=[],
        save_strategy="no",
        per_device_train_batch_size=GLOBAL_BATCH // world,
        max_steps=STEPS,
        disable_tqdm=True,
    )
    trainer = Trainer(model=tiny_bert(), args=args, train_dataset=Rows())
    trainer.add_callback(DPSCallback(variant="mix", update_ratio=UPDATE_RATIO))  # after __init__: too late
    try:
        trainer.train()
        found["hf"] = None
    except ConfigError as err:
        found["hf"] = str(err)
    AcceleratorState._reset_state(reset_partial_state=True)
    acc = accelerate.Accelerator(cpu=True)
    model = acc.prepare(tiny_bert())
    try:
        AccelerateDPS(acc, model, total_steps=STEPS, update_ratio=UPDATE_RATIO, variant="mix")
        found["acc"] = None
    except ConfigError as err:
        found["acc"] = str(err)
    return found


def main(argv: list[str]) -> None:
    out, scenarios = Path(argv[0]), argv[1:]
    torch.set_num_threads(1)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    for name in scenarios:
        run = run_errors if name == "errors" else run_hf if name.startswith("hf_") else run_accelerate
        result = run(name, out, world)
        result["world"] = world
        torch.save(result, out / f"{name}.rank{rank}.pt")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
