"""DPS (and optionally SAGE) in a plain ``accelerate`` loop: a tiny random BERT on generated data.

    python examples/accelerate_dps.py            # CPU, a few seconds
    python examples/accelerate_dps.py --mix      # DPS-Mix
    accelerate launch examples/accelerate_dps.py # DDP / GPUs, as accelerate is configured

The label is the parity of the first token, so the loss falls within the 40 steps.
"""

from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator
from transformers import BertConfig, BertForSequenceClassification

from adaptune.schedules.integrations.accelerate import AccelerateDPS  # noqa: E402
from adaptune.schedules.integrations.hf import make_sage_optimizer  # noqa: E402


def main(argv=None) -> float:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mix", action="store_true", help="DPS-Mix instead of DPS-Dense")
    parser.add_argument("--sage", action="store_true", help="Adamax-SAGE as the optimizer (with DPS)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--accum", type=int, default=2)
    opts = parser.parse_args(argv)

    accelerator = Accelerator(gradient_accumulation_steps=opts.accum, cpu=not torch.cuda.is_available())
    torch.manual_seed(0)
    model = BertForSequenceClassification(
        BertConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=32,
            num_labels=2,
        )
    )
    ids = torch.randint(1, 64, (opts.steps * opts.accum * 8, 12))
    data = [{"input_ids": ids[i : i + 8], "labels": ids[i : i + 8, 0] % 2} for i in range(0, len(ids), 8)]
    optimizer = make_sage_optimizer(model, lr=2e-3, beta3=0.75) if opts.sage else torch.optim.AdamW(model.parameters(), lr=1e-3)
    if opts.mix:  # DPS-Mix patches the forward; under DDP that must happen before prepare() wraps the model
        AccelerateDPS.prepare_mix(model)
    model, optimizer = accelerator.prepare(model, optimizer)

    dps = AccelerateDPS(
        accelerator,
        model,
        total_steps=opts.steps,
        p=0.3,
        update_ratio=0.1,
        variant="mix" if opts.mix else "dense",
        optimizer=optimizer,
    )
    model.train()
    losses = []
    for batch in data:
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with accelerator.accumulate(model):
            dps.before_forward()
            loss = model(**batch).loss
            accelerator.backward(loss)
            dps.clip_grad_norm_(model.parameters(), 1.0)  # unscale (fp16), DPS mask, then clip
            optimizer.step()
            optimizer.zero_grad()
        losses.append(loss.item())
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    accelerator.print(
        f"{dps.step} optimizer steps ({dps.dps.variant}), kept fraction now {dps.dps.kept_fraction():.2f}, "
        f"loss {first:.3f} -> {last:.3f}"
    )
    return last


if __name__ == "__main__":
    main()
