"""GPU leasing: concurrent jobs get distinct devices, a job waits when all are taken, a crash frees its device."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from layerscope.devices import lease_device


@pytest.fixture
def two_gpus(monkeypatch, tmp_path):
    monkeypatch.setenv("LAYERSCOPE_SIMULATED_GPUS", "2")
    monkeypatch.setenv("LAYERSCOPE_LEASE_DIR", str(tmp_path))
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    return tmp_path


def test_distinct_devices_then_wait_then_reuse(two_gpus):
    first = lease_device()
    second = lease_device()
    assert {first.name, second.name} == {"sim0", "sim1"}
    assert first.device == torch.device("cpu") and first.simulated
    with pytest.raises(TimeoutError, match="no GPU became free"):
        lease_device(timeout_s=0.3)
    first.release()
    third = lease_device(timeout_s=5)
    assert third.name == first.name
    second.release()
    third.release()


def test_a_killed_job_releases_its_device(two_gpus):
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import time; from layerscope.devices import lease_device\n"
         "l1 = lease_device(); l2 = lease_device(); print(l1.name, l2.name, flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        assert holder.stdout.readline().split() == ["sim0", "sim1"]
        with pytest.raises(TimeoutError):
            lease_device(timeout_s=0.3)
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        start = time.monotonic()
        lease = lease_device(timeout_s=10)
        assert time.monotonic() - start < 5
        lease.release()
    finally:
        holder.kill()


def test_no_gpu_means_cpu(monkeypatch):
    monkeypatch.delenv("LAYERSCOPE_SIMULATED_GPUS", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    lease = lease_device()
    assert lease.device == torch.device("cpu") and lease.name == "cpu"
    assert lease_device(want_gpu=False).name == "cpu"


def test_slurm_allocations_are_trusted_without_locks(monkeypatch, tmp_path):
    monkeypatch.delenv("LAYERSCOPE_SIMULATED_GPUS", raising=False)
    monkeypatch.setenv("LAYERSCOPE_LEASE_DIR", str(tmp_path))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    lease = lease_device()
    assert lease.name == "3" and lease.lock_file is None and lease.device == torch.device("cuda:0")
    assert list(tmp_path.iterdir()) == []
