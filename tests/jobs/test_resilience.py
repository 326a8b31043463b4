"""Interrupted jobs: SIGTERM stops a job cleanly, SIGKILL leftovers are removed by the next write, the log tells."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from layerscope.jobs.io import atomic_dir, atomic_path, remove_stale_temporaries, write_json

# a GPU job (simulated device) that writes one output and stops half-way through it
JOB = textwrap.dedent("""
    import sys, time, types
    from layerscope.jobs.io import atomic_path
    from layerscope.jobs.runtime import job

    log_file, target = sys.argv[1], sys.argv[2]
    with job(types.SimpleNamespace(log=[log_file], threads=1, rule="writer"), gpu=True):
        with atomic_path(target) as tmp:
            tmp.write_text("half of it")
            print("half-way", flush=True)
            time.sleep(120)
            tmp.write_text("all of it")
""")


def start_job(tmp_path):
    env = {**os.environ, "LAYERSCOPE_SIMULATED_GPUS": "1", "LAYERSCOPE_LEASE_DIR": str(tmp_path / "leases")}
    env.pop("SLURM_JOB_ID", None)
    log_file, target = tmp_path / "job.log", tmp_path / "out" / "result.txt"
    proc = subprocess.Popen([sys.executable, "-c", JOB, str(log_file), str(target)], env=env)
    deadline = time.monotonic() + 60
    while not (log_file.is_file() and "half-way" in log_file.read_text()):
        assert proc.poll() is None, f"the job ended early ({proc.returncode}):\n{log_file.read_text()}"
        assert time.monotonic() < deadline, "the job never got half-way"
        time.sleep(0.05)
    return proc, log_file, target


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_sigterm_stops_a_job_cleanly(tmp_path):
    """scancel and Snakemake send SIGTERM: no temporary remains, the lease is released, the log says why."""
    proc, log_file, target = start_job(tmp_path)
    assert len(leftovers(target.parent)) == 1  # the temporary being written
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert not target.exists() and leftovers(target.parent) == []
    text = log_file.read_text()
    assert "leased GPU sim0 (simulated)" in text
    assert "received SIGTERM: stopping the job" in text
    assert "released GPU sim0 (simulated)" in text
    assert "done in" not in text
    assert f"pid {proc.pid} on " in text


def test_a_killed_jobs_temporary_is_removed_by_the_next_write(tmp_path):
    proc, log_file, target = start_job(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    stale = leftovers(target.parent)
    assert len(stale) == 1 and stale[0].startswith(".result.txt.") and not target.exists()
    assert "released GPU" not in log_file.read_text()  # it died holding the device
    # a neighbour's temporary and look-alikes are not touched
    (target.parent / ".other.txt.abcdefgh.tmp.txt").write_text("x")
    (target.parent / ".result.txt.notes").write_text("x")
    with atomic_path(target) as tmp:
        tmp.write_text("all of it")
    assert target.read_text() == "all of it"
    assert leftovers(target.parent) == [".other.txt.abcdefgh.tmp.txt", ".result.txt.notes"]


def test_stale_temporary_folders_are_removed_too(tmp_path):
    target = tmp_path / "models" / "tiny"
    stale = tmp_path / "models" / ".tiny.x1y2z3w4.tmp"
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "weights.bin").write_bytes(b"0")
    with atomic_dir(target) as tmp:
        (tmp / "config.json").write_text("{}")
    assert not stale.exists() and (target / "config.json").is_file()
    assert sorted(p.name for p in target.parent.iterdir()) == ["tiny"]


def test_remove_stale_temporaries_matches_only_its_target(tmp_path):
    for name in (".a.json.12345678.tmp.json", ".a.json.1234567.tmp.json", ".ab.json.12345678.tmp.json",
                 ".a.json.12345678.tmp.parquet", "a.json"):
        (tmp_path / name).write_text("x")
    removed = remove_stale_temporaries(tmp_path / "a.json")
    assert [p.name for p in removed] == [".a.json.12345678.tmp.json"]
    assert remove_stale_temporaries(tmp_path / "missing" / "a.json") == []
    write_json(tmp_path / "a.json", {"x": 1})
    assert (tmp_path / "a.json").read_text().strip().startswith("{")


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_an_exception_leaves_no_temporary(tmp_path, exc):
    target = tmp_path / "r.json"
    with pytest.raises(exc):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise exc("boom")
    assert list(tmp_path.iterdir()) == []
