"""Giving each concurrent GPU job its own device.

Snakemake's ``--resources gpu=N`` caps how many GPU jobs run at once but does not tell a
job *which* GPU is its own. :func:`lease_device` takes an exclusive lock on one device's
lock file (``fcntl.flock``: the kernel drops it when the process dies, so a crashed job
never keeps its device) and restricts the process to that device through
``CUDA_VISIBLE_DEVICES`` before CUDA is initialised. When every device is taken the call
waits. Without a GPU (or with a torch build that has no GPU support) the job runs on the CPU.

A job of a model with ``gpus: N`` leases N devices at once (:func:`lease_devices`), all or none:
it takes the machine-wide allocation lock (``alloc.lock`` beside the device locks), tries the
free devices in a fixed order without blocking, and keeps them only if it got N; otherwise it
lets go of every one it took, drops the allocation lock and tries again a moment later. A job
therefore never holds some devices while it waits for others, so two jobs that each want two of
three GPUs cannot deadlock (one runs, the other waits with nothing held), and since devices are
picked only under the allocation lock, two such jobs cannot keep taking one device each and
retrying forever. ``CUDA_VISIBLE_DEVICES`` becomes the N leased devices (the job's ``cuda:0`` …
``cuda:N-1``). A job killed at any point frees all of its devices (and the allocation lock, if
it died picking): the kernel drops every flock of a dead process. A machine with fewer devices
than asked for gives the job all of them, with a warning.

Under SLURM the scheduler already gave the job its GPU(s) through ``CUDA_VISIBLE_DEVICES``:
a job with one GPU uses it without a lock; a job whose allocation holds several GPUs (an
``salloc`` session running ``snakemake --resources gpu=N`` inside it) leases among them with
locks kept per SLURM job, since two jobs on one node may both see their own GPU as ``0``.
``LAYERSCOPE_SIMULATED_GPUS=N`` simulates N devices on a CPU machine (the lease is real, the
computation stays on the CPU): this is how the leasing is tested.

Every lease and release is logged with a timestamp, one line per device (``leased GPU sim1 …``,
``released GPU sim1 …``), so the job logs show which job held which device when.
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


ALLOCATION_LOCK = "alloc.lock"


class _DeviceLock:
    """One held device: its name and its lock file (None: the scheduler's own, not locked)."""

    def __init__(self, name: str, path: Path | None = None, handle=None):
        self.name, self.path, self.handle = name, path, handle


@dataclass
class Lease:
    """The device(s) held by this process until :meth:`release` (or process exit).

    ``name`` is one entry of ``CUDA_VISIBLE_DEVICES`` (or "simN", or "cpu") for a one-device lease and
    the comma-joined entries for several; ``names`` lists them; ``device`` is the first (``cuda:0``),
    ``devices`` all of them, in the job's own numbering.
    """

    device: Any  # torch.device
    name: str  # "cpu", a CUDA_VISIBLE_DEVICES entry (entries, comma-joined), or "simN"
    simulated: bool = False
    lock_file: Path | None = None  # the first device's lock file
    waited_s: float = 0.0
    _handle: object = field(default=None, repr=False)
    _since: float = field(default_factory=time.monotonic, repr=False)
    devices: list = field(default_factory=list)
    _locks: list = field(default_factory=list, repr=False)

    def __post_init__(self):
        if not self.devices:
            self.devices = [self.device]
        if self._handle is not None and not self._locks:
            self._locks = [_DeviceLock(self.name, self.lock_file, self._handle)]
            self._handle = None

    @property
    def names(self) -> list[str]:
        return self.name.split(",")

    @property
    def lock_files(self) -> list[Path]:
        return [lock.path for lock in self._locks if lock.path is not None]

    def release(self) -> None:
        for lock in self._locks:
            if lock.handle is None:
                continue
            # logged before unlocking: in the logs, a device's next lease never precedes its release
            log.info("released GPU %s%s (held %.1fs, lock %s)", lock.name, " (simulated)" if self.simulated else "",
                     time.monotonic() - self._since, lock.path)
            fcntl.flock(lock.handle, fcntl.LOCK_UN)
            lock.handle.close()
            lock.handle = None

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _try_lock(path: Path, *, note: bool = True):
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    if note:
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
    return handle


def _unlock(handle) -> None:
    fcntl.flock(handle, fcntl.LOCK_UN)
    handle.close()


def _pick(lease_dir: Path, devices: list[str], count: int) -> list[_DeviceLock] | None:
    """``count`` free devices, locked, or None with nothing held: all or none (see module docstring)."""
    with open(lease_dir / ALLOCATION_LOCK, "a+") as alloc:
        fcntl.flock(alloc, fcntl.LOCK_EX)  # held for a few non-blocking tries only
        try:
            taken: list[_DeviceLock] = []
            for name in devices:  # a fixed order: the lowest free devices
                path = lease_dir / f"gpu-{name}.lock"
                handle = _try_lock(path)
                if handle is not None:
                    taken.append(_DeviceLock(name, path, handle))
                    if len(taken) == count:
                        return taken
            for lock in taken:  # not enough: hold nothing while waiting
                _unlock(lock.handle)
            return None
        finally:
            fcntl.flock(alloc, fcntl.LOCK_UN)


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
    return lease_devices(1, want_gpu=want_gpu, lease_dir=lease_dir, timeout_s=timeout_s, poll_s=poll_s)


def lease_devices(
    count: int = 1,
    *,
    want_gpu: bool = True,
    lease_dir: str | Path | None = None,
    timeout_s: float | None = None,
    poll_s: float = 0.2,
) -> Lease:
    """Lease ``count`` GPUs at once, all or none (waiting while fewer are free), or fall back to the CPU."""
    import torch

    cpu = torch.device("cpu")
    count = int(count)
    if count < 1:
        raise ValueError(f"a lease needs at least one device, got {count}")
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
    if count > len(devices):
        log.warning("this job asks for %d GPUs but only %d are visible (%s): leasing all %d", count, len(devices),
                    ",".join(devices), len(devices))
        count = len(devices)
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
        locks = _pick(lease_dir, devices, count)
        if locks is not None:
            break
        if not announced:
            if count == 1:
                log.info("all %d GPU(s) are leased by other jobs; waiting", len(devices))
            else:
                log.info("fewer than %d of the %d GPU(s) are free; waiting (holding none)", count, len(devices))
            announced = True
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            raise TimeoutError(f"no GPU became free within {timeout_s:.0f}s (devices {devices}, locks in {lease_dir})"
                               if count == 1 else
                               f"{count} GPUs did not become free together within {timeout_s:.0f}s "
                               f"(devices {devices}, locks in {lease_dir})")
        time.sleep(poll_s)

    waited = time.monotonic() - start
    names = [lock.name for lock in locks]
    lease = Lease(cpu, ",".join(names), simulated, locks[0].path, waited, devices=[cpu] * len(names), _locks=locks)
    if not simulated:
        if torch.cuda.is_initialized():
            # too late to narrow the visible set: address the devices by their indices
            cuda = [_cuda_device(devices.index(name)) for name in names]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(names)
            cuda = [_cuda_device(i) for i in range(len(names))]
        if any(device is None for device in cuda):
            lease.release()
            log.warning("GPU %s was leased but CUDA is not usable in this process: running on the CPU", lease.name)
            return Lease(cpu, "cpu")
        lease.device, lease.devices = cuda[0], cuda
    for lock in locks:
        log.info("leased GPU %s%s after %.1fs (lock %s)", lock.name, " (simulated)" if simulated else "", waited,
                 lock.path)
    return lease
