"""Shared test helpers: config composition, tiny models and GLUE-format data written by the tests."""

from __future__ import annotations

import os
import tempfile
import random
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# the tokenized-feature cache of the test runs goes to a directory of this session, not ~/.cache
os.environ.setdefault("ADAPTUNE_CACHE", tempfile.mkdtemp(prefix="adaptune-test-cache-"))
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

from hydra import compose as hydra_compose  # noqa: E402
from hydra import initialize_config_dir  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from adaptune.runner.app import CONFIG_DIR  # noqa: E402  (also registers the ${dirname:} resolver)

REPO = Path(__file__).resolve().parent.parent

# A randomly initialised 2-layer BERT with the pip MiniLM's tokenizer (vocabulary) and tiny sizes.
TINY_BERT = [
    "task.model.pretrained=false",
    "task.model.config_overrides={hidden_size:32,num_hidden_layers:2,num_attention_heads:2,"
    "intermediate_size:64,max_position_embeddings:64,hidden_dropout_prob:0.0,"
    "attention_probs_dropout_prob:0.0}",
    "task.max_seq_length=32",
]
FAST = ["logger=none", "trainer.progress=false", "trainer.precision=fp32", "trainer.num_threads=2"]


class InfGrad(torch.autograd.Function):
    """Identity forward, infinite gradient backward: an fp16 overflow on demand."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def compose(overrides: list[str] | tuple = ()) -> DictConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


# ------------------------------------------------------------------------------ GLUE-format data
_WORDS = (
    "the cat dog bird house tree car road river town city park book table chair window door "
    "green blue red small big old new walks runs sits reads sees likes"
).split()


def _sentence(rng: random.Random, marker: str | None, n: int = 6) -> str:
    words = [rng.choice(_WORDS) for _ in range(n)]
    if marker:  # half of the words: a strong signal that a tiny random model picks up fast
        for k in rng.sample(range(n), n // 2):
            words[k] = marker
    return " ".join(words)


def write_glue(directory: Path, task: str, n_train: int = 96, n_dev: int = 48, seed: int = 0) -> Path:
    """Write train.tsv / dev.tsv in the original GLUE format of ``task`` (rte, cola, mrpc, stsb).

    The label is learnable: positive examples contain the word "good" ("yes" in the second
    sentence of pairs); STS-B's score counts the "good"s in the first sentence.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for split, n in (("train", n_train), ("dev", n_dev)):
        rows = []
        for i in range(n):
            pos = i % 2 == 0
            if task == "rte":
                rows.append(
                    f"{i}\t{_sentence(rng, None)}\t{_sentence(rng, 'yes' if pos else 'no')}\t"
                    f"{'entailment' if pos else 'not_entailment'}"
                )
            elif task == "cola":
                rows.append(f"gj04\t{int(pos)}\t{'' if pos else '*'}\t{_sentence(rng, 'good' if pos else 'bad')}")
            elif task == "mrpc":
                rows.append(
                    f"{int(pos)}\t{1000 + i}\t{2000 + i}\t{_sentence(rng, None)}\t{_sentence(rng, 'yes' if pos else 'no')}"
                )
            elif task == "stsb":
                k = i % 4
                s1 = " ".join(["good"] * k + [rng.choice(_WORDS) for _ in range(5 - k)])
                rows.append(
                    f"{i}\tmain-captions\tMSRvid\t2012test\t{i:04d}\tnone\tnone\t{s1}\t{_sentence(rng, None)}\t{float(k):.3f}"
                )
            else:
                raise ValueError(task)
        header = {
            "rte": "index\tsentence1\tsentence2\tlabel",
            "cola": None,
            "mrpc": "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String",
            "stsb": "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
        }[task]
        text = "\n".join(([header] if header else []) + rows) + "\n"
        (directory / f"{split}.tsv").write_text(text)
    return directory


@pytest.fixture
def glue_dir(tmp_path):
    return lambda task, **kw: write_glue(tmp_path / "glue" / task, task, **kw)


def glue_overrides(data_dir: Path, task: str, *extra: str) -> list[str]:
    return ["task=glue", f"task.name={task}", f"task.data_dir={data_dir}", *TINY_BERT, *FAST, *extra]
