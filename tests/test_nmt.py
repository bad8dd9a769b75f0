"""task=nmt: fairseq as a library through the shared loop; data paths, resume, errors, Hydra isolation.

The training data is a synthetic parallel corpus the tests write: a deterministic word-for-word
mapping between two invented vocabularies, so that a tiny Transformer learns it in a few hundred
updates and BLEU must rise well above zero.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

# Not pytest.importorskip("fairseq"): a bare `import fairseq` fills Hydra's ConfigStore, which breaks
# composing conf/config.yaml ("Error merging 'config' with schema"); the task imports it through
# adaptune.tasks.nmt_data.import_fairseq, which cleans up after it.
for _module in ("fairseq", "sentencepiece", "sacrebleu"):
    if importlib.util.find_spec(_module) is None:
        pytest.skip(f"{_module} is not installed (make setup installs the NMT extras)", allow_module_level=True)

from conftest import FAST, REPO, compose  # noqa: E402
from adaptune.runner import checkpoint as ckpt  # noqa: E402
from adaptune.runner.evaluation import evaluate  # noqa: E402
from adaptune.runner.loop import Interrupted, Trainer, run  # noqa: E402
from adaptune.common.errors import ConfigError  # noqa: E402
from adaptune.tasks import build_task  # noqa: E402
from adaptune.tasks import nmt_data  # noqa: E402

TINY_MODEL = [
    "task.model.encoder_embed_dim=64",
    "task.model.decoder_embed_dim=64",
    "task.model.encoder_ffn_embed_dim=128",
    "task.model.decoder_ffn_embed_dim=128",
    "task.model.encoder_layers=2",
    "task.model.decoder_layers=2",
    "task.model.encoder_attention_heads=2",
    "task.model.decoder_attention_heads=2",
    "task.model.dropout=0.1",
]

_CONS, _VOW = "bdfgklmnprstvz", "aeiou"


def write_synthetic(directory: Path, n_train=2000, n_valid=100, n_test=100, seed=0, vocab=40, src="de", tgt="en") -> Path:
    """train/valid/test.<src>/.<tgt>: random sentences and their word-by-word translations."""
    rng = random.Random(seed)

    def words(n):
        out = set()
        while len(out) < n:
            out.add("".join(rng.choice(_CONS) + rng.choice(_VOW) for _ in range(rng.randint(1, 2))))
        return sorted(out)

    source, target = words(vocab), words(vocab)
    rng.shuffle(target)
    mapping = dict(zip(source, target))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("valid", n_valid), ("test", n_test)):
        s_lines, t_lines = [], []
        for _ in range(n):
            sent = [rng.choice(source) for _ in range(rng.randint(3, 9))]
            s_lines.append(" ".join(sent).capitalize() + ".")
            t_lines.append(" ".join(mapping[w] for w in sent).capitalize() + ".")
        (directory / f"{split}.{src}").write_text("\n".join(s_lines) + "\n", encoding="utf-8")
        (directory / f"{split}.{tgt}").write_text("\n".join(t_lines) + "\n", encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("nmt") / "raw")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("nmt_cache")


def nmt_overrides(data_dir, cache_dir, *extra):
    return [
        "task=nmt",
        "task.data=raw",
        f"task.data_dir={data_dir}",
        f"task.cache_dir={cache_dir}",
        "task.subword.vocab_size=100",
        "task.max_tokens=1024",
        *TINY_MODEL,
        *FAST,
        "trainer.num_threads=1",
        "trainer.max_grad_norm=null",
        "schedule.lr_schedule=inverse_sqrt",
        "schedule.betas=[0.9,0.98]",
        *extra,
    ]


def task_cfg(**over):
    """The composed ``task`` section of task=nmt with the tiny model, as the loop hands it over."""
    cfg = OmegaConf.to_container(compose(["task=nmt"]).task, resolve=True)
    cfg["model"].update({k.split(".")[-1]: int(v) if v.isdigit() else float(v) for k, v in (o.split("=") for o in TINY_MODEL)})
    cfg.update(over)
    return cfg


# ------------------------------------------------------------------------------ training
@pytest.mark.e2e
def test_synthetic_corpus_trains_and_test_bleu_rises(synth, cache, tmp_path):
    results = run(
        compose(
            nmt_overrides(
                synth, cache, "schedule.lr=3e-3", "schedule.warmup_steps=50", "trainer.max_steps=300", "trainer.eval_every=100"
            )
        ),
        tmp_path / "run",
    )
    assert results["status"] == "completed" and results["steps"] == 300
    assert results["main_metric"] == "bleu" and results["greater_is_better"] is True
    bleus = [e["bleu"] for e in results["evals"]]
    assert bleus[0] < bleus[-1], bleus
    assert results["test"]["bleu"] > 25, results["test"]
    assert results["test"]["bleu_sentences"] == 100
    assert results["final"]["nll_loss"] < results["final"]["loss"]  # label smoothing adds to the loss
    summary = results["task_summary"]
    assert summary["data"] == "raw" and summary["train_sentences"] == 2000


@pytest.mark.e2e
def test_resume_after_interrupt_is_bit_identical(synth, cache, tmp_path, monkeypatch):
    over = nmt_overrides(
        synth,
        cache,
        "trainer.max_steps=10",
        "trainer.eval_every=5",
        "trainer.save_every=2",
        "task.eval_bleu=false",
        "schedule.lr=1e-3",
        "schedule.warmup_steps=4",
        "trainer.grad_accum_steps=2",
    )
    full = run(compose(over), tmp_path / "full")
    assert full["main_metric"] == "loss" and full["greater_is_better"] is False

    original = Trainer._train_step

    def interrupting(self, step, *args, **kwargs):
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, step, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_train_step", interrupting)
    with pytest.raises(Interrupted):
        run(compose(over), tmp_path / "cut")
    monkeypatch.setattr(Trainer, "_train_step", original)
    assert ckpt.load(tmp_path / "cut" / "checkpoints" / "last.pt")["state"]["step"] == 4

    resumed = run(compose(over + ["resume=true"]), tmp_path / "cut")
    a = ckpt.load(tmp_path / "full" / "checkpoints" / "last.pt")["model"]
    b = ckpt.load(tmp_path / "cut" / "checkpoints" / "last.pt")["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed["final"] == full["final"]
    assert resumed["train_loss"] == full["train_loss"]


def test_train_batches_are_deterministic_token_batches(synth, cache):
    task = build_task(
        task_cfg(data="raw", data_dir=str(synth), cache_dir=str(cache), subword={"vocab_size": 100}, max_tokens=512),
        Path("unused"),
        seed=3,
    )
    task.setup()
    e0, e0_again, e1 = task.train_batches(0), task.train_batches(0), task.train_batches(1)
    assert [b.tolist() for b in e0] == [b.tolist() for b in e0_again]
    assert [b.tolist() for b in e0] != [b.tolist() for b in e1]
    assert sorted(i for b in e0 for i in b.tolist()) == list(range(2000))  # every pair once per epoch
    batch = task.make_batch(e0[0])
    assert batch["net_input"]["src_tokens"].numel() <= 512 and batch["target"].numel() <= 512
    torch.manual_seed(0)
    out = task.loss(task.build_model(), batch)
    assert out.sample_size == batch["ntokens"] and out.n_samples == len(e0[0])
    assert torch.isfinite(out.loss_sum) and out.loss_sum.ndim == 0


# ------------------------------------------------------------------------------ data paths
def test_raw_path_binarises_into_a_reused_fairseq_preprocess_style_cache(synth, cache):
    cfg = task_cfg(data="raw", data_dir=str(synth), cache_dir=str(cache), subword={"vocab_size": 100})
    task = build_task(cfg, Path("unused"), seed=1)
    task.setup()
    d = task.data_dir
    assert d.parent == cache
    for name in (
        "dict.de.txt",
        "dict.en.txt",
        "spm.model",
        "train.de-en.de.bin",
        "train.de-en.en.idx",
        "valid.de-en.en.bin",
        "test.de-en.de.idx",
        "test.raw.en",
        "meta.json",
    ):
        assert (d / name).is_file(), name
    mtime = (d / "meta.json").stat().st_mtime_ns
    again = build_task(cfg, Path("unused"), seed=1)
    again.setup()
    assert again.data_dir == d and (d / "meta.json").stat().st_mtime_ns == mtime
    assert task.refs["test"][0] == (synth / "test.en").read_text().splitlines()[0]
    # the pieces decode back to the original text
    first = task.tgt_dict.string(task.datasets["dev"].tgt[0], "sentencepiece")
    assert first == (synth / "valid.en").read_text().splitlines()[0]


@pytest.mark.e2e
def test_binarized_path_reads_fairseq_preprocess_output(tmp_path):
    text = tmp_path / "tok"
    text.mkdir()
    lines = {"train": 40, "valid": 6, "test": 5}
    rng = random.Random(0)
    vocab_de, vocab_en = "ein zwei drei vier fünf sechs".split(), "one two three four five six".split()
    for split, n in lines.items():
        idx = [[rng.randrange(6) for _ in range(rng.randint(2, 6))] for _ in range(n)]
        (text / f"{split}.de").write_text("\n".join(" ".join(vocab_de[i] for i in s) for s in idx) + "\n")
        (text / f"{split}.en").write_text("\n".join(" ".join(vocab_en[i] for i in s) + " ." for s in idx) + "\n")
    dest = tmp_path / "data-bin"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fairseq_cli.preprocess",
            "--source-lang",
            "de",
            "--target-lang",
            "en",
            "--trainpref",
            str(text / "train"),
            "--validpref",
            str(text / "valid"),
            "--testpref",
            str(text / "test"),
            "--destdir",
            str(dest),
            "--workers",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    task = build_task(
        task_cfg(data="binarized", data_dir=str(dest), bpe="none", eval_bleu_max_sentences=3), Path("unused"), seed=1
    )
    task.setup()
    assert {k: len(v) for k, v in task.datasets.items()} == {"train": 40, "dev": 6, "test": 5}
    assert task.tgt_dict.string(task.datasets["test"].tgt[0]) == (text / "test.en").read_text().splitlines()[0]
    torch.manual_seed(0)
    model = task.build_model()
    metrics = evaluate(task, model, "dev")
    assert {"loss", "nll_loss", "ppl", "bleu", "bleu_tok"} <= set(metrics)
    assert metrics["bleu_sentences"] == 3


def _ding(path: Path) -> Path:
    path.write_text(
        textwrap.dedent("""\
        # Version :: test
        Haus {n} | Das Haus ist sehr groß. | Häuser {pl} :: house | The house is very big. | houses
        gehen {vi} | Wir gehen heute nach Hause. :: to go | We are going home today.
        Katze {f} [zool.] | Die Katze schläft auf dem Sofa. :: cat | The cat is sleeping on the sofa.
        kurz | Das ist kurz. :: short | That is short.
        Auto | Er fährt ein rotes Auto (schnell). :: car | He drives a red car.
        """),
        encoding="utf-8",
    )
    return path


def test_demo_corpus_extraction_and_split(tmp_path):
    pairs = nmt_data.parse_trans_de_en(_ding(tmp_path / "de-en"))
    assert pairs == sorted(
        [
            ("Das Haus ist sehr groß.", "The house is very big."),
            ("Wir gehen heute nach Hause.", "We are going home today."),
            ("Die Katze schläft auf dem Sofa.", "The cat is sleeping on the sofa."),
            ("Er fährt ein rotes Auto.", "He drives a red car."),
        ]
    )

    def where(parts):
        return {pair: split for split, (src, tgt) in parts.items() for pair in zip(src, tgt)}

    parts = nmt_data.split_demo(pairs)
    assert set(where(parts)) == set(pairs)
    assert where(parts) == where(nmt_data.split_demo(list(reversed(pairs))))  # a pair's split is its own


@pytest.mark.skipif(not Path(nmt_data.DEMO_PATH).is_file(), reason="apt-get install trans-de-en")
def test_real_demo_corpus_has_thousands_of_pairs():
    pairs = nmt_data.parse_trans_de_en(nmt_data.DEMO_PATH)
    assert len(pairs) > 10000
    parts = nmt_data.split_demo(pairs)
    assert len(parts["train"][0]) > 10 * len(parts["test"][0]) > 0 and len(parts["valid"][0]) > 0


# ------------------------------------------------------------------------------ errors
def test_mismatched_line_counts_are_a_clear_error(tmp_path, cache):
    data = write_synthetic(tmp_path / "bad", n_train=20, n_valid=5, n_test=5)
    lines = (data / "train.en").read_text().splitlines()
    (data / "train.en").write_text("\n".join(lines[:-1]) + "\n")
    task = build_task(task_cfg(data="raw", data_dir=str(data), cache_dir=str(cache)), Path("unused"), seed=1)
    with pytest.raises(ConfigError, match=r"train\.de has 20 lines but train\.en has 19"):
        task.setup()


@pytest.mark.parametrize(
    "over, needle",
    [
        ({"data": "binarized", "data_dir": None}, "task.data_dir is not set; NMT data options: task.data=binarized"),
        ({"data": "binarized", "data_dir": "/nonexistent/nmt"}, "task.data=demo"),
        ({"data": "raw", "data_dir": None}, "task.data=raw needs task.data_dir"),
        ({"data": "demo", "demo_path": "/nonexistent/de-en"}, "apt-get install trans-de-en"),
        ({"data": "webdataset"}, "task.data='webdataset' is unknown; allowed: binarized, raw, demo"),
    ],
)
def test_missing_or_bad_data_settings_name_the_options(over, needle, cache):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.").replace("(", r"\(")) as err:
        build_task(task_cfg(cache_dir=str(cache), **over), Path("unused"), seed=1).setup()
    assert "\n" not in str(err.value)


def test_unknown_model_option_and_arch_are_config_errors(synth, cache):
    base = dict(data="raw", data_dir=str(synth), cache_dir=str(cache), subword={"vocab_size": 100})
    task = build_task(task_cfg(**base, arch="lstm_wiseman_iwslt_de_en"), Path("unused"), seed=1)
    task.setup()
    with pytest.raises(ConfigError, match="task.arch='lstm_wiseman_iwslt_de_en' is unknown; allowed: .*transformer_iwslt_de_en"):
        task.build_model()
    cfg = task_cfg(**base)
    cfg["model"] = dict(cfg["model"], encoder_layerz=2)
    task = build_task(cfg, Path("unused"), seed=1)
    task.setup()
    with pytest.raises(ConfigError, match="task.model.encoder_layerz is not an option"):
        task.build_model()


# ------------------------------------------------------------------------------ fairseq isolation
def test_fairseq_import_leaves_logging_and_hydra_composition_alone():
    from hydra.errors import MissingConfigException

    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    before = {t: compose([f"task={t}"]) for t in ("glue", "nmt")}
    nmt_data.import_fairseq()
    assert root.level == level and root.handlers == handlers
    for t, cfg in before.items():
        assert compose([f"task={t}"]) == cfg
    assert before["nmt"].task.kind == "nmt" and before["glue"].task.kind == "glue"
    with pytest.raises(MissingConfigException):  # fairseq's ConfigStore entry was removed
        compose(["task=translation"])


_SWEEP_APP = """
import json, sys
from pathlib import Path
import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf
from adaptune.runner.app import CONFIG_DIR

