"""One GPU per parallel job (runner/devices.py), with a fake device count: job k takes GPU
k mod n when free, else any free GPU, and waits when every GPU is taken."""

from __future__ import annotations

import os
import threading
import time

import torch

from adaptune.runner import devices


def _hold(directory, index):
    import fcntl

    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / f"gpu{index}.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def test_jobs_take_their_own_gpu_and_queue_when_all_are_taken(tmp_path):
    first, fd0 = devices.acquire_gpu(2, preferred=0, directory=tmp_path)
    second, fd1 = devices.acquire_gpu(2, preferred=2, directory=tmp_path)  # job 2 prefers GPU 0, taken
    assert (first, second) == (0, 1)
    got = []
    waiter = threading.Thread(target=lambda: got.append(devices.acquire_gpu(2, 4, directory=tmp_path, poll=0.02)))
    waiter.start()
    time.sleep(0.3)
    assert not got  # a third job waits: no GPU is shared
    os.close(fd1)  # job on GPU 1 ends (kill -9 releases the lock the same way)
    waiter.join(timeout=10)
    assert got and got[0][0] == 1
    os.close(fd0)
    os.close(got[0][1])


def test_job_device_assigns_only_index_less_cuda_in_a_multirun(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTUNE_GPU_LOCK_DIR", str(tmp_path))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    device, fd = devices.job_device(torch.device("cuda"), job_num=5)
    assert device == torch.device("cuda:1") and fd is not None
    os.close(fd)
    for dev, num in ((torch.device("cuda"), None), (torch.device("cuda:3"), 5), (torch.device("cpu"), 5)):
        assert devices.job_device(dev, num) == (dev, None)
    monkeypatch.setenv("LOCAL_RANK", "1")  # a DDP rank: torchrun placed it
    assert devices.job_device(torch.device("cuda"), 5) == (torch.device("cuda"), None)
