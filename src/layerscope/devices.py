"""Giving each concurrent GPU job its own device.

Snakemake's ``--resources gpu=N`` caps how many GPU jobs run at once but does not tell a
job *which* GPU is its own. :func:`lease_device` takes an exclusive lock on one device's
lock file (``fcntl.flock``: the kernel drops it when the process dies, so a crashed job
never keeps its device) and restricts the process to that device through
``CUDA_VISIBLE_DEVICES`` before CUDA is initialised. When every device is taken the call
waits. Without a GPU the job runs on the CPU.

Under SLURM the scheduler already gave the job its GPUs (``CUDA_VISIBLE_DEVICES``), so no
lock is taken there. ``LAYERSCOPE_SIMULATED_GPUS=N`` simulates N devices on a CPU machine
(the lease is real, the computation stays on the CPU): this is how the leasing is tested.
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


def candidate_devices() -> tuple[list[str], bool]:
    """Identifiers of the GPUs this process may use, and whether they are simulated."""
    simulated = os.environ.get(SIMULATED_ENV)
    if simulated:
        try:
            count = int(simulated)
        except ValueError:
            raise ValueError(f"{SIMULATED_ENV} must be an integer, got {simulated!r}") from None
        return [f"sim{i}" for i in range(count)], True
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        # "-1" or an empty string hide every GPU
        return ([] if not ids or ids[0] == "-1" else ids), False
    import torch

    if torch.version.cuda is None and not getattr(torch.version, "hip", None):
        return [], False
    return [str(i) for i in range(torch.cuda.device_count())], False


@dataclass
class Lease:
    """A device held by this process until :meth:`release` (or process exit)."""

    device: Any  # torch.device
    name: str  # "cpu", a CUDA_VISIBLE_DEVICES entry, or "simN"
    simulated: bool = False
    lock_file: Path | None = None
    waited_s: float = 0.0
    _handle: object = field(default=None, repr=False)

    def release(self) -> None:
        if self._handle is not None:
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


def lease_device(
    *,
    want_gpu: bool = True,
    lease_dir: str | Path | None = None,
    timeout_s: float | None = None,
    poll_s: float = 0.2,
) -> Lease:
    """Lease one GPU (waiting while all are taken) or fall back to the CPU."""
    import torch

    if not want_gpu:
        return Lease(torch.device("cpu"), "cpu")
    devices, simulated = candidate_devices()
    if not devices:
        log.info("no GPU visible: running on the CPU")
        return Lease(torch.device("cpu"), "cpu")
    if os.environ.get("SLURM_JOB_ID") and not simulated:
        log.info("SLURM job %s: using its allocated GPU(s) %s", os.environ["SLURM_JOB_ID"], devices)
        return Lease(torch.device("cuda:0"), devices[0])

    lease_dir = Path(lease_dir) if lease_dir else default_lease_dir()
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
            if simulated:
                device = torch.device("cpu")
            else:
                if torch.cuda.is_initialized():
                    # too late to narrow the visible set: address the device by its index
                    device = torch.device(f"cuda:{devices.index(name)}")
                else:
                    os.environ["CUDA_VISIBLE_DEVICES"] = name
                    device = torch.device("cuda:0")
            log.info("leased GPU %s%s after %.1fs (lock %s)", name, " (simulated)" if simulated else "", waited, path)
            return Lease(device, name, simulated, path, waited, handle)
        if not announced:
            log.info("all %d GPU(s) are leased by other jobs; waiting", len(devices))
            announced = True
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            raise TimeoutError(f"no GPU became free within {timeout_s:.0f}s (devices {devices}, locks in {lease_dir})")
        time.sleep(poll_s)
