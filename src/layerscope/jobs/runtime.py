"""The environment of one workflow job: threads, seeds, determinism, logging, device.

Each workflow script wraps its work in :func:`job`::

    with job(snakemake, gpu=True) as ctx:
        extract_activations(..., device=ctx.device)

which sets torch's thread count from the rule's ``threads:``, seeds every generator,
enables deterministic algorithms, sends logging, warnings and library output to the rule's
log file, leases the rule's GPU(s) when it runs a model forward (as many as its ``resources:
gpu=N`` — a model's ``gpus`` — all at once), and turns a
:class:`~layerscope.LayerscopeError` into a one-line message instead of a traceback.
The log records the process id, host, SLURM job and GPU variables, and every GPU lease and
release with a timestamp; SIGTERM stops the job cleanly (temporary files removed).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator

from threadpoolctl import threadpool_limits

from layerscope import LayerscopeError, __version__
from layerscope.jobs.devices import Lease, lease_devices, slurm_gpu_summary

log = logging.getLogger("layerscope")


def set_threads(threads: int) -> None:
    import torch

    threads = max(1, int(threads))
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # can only be set once per process
        torch.set_num_interop_threads(1)
    os.environ["OMP_NUM_THREADS"] = str(threads)


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def make_deterministic() -> None:
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    # float32 matmuls stay float32 (no TF32) so CPU and GPU numbers agree to float32 precision
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def setup_logging(level: int = logging.INFO) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=handlers, force=True
    )
    logging.captureWarnings(True)
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@contextlib.contextmanager
def _redirect_output(log_file: str | None) -> Iterator[int | None]:
    """Send fds 1 and 2 (Python and C-level output, progress bars) to the log file."""
    if not log_file:
        yield None
        return
    os.makedirs(os.path.dirname(log_file) or ".", exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    with open(log_file, "a", buffering=1) as handle:
        os.dup2(handle.fileno(), 1)
        os.dup2(handle.fileno(), 2)
        try:
            yield saved_err
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved_out, 1)
            os.dup2(saved_err, 2)
            os.close(saved_out)
            os.close(saved_err)


@contextlib.contextmanager
def _stop_cleanly_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM (``scancel``, a scheduler's time limit, Snakemake stopping its jobs) into SystemExit.

    Python's default is to die at once; raising instead unwinds the job, so every
    :func:`~layerscope.jobs.io.atomic_path` removes its temporary file and the GPU lease is released
    and logged. (SIGKILL cannot be caught: its leftovers are removed by the next write.)
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        log.warning("received %s: stopping the job", signal.Signals(signum).name)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass
class JobContext:
    device: Any  # torch.device: the first leased device
    lease: Lease  # lease.devices: every leased device (a model with gpus: N)
    threads: int
    seed: int


def requested_gpus(snakemake) -> int:
    """The GPUs a rule asks for (``resources: gpu=N``; 1 when it declares none, e.g. in tests)."""
    resources = getattr(snakemake, "resources", None)
    value = None
    if resources is not None:
        value = resources.get("gpu") if hasattr(resources, "get") else getattr(resources, "gpu", None)
    try:
        return max(1, int(value)) if value is not None else 1
    except (TypeError, ValueError):
        return 1


@contextlib.contextmanager
def job(snakemake=None, *, gpu: bool = False, seed: int | None = None) -> Iterator[JobContext]:
    """Set up and tear down one job (see module docstring). ``snakemake`` may be None in tests."""
    threads = int(getattr(snakemake, "threads", 1) or 1)
    log_files = list(getattr(snakemake, "log", []) or [])
    log_file = str(log_files[0]) if log_files else None
    seed = 0 if seed is None else int(seed)
    with _redirect_output(log_file) as console_fd, _stop_cleanly_on_sigterm():
        setup_logging()
        rule = getattr(snakemake, "rule", "job")
        log.info("layerscope %s, rule %s, %d thread(s), seed %d, pid %d on %s", __version__, rule, threads, seed,
                 os.getpid(), socket.gethostname())
        if os.environ.get("SLURM_JOB_ID"):
            log.info("SLURM job %s on node %s (%s)", os.environ["SLURM_JOB_ID"],
                     os.environ.get("SLURMD_NODENAME", "?"), slurm_gpu_summary())
        uses_torch = gpu or "torch" in sys.modules  # report jobs never import torch: keep them light
        os.environ["OMP_NUM_THREADS"] = str(threads)
        # numpy's BLAS read OMP_NUM_THREADS when numpy was imported, before this line: limit it now
        blas_limit = threadpool_limits(limits=threads)
        if uses_torch:
            set_threads(threads)
            make_deterministic()
            seed_everything(seed)
        else:
            random.seed(seed)
        started = time.monotonic()
        if uses_torch:
            lease = lease_devices(requested_gpus(snakemake), want_gpu=gpu)
        else:
            lease = Lease(device="cpu", name="cpu")
        try:
            yield JobContext(device=lease.device, lease=lease, threads=threads, seed=seed)
        except LayerscopeError as exc:
            log.error("%s", exc)
            if console_fd is not None:
                os.write(console_fd, f"layerscope error in rule {rule}: {exc}\n".encode())
            raise SystemExit(1) from None
        except Exception:
            log.exception("rule %s failed", rule)  # the traceback in the rule's log, not only on the console
            raise
        finally:
            lease.release()
            blas_limit.restore_original_limits()
        log.info("done in %.1fs", time.monotonic() - started)

