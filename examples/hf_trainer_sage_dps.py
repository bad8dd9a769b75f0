"""SAGE and DPS in the Hugging Face Trainer (optionally on LoRA adapters): a tiny random BERT on
generated data, CPU, seconds.

    python examples/hf_trainer_sage_dps.py            # Adamax-SAGE + DPS-Dense, full fine-tuning
    python examples/hf_trainer_sage_dps.py --lora     # the same on LoRA adapters (peft)
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

from adaptune.schedules.integrations.hf import DPSCallback, SageTrainer


class Parity(torch.utils.data.Dataset):
    """Label: parity of the first token."""

    def __init__(self, n: int = 256):
        self.ids = torch.randint(1, 64, (n, 12), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i, 0] % 2}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters (peft) + the head only")
    parser.add_argument("--variant", default="dense", choices=["dense", "mix"])
    opts = parser.parse_args(argv)

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
    if opts.lora:
        import peft

        model = peft.get_peft_model(
            model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
        )  # keeps the classifier trainable
    with tempfile.TemporaryDirectory() as out:
        # SAGE's lr, decay, betas and eps are the TrainingArguments'; its own settings are optim_args
        args = TrainingArguments(
            output_dir=out,
            use_cpu=True,
            report_to=[],
            save_strategy="no",
            max_steps=40,
            per_device_train_batch_size=8,
            gradient_accumulation_steps=2,
            max_grad_norm=1.0,
            lr_scheduler_type="linear",
            warmup_steps=4,
            logging_steps=10,
            disable_tqdm=True,
            learning_rate=5e-3 if opts.lora else 2e-3,
            weight_decay=0.01,
            adam_epsilon=1e-6,
            optim_args="beta3=0.75,base=adamax",
        )
        trainer = SageTrainer(
            model=model, args=args, train_dataset=Parity(), callbacks=[DPSCallback(p=0.3, update_ratio=0.1, variant=opts.variant)]
        )
        result = trainer.train()
    print(f"trained {result.global_step} steps, final train loss {result.training_loss:.3f}")
    return result.metrics


if __name__ == "__main__":
    main()
