"""Helpers of tests/test_cluster.py: small workflow configs, Snakemake runs under `timeout -s KILL`,
the GPU lease events the jobs log, and comparison of two runs' results."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pandas as pd
import yaml

from tests.helpers import REPO

PROMPTS = {
    "setA": {"prompts": [
        {"id": "a1", "category": "story", "text": "Once upon a time, there was a little girl"},
        {"id": "a2", "category": "story", "text": "The dog ran to the"},
    ]},
    "setB": {"prompts": [
        {"id": "b1", "category": "park", "text": "Tom and Sue went to the park."},
        {"id": "b2", "category": "animals", "text": "A big cat"},
    ]},
}
MAX_NEW_TOKENS = 24


def make_workdir(path: Path, models: dict[str, Path], psets=("setA", "setB")) -> Path:
    """A workflow folder: config.yaml (the given local models, the logit lens only) and prompt files."""
    path.mkdir(parents=True, exist_ok=True)
    for name in psets:
        (path / f"{name}.json").write_text(json.dumps(PROMPTS[name]))
    config = {
        "models": {slug: {"source": {"type": "local", "path": str(folder)}} for slug, folder in models.items()},
        "prompt_sets": {name: {"path": f"{name}.json"} for name in psets},
        "generation": {"max_new_tokens": MAX_NEW_TOKENS, "batch_size": 2},
        "activations": {"batch_size": 2},
        "experiments": {"logit_lens": {"topk": 5, "max_phases": 3}},
    }
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    return path


def snakemake_command(workdir: Path, *args: str, limit_s: int = 600) -> list[str]:
    """The Snakemake CLI on this repository's Snakefile, killed (with all its jobs) after ``limit_s``."""
    return ["timeout", "-s", "KILL", str(limit_s), sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"),
            "-d", str(workdir), "--configfile", str(workdir / "config.yaml"), *args]


def clean_env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("LAYERSCOPE_SIMULATED_GPUS", "LAYERSCOPE_LEASE_DIR", "SLURM_JOB_ID", "SLURM_CONF")}
    env.update(extra or {})
    return env


