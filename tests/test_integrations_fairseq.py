"""The fairseq ``--user-dir`` plug-in: ``fairseq-train --optimizer adam_sage`` / ``adamax_sage``
trains a tiny Transformer for a few updates on a generated, binarised corpus."""

from __future__ import annotations

import importlib.util
import os
import random
import re
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import pytest

# Not pytest.importorskip("fairseq"): importing fairseq fills Hydra's ConfigStore (its "config"
# node would replace ours for every later test in this process); the plug-in runs in subprocesses.
if importlib.util.find_spec("fairseq") is None:
    pytest.skip("fairseq is not installed", allow_module_level=True)

REPO = Path(__file__).resolve().parent.parent
PLUGIN = Path(str(files("adaptune.schedules.integrations") / "fairseq_user_dir" / "adaptune_fairseq"))
BIN = Path(sys.executable).parent
WORDS = "the cat dog bird house tree car road river town city park".split()
GERMAN = dict(zip(WORDS, "die katze hund vogel haus baum auto strasse fluss stadt stadt park".split()))


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def data_bin(tmp_path_factory):
    root = tmp_path_factory.mktemp("fairseq")
    rng = random.Random(0)
    for split, n in (("train", 64), ("valid", 8)):
        en, de = [], []
        for _ in range(n):
            words = [rng.choice(WORDS) for _ in range(rng.randint(3, 7))]
            en.append(" ".join(words))
            de.append(" ".join(GERMAN[w] for w in words))
        (root / f"{split}.de").write_text("\n".join(de) + "\n")
        (root / f"{split}.en").write_text("\n".join(en) + "\n")
    out = subprocess.run(
        [
            str(BIN / "fairseq-preprocess"),
            "--source-lang",
            "de",
            "--target-lang",
            "en",
            "--trainpref",
            str(root / "train"),
            "--validpref",
            str(root / "valid"),
            "--destdir",
            str(root / "bin"),
            "--workers",
            "1",
        ],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return root / "bin"


def _train(data_bin: Path, save_dir: Path, optimizer: list[str]):
    cmd = [
        str(BIN / "fairseq-train"),
        str(data_bin),
        "--user-dir",
        str(PLUGIN),
        "--arch",
        "transformer",
        "--encoder-layers",
        "1",
        "--decoder-layers",
        "1",
        "--encoder-embed-dim",
        "16",
        "--decoder-embed-dim",
        "16",
        "--encoder-ffn-embed-dim",
        "32",
        "--decoder-ffn-embed-dim",
        "32",
        "--encoder-attention-heads",
        "2",
        "--decoder-attention-heads",
        "2",
        "--dropout",
        "0.0",
        "--max-tokens",
        "256",
        "--max-update",
        "3",
        "--lr",
        "1e-3",
        "--lr-scheduler",
        "fixed",
        "--criterion",
        "cross_entropy",
        "--cpu",
        "--seed",
        "1",
        "--save-dir",
        str(save_dir),
        "--no-epoch-checkpoints",
        "--log-format",
        "simple",
        "--log-interval",
        "1",
        "--num-workers",
        "0",
        "--disable-validation",
        *optimizer,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)


@pytest.mark.slow  # ~45 s wall here (fairseq-preprocess + fairseq-train, each importing fairseq)
@pytest.mark.parametrize(
    "optimizer",
    [
        ["--optimizer", "adam_sage", "--adam-betas", "(0.9, 0.98)", "--beta3", "0.8", "--weight-decay", "0.0001"],
        ["--optimizer", "adamax_sage", "--beta3", "0.7"],
    ],
    ids=["adam_sage", "adamax_sage"],
)
def test_fairseq_train_with_sage_plugin(data_bin, tmp_path, optimizer):
    import torch

    out = _train(data_bin, tmp_path / "ckpt", optimizer)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    assert f"{optimizer[1]}: {'AdamW' if optimizer[1] == 'adam_sage' else 'Adamax'}-SAGE" in log
    # 1 encoder + 1 decoder layer: self_attn (4 linears x w, b) + fc1/fc2 (2 x w, b), and encoder_attn
    match = re.search(r"SAGE groups: (\d+) of (\d+) tensors in SAGE groups", log)
    assert match and int(match.group(1)) == 8 + 4 + 8 + 4 + 8, log[-3000:]
    assert re.search(r"num_updates 3\b", log), log[-3000:]
    losses = [float(x) for x in re.findall(r"\| loss ([0-9.]+)", log)]
    assert losses and all(x == x and x < 100 for x in losses)

    state = torch.load(tmp_path / "ckpt" / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    groups = state["last_optimizer_state"]["param_groups"]
    assert [g["sage"] for g in groups].count(True) >= 1 and [g["sage"] for g in groups].count(False) >= 1
    assert state["optimizer_history"][-1]["optimizer_name"] in ("FairseqAdamSAGE", "FairseqAdamaxSAGE")


@pytest.mark.e2e
def test_runner_does_not_import_fairseq_through_integrations():
    """The runner's import of adaptune.schedules.integrations must not import fairseq (Hydra ConfigStore)."""
    code = "import adaptune.schedules.integrations, adaptune.runner.loop, sys; print('fairseq' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120, env=_env())
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


PLUGIN_UNIT = """
import sys, torch
sys.path.insert(0, sys.argv[1])
import adaptune_fairseq as fp
from fairseq.dataclass.utils import gen_parser_from_dataclass
from omegaconf import OmegaConf
from fairseq.optim import OPTIMIZER_REGISTRY
assert {"adam_sage", "adamax_sage"} <= set(OPTIMIZER_REGISTRY)
model = torch.nn.Module()
model.self_attn = torch.nn.Linear(4, 4)
model.self_attn_layer_norm = torch.nn.LayerNorm(4)
model.fc1 = torch.nn.Linear(4, 4)
model.embed = torch.nn.Embedding(5, 4)
fp.tag_parameter_names(model)
cfg = OmegaConf.structured(fp.AdamSAGEConfig(lr=[1e-3], weight_decay=0.01))
opt = fp.FairseqAdamSAGE(cfg, list(model.parameters()))
groups = [(g["sage"], g["weight_decay"], len(g["params"])) for g in opt.optimizer.param_groups]
assert groups == [(True, 0.01, 2), (True, 0.0, 2), (False, 0.01, 1), (False, 0.0, 2)], groups
assert type(opt.optimizer).__name__ == "AdamWSAGE" and opt.optimizer.defaults["lr"] == 1e-3
try:
    fp.FairseqAdamaxSAGE(OmegaConf.structured(fp.AdamaxSAGEConfig(lr=[1e-3])), [torch.nn.Parameter(torch.ones(3))])
except ValueError as err:
    assert "--fp16 flattens" in str(err), err
else:
    raise AssertionError("an unnamed parameter must be refused")
print("ok")
"""


@pytest.mark.e2e
def test_plugin_registers_and_groups_by_name():
    """In a subprocess (importing fairseq registers Hydra ConfigStore entries)."""
    out = subprocess.run(
        [sys.executable, "-c", PLUGIN_UNIT, str(PLUGIN.parent)], capture_output=True, text=True, cwd=REPO, timeout=300, env=_env()
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
