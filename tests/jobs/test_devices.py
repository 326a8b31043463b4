"""GPU leasing: concurrent jobs get distinct devices, a job waits when all are taken, a crash frees its device."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from layerscope.jobs.devices import lease_device


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
         "import time; from layerscope.jobs.devices import lease_device\n"
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


@pytest.fixture
def cuda_build(monkeypatch):
    """Pretend torch was built with CUDA and that every visible device works (the CPU CI has no GPU)."""
    from layerscope.jobs import devices

    monkeypatch.setattr(devices, "torch_has_gpu_support", lambda: True)
    monkeypatch.setattr(devices, "_cuda_device", lambda index: torch.device(f"cuda:{index}"))
    monkeypatch.delenv("LAYERSCOPE_SIMULATED_GPUS", raising=False)


def test_slurm_allocations_are_trusted_without_locks(monkeypatch, tmp_path, cuda_build):
    monkeypatch.setenv("LAYERSCOPE_LEASE_DIR", str(tmp_path))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    lease = lease_device()
    assert lease.name == "3" and lease.lock_file is None and lease.device == torch.device("cuda:0")
    assert list(tmp_path.iterdir()) == []
    # a second job step of the same allocation gets the same GPU (the scheduler's choice)
    assert lease_device().name == "3"


def test_a_multi_gpu_slurm_allocation_is_leased_per_job(monkeypatch, tmp_path, cuda_build):
    """`snakemake --resources gpu=2` inside a 2-GPU allocation: its jobs must not share a GPU."""
    monkeypatch.setenv("LAYERSCOPE_LEASE_DIR", str(tmp_path))
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    leases = []
    for _ in range(2):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # each job process starts with the allocation's set
        leases.append(lease_device(timeout_s=1))
        assert os.environ["CUDA_VISIBLE_DEVICES"] == leases[-1].name  # narrowed to the leased device
    assert sorted(lease.name for lease in leases) == ["0", "1"]
    assert all(lease.lock_file.parent == tmp_path / "slurm-job-42" for lease in leases)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(TimeoutError):
        lease_device(timeout_s=0.3)
    # another allocation on the same node numbers its own GPUs 0,1 too: not blocked by job 42's locks
    monkeypatch.setenv("SLURM_JOB_ID", "43")
    other = lease_device(timeout_s=1)
    assert other.name == "0" and other.lock_file.parent == tmp_path / "slurm-job-43"
    for lease in [*leases, other]:
        lease.release()


def test_visible_gpus_without_a_gpu_torch_build_fall_back_to_cpu(monkeypatch, tmp_path, caplog):
    """A scheduler may hand a CPU-only torch a GPU (a GPU partition, a CPU build): run on the CPU, not crash."""
    from layerscope.jobs import devices

    monkeypatch.setattr(devices, "torch_has_gpu_support", lambda: False)
    monkeypatch.delenv("LAYERSCOPE_SIMULATED_GPUS", raising=False)
    monkeypatch.setenv("LAYERSCOPE_LEASE_DIR", str(tmp_path))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    for slurm in (None, "42"):
        if slurm:
            monkeypatch.setenv("SLURM_JOB_ID", slurm)
        else:
            monkeypatch.delenv("SLURM_JOB_ID", raising=False)
        caplog.clear()
        with caplog.at_level("INFO", logger="layerscope.jobs.devices"):
            lease = lease_device()
        assert lease.device == torch.device("cpu") and lease.name == "cpu"
        assert "has no GPU support: running on the CPU" in caplog.text
    assert list(tmp_path.iterdir()) == []


def test_a_leased_gpu_that_cuda_cannot_use_is_given_back(monkeypatch, tmp_path, cuda_build):
    from layerscope.jobs import devices

    monkeypatch.setattr(devices, "_cuda_device", lambda index: None)  # e.g. no driver on this node
    monkeypatch.setenv("LAYERSCOPE_LEASE_DIR", str(tmp_path))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    lease = lease_device(timeout_s=1)
    assert lease.device == torch.device("cpu") and lease.name == "cpu"
    monkeypatch.setattr(devices, "_cuda_device", lambda index: torch.device(f"cuda:{index}"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    again = lease_device(timeout_s=1)  # the lock was released: the device is free
    assert again.name == "0"
    again.release()


def test_leases_and_releases_are_logged(two_gpus, caplog):
    with caplog.at_level("INFO", logger="layerscope.jobs.devices"):
        lease = lease_device()
        lease.release()
        lease.release()  # idempotent
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0].startswith(f"leased GPU {lease.name} (simulated) after ")
    assert messages[1].startswith(f"released GPU {lease.name} (simulated) (held ")
    assert len(messages) == 2