@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg):
    if cfg.task.kind == "nmt":  # what the NMT task does when its job runs
        from adaptune.tasks.nmt_data import import_fairseq
        import_fairseq()
    out = Path({out!r}) / f"job{{HydraConfig.get().job.num}}.json"
    out.write_text(json.dumps(OmegaConf.to_container(cfg, resolve=True)))

main()
"""


@pytest.mark.e2e
def test_multirun_sweeping_glue_and_nmt_composes_each_job(tmp_path):
    """One process runs the jobs in turn; fairseq, imported by an nmt job, must not change later jobs."""
    app = tmp_path / "app.py"
    app.write_text(_SWEEP_APP.format(repo=str(REPO), out=str(tmp_path)))
    proc = subprocess.run(
        [
            sys.executable,
            str(app),
            "-m",
            "task=glue,nmt,glue",
            "schedule=baseline,sage",
            "logger=none",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = [json.loads((tmp_path / f"job{i}.json").read_text()) for i in range(6)]
    for job in jobs:
        expected = compose([f"task={job['task']['kind']}", f"schedule={job['schedule']['name']}", "logger=none"])
        assert job == OmegaConf.to_container(expected, resolve=True)
    assert [(j["task"]["kind"], j["schedule"]["name"]) for j in jobs] == [
        (t, s) for t in ("glue", "nmt", "glue") for s in ("baseline", "sage")
    ]
    assert jobs[4]["schedule"]["optimizer"] == "adamw"  # ours, not fairseq's optimizer config


# ------------------------------------------------------------------------------ schedules
def test_sage_and_dps_default_patterns_pick_attention_and_ffn_linears(synth, cache):
    from adaptune.schedules.patterns import matches

    task = build_task(
        task_cfg(data="raw", data_dir=str(synth), cache_dir=str(cache), subword={"vocab_size": 100}), Path("unused"), seed=1
    )
    task.setup()
    model = task.build_model()
    linear = {
        f"{m}.{p}"
        for m, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear)
        for p, _ in mod.named_parameters(recurse=False)
    }
    wanted = {n for n in linear if any(k in n for k in ("self_attn.", "encoder_attn.", ".fc1.", ".fc2."))}
    # SAGE flags every tensor whose name matches (weights and biases): no LayerNorm, no embedding
    chosen = {n for n, _ in model.named_parameters() if matches(n, task.param_patterns(model)["sage"])}
    assert chosen == wanted, sorted(chosen ^ wanted)[:6]
    # DPS masks the matching 2-D weights
    matrices = {n for n, p in model.named_parameters() if p.ndim == 2}
    chosen = {n for n in matrices if matches(n, task.param_patterns(model)["dps"])}
    assert chosen == wanted & matrices, sorted(chosen ^ (wanted & matrices))[:6]


@pytest.mark.parametrize(
    "schedule, extra",
    [("sage", []), ("dps", ["schedule.update_ratio=0.25"]), ("dps", ["schedule.update_ratio=0.25", "schedule.variant=mix"])],
)
def test_sage_and_dps_train_the_nmt_model_unchanged(schedule, extra, synth, cache, tmp_path):
    results = run(
        compose(
            nmt_overrides(
                synth,
                cache,
                f"schedule={schedule}",
                *extra,
                "trainer.max_steps=8",
                "task.eval_bleu=false",
                "schedule.lr=1e-3",
                "schedule.warmup_steps=2",
            )
        ),
        tmp_path / schedule,
    )
    assert results["steps"] == 8 and results["final"]["loss"] < 10


def test_presets_compose():
    paper = compose(["experiment=nmt_iwslt14"])
    assert paper.task.kind == "nmt" and paper.task.arch == "transformer_iwslt_de_en"
    assert paper.schedule.lr_schedule == "inverse_sqrt" and paper.schedule.warmup_steps == 4000
    assert list(paper.schedule.betas) == [0.9, 0.98] and paper.task.max_tokens == 4096
    assert paper.task.label_smoothing == 0.1 and paper.task.model.dropout == 0.3 and paper.task.beam == 5
    sage = compose(["experiment=nmt_iwslt14_sage"])
    assert sage.schedule.name == "sage" and sage.schedule.base == "adamw" and sage.task == paper.task
    demo = compose(["experiment=nmt_demo_cpu"])
    assert demo.name == "nmt_demo_cpu" and demo.task.data == "demo"
