"""GPU leasing: concurrent jobs get distinct devices, a job waits when all are taken, a crash frees its device."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from layerscope.jobs.devices import lease_device, lease_devices


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


# ---------------------------------------------------------------------------- several devices per job

WORKER = """
import logging, sys, time
from layerscope.jobs.devices import lease_devices
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
count, hold, record = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
lease = lease_devices(count, timeout_s=60, poll_s=0.02)
with open(record, "a") as out:
    out.write(f"start {time.time():.6f} {lease.name}\\n")
    out.flush()
    time.sleep(hold)
    out.write(f"end {time.time():.6f} {lease.name}\\n")
lease.release()
"""


def _spawn(count: int, hold: float, record, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WORKER, str(count), str(hold), str(record)],
                            env=env or os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _spans(record) -> list[tuple[float, float, list[str]]]:
    """(start, end, devices) of each job from its record (written inside its lease: start after the lock, end before)."""
    spans = []
    for path in sorted(record.parent.glob(record.name + "*")):
        lines = [line.split() for line in path.read_text().splitlines()]
        assert [kind for kind, *_ in lines] == ["start", "end"], lines
        spans.append((float(lines[0][1]), float(lines[1][1]), lines[0][2].split(",")))
    return spans


@pytest.fixture
def three_gpus(monkeypatch, tmp_path):
    monkeypatch.setenv("LAYERSCOPE_SIMULATED_GPUS", "3")
    monkeypatch.setenv("LAYERSCOPE_LEASE_DIR", str(tmp_path / "leases"))
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    return tmp_path


@pytest.mark.parametrize("counts", [(2, 1), (2, 2), (2, 2, 1, 1, 2, 3)])
def test_concurrent_multi_gpu_jobs_all_finish_and_never_share_a_device(three_gpus, counts):
    """Real processes on three simulated devices: each gets its count, all finish (no deadlock), no device twice."""
    procs = [_spawn(n, 0.4, three_gpus / f"job{i}.rec") for i, n in enumerate(counts)]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    spans = [_spans(three_gpus / f"job{i}.rec")[0] for i in range(len(counts))]
    assert [len(devices) for *_, devices in spans] == list(counts)
    for i, (s1, e1, d1) in enumerate(spans):
        assert len(set(d1)) == len(d1) and set(d1) <= {"sim0", "sim1", "sim2"}
        for s2, e2, d2 in spans[i + 1:]:
            if set(d1) & set(d2):
                assert e1 <= s2 or e2 <= s1, f"{d1} and {d2} held at once: {spans}"
    if counts == (2, 1):  # they fit together: neither waited for the other
        (s1, e1, _), (s2, e2, _) = spans
        assert s1 < e2 and s2 < e1, spans


def test_a_waiting_multi_gpu_job_holds_nothing(three_gpus):
    """While a two-GPU job waits (one device free), the free device stays free: a one-GPU job gets it at once."""
    first = lease_devices(2)
    assert first.names == ["sim0", "sim1"] and first.devices == [torch.device("cpu")] * 2
    assert len(first.lock_files) == 2
    waiter = _spawn(2, 0.1, three_gpus / "waiter.rec")
    try:
        waiting = waiter.stderr.readline()  # the waiter has found only sim2 free
        assert "fewer than 2 of the 3 GPU(s) are free; waiting (holding none)" in waiting, waiting
        single = lease_devices(1, timeout_s=2)
        assert single.name == "sim2"
        with pytest.raises(TimeoutError, match="2 GPUs did not become free together"):
            lease_devices(2, timeout_s=0.3)
        first.release()
        out, err = waiter.communicate(timeout=60)
        assert waiter.returncode == 0, err
        assert _spans(three_gpus / "waiter.rec")[0][2] == ["sim0", "sim1"]
        single.release()
    finally:
        waiter.kill()
        first.release()


def test_a_killed_multi_gpu_job_frees_all_its_devices(three_gpus):
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import time; from layerscope.jobs.devices import lease_devices\n"
         "l = lease_devices(2); print(l.name, flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        assert holder.stdout.readline().split() == ["sim0,sim1"]
        with pytest.raises(TimeoutError):
            lease_devices(2, timeout_s=0.3)
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        start = time.monotonic()
        lease = lease_devices(3, timeout_s=10)
        assert time.monotonic() - start < 5 and lease.names == ["sim0", "sim1", "sim2"]
        lease.release()
    finally:
        holder.kill()


def test_more_gpus_than_visible_leases_all_of_them(three_gpus, caplog):
    with caplog.at_level("WARNING", logger="layerscope.jobs.devices"):
        lease = lease_devices(5, timeout_s=1)
    assert lease.names == ["sim0", "sim1", "sim2"]
    assert "asks for 5 GPUs but only 3 are visible" in caplog.text
    lease.release()


def test_a_multi_gpu_lease_narrows_cuda_visible_devices(monkeypatch, tmp_path, cuda_build):
    monkeypatch.setenv("LAYERSCOPE_LEASE_DIR", str(tmp_path))
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    lease = lease_devices(2, timeout_s=1)
    assert lease.name == "4,5" and os.environ["CUDA_VISIBLE_DEVICES"] == "4,5"
    assert lease.devices == [torch.device("cuda:0"), torch.device("cuda:1")] and lease.device == torch.device("cuda:0")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")  # the next job process starts with the machine's set
    other = lease_devices(1, timeout_s=1)
    assert other.name == "6" and os.environ["CUDA_VISIBLE_DEVICES"] == "6"
    # under SLURM, an allocation of exactly the job's GPUs is leased per SLURM job (never trusted blindly)
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    slurm = lease_devices(2, timeout_s=1)
    assert slurm.name == "0,1" and slurm.lock_files[0].parent == tmp_path / "slurm-job-7"
    for held in (lease, other, slurm):
        held.release()


def test_a_job_leases_as_many_gpus_as_its_rule_requests(three_gpus, caplog):
    """runtime.job reads `resources: gpu=N` (a model's gpus) from the Snakemake object."""
    from types import SimpleNamespace

    from layerscope.jobs.runtime import job, requested_gpus

    assert requested_gpus(None) == 1 and requested_gpus(SimpleNamespace(resources={})) == 1
    rule = SimpleNamespace(log=[], threads=1, rule="extract_activations", resources={"gpu": 2})
    with job(rule, gpu=True) as ctx:
        assert ctx.lease.names == ["sim0", "sim1"]
        single = lease_devices(1, timeout_s=1)
        assert single.name == "sim2"
        single.release()
    again = lease_devices(3, timeout_s=1)  # the job released both
    again.release()
