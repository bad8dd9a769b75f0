"""Fast checks of bench/gpu_check.sh's plumbing (the benchmarks themselves are not tests): the
script stops at once without CUDA, its generated RTE files read as GLUE data, and the summary of
(c) reads the runner's results.json files."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess

import pytest
import torch
from conftest import REPO


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.e2e
@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the script would run")
def test_gpu_check_without_cuda_stops_at_once(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path)}
    env.pop("GPU_CHECK_DRY", None)
    proc = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 3
    assert "no CUDA device" in proc.stderr
    assert "GPU_CHECK_DRY=1" in (tmp_path / "gpu_check.txt").read_text()


def test_generated_rte_files_are_glue_data_past_128_tokens(tmp_path):
    from adaptune.tasks.glue_data import get_spec, load_glue_dir

    gpu_check = _gpu_check()
    gpu_check.write_rte(tmp_path / "RTE", n_train=10, n_dev=4)
    train, (dev,) = load_glue_dir(get_spec("rte"), tmp_path / "RTE")
    assert len(train) == 10 and len(dev) == 4
    assert {ex.label for ex in train} == {0, 1}
    assert all(len(ex.text_a.split()) + len(ex.text_b.split()) > 128 for ex in train)


def test_summary_reads_results_and_flags_failures(tmp_path, capsys):
    gpu_check = _gpu_check()

    def write(name, schedule, sps, status="completed"):
        run = tmp_path / name
        run.mkdir()
        (run / "results.json").write_text(
            json.dumps(
                {
                    "schedule": schedule,
                    "status": status,
                    "steps": 200,
                    "samples_per_s": sps,
                    "precision": "bf16",
                    "train_loss": [[200, 0.69]],
                    "wall_time_s": 10.0,
                    "train_time_s": 8.0,
                    "config": {"trainer": {"batch_size": 32}},
                }
            )
        )

    write("a", "baseline", 100.0)
    write("b", "sage", 90.0)
    gpu_check.main(["summarize", str(tmp_path)])
    out = capsys.readouterr().out
    assert "2/2 runs completed" in out and "sage/bs32 0.900x" in out
    write("c", "dps", 95.0, status="diverged")
    with pytest.raises(SystemExit):
        gpu_check.main(["summarize", str(tmp_path)])
    assert "FAILED: dps/bs32" in capsys.readouterr().out


def test_gpu_check_script_parses():
    assert subprocess.run(["bash", "-n", str(REPO / "bench" / "gpu_check.sh")], check=False).returncode == 0