def run_snakemake(workdir: Path, *args: str, env: dict | None = None, limit_s: int = 600,
                  check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(snakemake_command(workdir, *args, limit_s=limit_s), cwd=workdir, env=clean_env(env),
                            capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({result.returncode}):\n"
                             f"{result.stdout[-4000:]}\n{result.stderr[-8000:]}")
    return result


class Background:
    """A Snakemake run in the background, in its own process group (so it can be killed whole)."""

    def __init__(self, workdir: Path, *args: str, env: dict | None = None, limit_s: int = 600, name: str = "run"):
        self.output = workdir / f"snakemake-{name}.out"
        self._handle = open(self.output, "w")
        self.proc = subprocess.Popen(snakemake_command(workdir, *args, limit_s=limit_s), cwd=workdir,
                                     env=clean_env(env), stdout=self._handle, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._handle.close()

    def kill_all(self) -> None:
        """SIGKILL Snakemake and every job it started (one process group: Snakemake does not detach jobs)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self._handle.close()

    def text(self) -> str:
        return self.output.read_text(errors="replace")


def wait_until(condition, timeout: float, what: str, poll: float = 0.05, proc: Background | None = None):
    """Poll ``condition()`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.proc.poll() is not None:
            raise AssertionError(f"snakemake ended ({proc.proc.returncode}) before {what}:\n{proc.text()[-4000:]}")
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}"
                         + (f":\n{proc.text()[-4000:]}" if proc is not None else ""))


# ---------------------------------------------------------------------------- what the jobs log

_STAMP = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})"
_PID = re.compile(_STAMP + r" INFO layerscope: layerscope \S+, rule (\S+), .* pid (\d+) on (\S+)")
_LEASED = re.compile(_STAMP + r" INFO layerscope\.jobs\.devices: leased GPU (\S+) \(simulated\) after ([\d.]+)s")
_RELEASED = re.compile(_STAMP + r" INFO layerscope\.jobs\.devices: released GPU (\S+) \(simulated\)")
_WAITING = re.compile(_STAMP + r" INFO layerscope\.jobs\.devices: (?:all \d+ GPU\(s\) are leased by other jobs"
                      r"|fewer than \d+ of the \d+ GPU\(s\) are free); waiting")


def stamp(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


@dataclass
class Lease:
    job: str  # the log file, relative to its run's logs folder
    attempt: int  # 0 for the first run of the job, 1 for a re-run that appended to the same log, ...
    device: str
    start: float
    end: float | None  # None: the job died holding it
    waited_s: float
    waiting_logged: bool


@dataclass
class Attempt:
    """One execution of a job as its log tells it."""
    job: str
    attempt: int
    pid: int
    started: float
    leases: list[Lease]
    waiting: bool
    done: bool


def job_attempts(log_file: Path, name: str) -> list[Attempt]:
    attempts: list[Attempt] = []
    for line in log_file.read_text(errors="replace").splitlines():
        if m := _PID.match(line):
            attempts.append(Attempt(name, len(attempts), int(m[3]), stamp(m[1]), [], False, False))
        elif not attempts:
            continue
        elif m := _WAITING.match(line):
            attempts[-1].waiting = True
        elif m := _LEASED.match(line):
            a = attempts[-1]
            a.leases.append(Lease(name, a.attempt, m[2], stamp(m[1]), None, float(m[3]), a.waiting))
        elif m := _RELEASED.match(line):
            open_leases = [lease for lease in attempts[-1].leases if lease.device == m[2] and lease.end is None]
            assert open_leases, f"{log_file}: release of {m[2]} without a lease"
            open_leases[0].end = stamp(m[1])
        elif " INFO layerscope: done in " in line:
            attempts[-1].done = True
    return attempts


def all_attempts(log_root: Path) -> list[Attempt]:
    return [a for f in sorted(log_root.rglob("*.log")) for a in job_attempts(f, str(f.relative_to(log_root)))]


def find_attempt(log_root: Path, predicate) -> Attempt | None:
    if not log_root.is_dir():
        return None
    return next((a for a in all_attempts(log_root) if predicate(a)), None)


# ---------------------------------------------------------------------------- results

def result_files(workdir: Path, models: tuple[str, ...] | None = None,
                 names: tuple[str, ...] | None = None) -> dict[str, Path]:
    """Every data file a run produced (not logs, benchmarks, figures or the HTML pages), or only
    those of some models (``results/{model}/…``) or with some file names."""
    out = {}
    for path in sorted((workdir / "results").rglob("*")):
        rel = path.relative_to(workdir / "results")
        if not path.is_file() or rel.parts[0] in ("logs", "benchmarks"):
            continue
        if path.suffix not in (".parquet", ".json", ".safetensors", ".md"):
            continue
        if models is not None and rel.parts[0] not in models:
            continue
        if names is not None and path.name not in names:
            continue
        out[str(rel)] = path
    return out


def assert_same_results(expected: Path, actual: Path, models: tuple[str, ...] | None = None,
                        names: tuple[str, ...] | None = None) -> int:
    """Both runs wrote the same data files with equal contents (tensors bit for bit); returns the count."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    import torch

    a, b = result_files(expected, models, names), result_files(actual, models, names)
    assert sorted(a) == sorted(b), f"different files: only in reference {sorted(set(a) - set(b))}, " \
                                   f"only in this run {sorted(set(b) - set(a))}"
    for rel in a:
        x, y = a[rel], b[rel]
        if x.suffix == ".parquet":
            pd.testing.assert_frame_equal(pd.read_parquet(x), pd.read_parquet(y), check_exact=True, obj=rel)
        elif x.suffix == ".safetensors":
            tx, ty = load_file(x), load_file(y)
            assert sorted(tx) == sorted(ty), rel
            for key in tx:
                assert torch.equal(tx[key], ty[key]), f"{rel}: {key} differs"
            with safe_open(x, "pt") as fx, safe_open(y, "pt") as fy:
                assert fx.metadata() == fy.metadata(), rel
        elif x.suffix == ".json":
            assert json.loads(x.read_text()) == json.loads(y.read_text()), rel
        else:
            assert x.read_text() == y.read_text(), rel
    return len(a)


def temporaries(workdir: Path) -> list[Path]:
    """Leftover temporary files of atomic writes (".name.XXXXXXXX.tmp…")."""
    return [p for p in workdir.rglob(".*.tmp*") if ".snakemake" not in p.parts]
