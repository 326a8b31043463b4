"""Giving each concurrent GPU job its own device.

Snakemake's ``--resources gpu=N`` caps how many GPU jobs run at once but does not tell a
job *which* GPU is its own. :func:`lease_device` takes an exclusive lock on one device's
lock file (``fcntl.flock``: the kernel drops it when the process dies, so a crashed job
never keeps its device) and restricts the process to that device through
``CUDA_VISIBLE_DEVICES`` before CUDA is initialised. When every device is taken the call
waits. Without a GPU (or with a torch build that has no GPU support) the job runs on the CPU.

Under SLURM the scheduler already gave the job its GPU(s) through ``CUDA_VISIBLE_DEVICES``:
a job with one GPU uses it without a lock; a job whose allocation holds several GPUs (an
``salloc`` session running ``snakemake --resources gpu=N`` inside it) leases among them with
locks kept per SLURM job, since two jobs on one node may both see their own GPU as ``0``.
``LAYERSCOPE_SIMULATED_GPUS=N`` simulates N devices on a CPU machine (the lease is real, the
computation stays on the CPU): this is how the leasing is tested.

Every lease and release is logged with a timestamp (``leased GPU sim1 …``, ``released GPU
sim1 …``), so the job logs show which job held which device when.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SIMULATED_ENV = "LAYERSCOPE_SIMULATED_GPUS"
LEASE_DIR_ENV = "LAYERSCOPE_LEASE_DIR"


def default_lease_dir() -> Path:
    return Path(os.environ.get(LEASE_DIR_ENV) or f"/tmp/layerscope-gpu-leases-{os.getuid()}")


def torch_has_gpu_support() -> bool:
    """Whether this torch build can use a GPU at all (CUDA or ROCm), without initialising CUDA."""
    import torch

    return torch.version.cuda is not None or getattr(torch.version, "hip", None) is not None


def candidate_devices() -> tuple[list[str], bool]:
    """Identifiers of the GPUs this process may use, and whether they are simulated."""
    simulated = os.environ.get(SIMULATED_ENV)
    if simulated:
        try:
            count = int(simulated)
        except ValueError:
            raise ValueError(f"{SIMULATED_ENV} must be an integer, got {simulated!r}") from None
        return [f"sim{i}" for i in range(count)], True
    if not torch_has_gpu_support():
        return [], False
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        # "-1" or an empty string hide every GPU
        return ([] if not ids or ids[0] == "-1" else ids), False
    import torch

    return [str(i) for i in range(torch.cuda.device_count())], False


def slurm_gpu_summary() -> str:
    """What SLURM says about this job's GPUs (for the job log)."""
    keys = ("CUDA_VISIBLE_DEVICES", "SLURM_STEP_GPUS", "SLURM_JOB_GPUS", "SLURM_JOB_PARTITION")
    return ", ".join(f"{k}={os.environ[k]}" for k in keys if k in os.environ) or "no GPU variables"


@dataclass
class Lease:
    """A device held by this process until :meth:`release` (or process exit)."""

    device: Any  # torch.device
    name: str  # "cpu", a CUDA_VISIBLE_DEVICES entry, or "simN"
    simulated: bool = False
    lock_file: Path | None = None
    waited_s: float = 0.0
    _handle: object = field(default=None, repr=False)
    _since: float = field(default_factory=time.monotonic, repr=False)

    def release(self) -> None:
        if self._handle is not None:
            # logged before unlocking: in the logs, a device's next lease never precedes its release
            log.info("released GPU %s%s (held %.1fs, lock %s)", self.name, " (simulated)" if self.simulated else "",
                     time.monotonic() - self._since, self.lock_file)
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _try_lock(path: Path):
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}\n")
    handle.flush()
    return handle


def _cuda_device(index: int):
    """``cuda:index`` if CUDA works in this process, else None (no driver, no device)."""
    import torch

    try:
        available = torch.cuda.is_available() and index < torch.cuda.device_count()
    except Exception as exc:  # a broken driver raises instead of answering False
        log.warning("CUDA is not usable here: %s", exc)
        return None
    return torch.device(f"cuda:{index}") if available else None


def lease_device(
    *,
    want_gpu: bool = True,
    lease_dir: str | Path | None = None,
    timeout_s: float | None = None,
    poll_s: float = 0.2,
) -> Lease:
    """Lease one GPU (waiting while all are taken) or fall back to the CPU."""
    import torch

    cpu = torch.device("cpu")
    if not want_gpu:
        return Lease(cpu, "cpu")
    devices, simulated = candidate_devices()
    slurm_job = os.environ.get("SLURM_JOB_ID")
    if not devices:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible and visible.strip() not in ("", "-1") and not simulated:
            log.warning("GPU(s) %s are visible but this torch build (%s) has no GPU support: running on the CPU",
                        visible, torch.__version__)
        else:
            log.info("no GPU visible: running on the CPU")
        return Lease(cpu, "cpu")
    if slurm_job and not simulated and len(devices) == 1:
        device = _cuda_device(0)
        log.info("SLURM job %s: using its allocated GPU %s (%s)%s", slurm_job, devices[0], slurm_gpu_summary(),
                 "" if device is not None else ", but CUDA is not usable: running on the CPU")
        return Lease(device or cpu, devices[0] if device is not None else "cpu")

    lease_dir = Path(lease_dir) if lease_dir else default_lease_dir()
    if slurm_job and not simulated:
        # the allocation's own GPUs: jobs of other allocations on this node may number theirs alike
        lease_dir = lease_dir / f"slurm-job-{slurm_job}"
    lease_dir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    announced = False
    while True:
        for name in devices:
            path = lease_dir / f"gpu-{name}.lock"
            handle = _try_lock(path)
            if handle is None:
                continue
            waited = time.monotonic() - start
            lease = Lease(cpu, name, simulated, path, waited, handle)
            if not simulated:
                if torch.cuda.is_initialized():
                    # too late to narrow the visible set: address the device by its index
                    device = _cuda_device(devices.index(name))
                else:
                    os.environ["CUDA_VISIBLE_DEVICES"] = name
                    device = _cuda_device(0)
                if device is None:
                    lease.release()
                    log.warning("GPU %s was leased but CUDA is not usable in this process: running on the CPU", name)
                    return Lease(cpu, "cpu")
                lease.device = device
            log.info("leased GPU %s%s after %.1fs (lock %s)", name, " (simulated)" if simulated else "", waited, path)
            return lease
        if not announced:
            log.info("all %d GPU(s) are leased by other jobs; waiting", len(devices))
            announced = True
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            raise TimeoutError(f"no GPU became free within {timeout_s:.0f}s (devices {devices}, locks in {lease_dir})")
        time.sleep(poll_s)
