"""Beyond one machine: GPU jobs sharing a node, runs killed half-way, and the SLURM profile on a real cluster.

Every test runs the real Snakemake CLI (under `timeout -s KILL`) on a small config — stories260K and a
tiny Llama, two prompt sets, the logit lens — and compares what it produced with an uninterrupted local
run of the same config (`reference`).

- Multi-GPU leasing (`gpus: 2` for one model, three simulated devices, `--resources gpu=3`): its jobs lease two
  devices at once beside the other model's one-device jobs; no device has two holders; every job finishes.
- Leasing (`--resources gpu=2`, `LAYERSCOPE_SIMULATED_GPUS=2`): two GPU jobs of another run on the same
  machine hold both devices, so the first two Snakemake GPU jobs wait; one waiting job is killed (-9);
  one holder crashes (-9) and the waiting job takes its device at once; then the other holder goes and
  Snakemake's GPU jobs run two at a time. The lease lines of every log show who held which device when.
- Resilience: a whole run killed (-9) while a job has written some of its outputs leaves nothing that
  Snakemake treats as complete; `--rerun-incomplete` finishes it with the reference's results.
- SLURM (marker `slurm`): tests/slurm_cluster.sh starts a one-node cluster; the run goes through
  `snakemake --profile profiles/slurm`; a GPU job is cancelled (scancel) half-way and the run resumed.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers.cluster import (
    Background, all_attempts, assert_same_results, find_attempt, make_workdir, run_snakemake, temporaries,
    wait_until,
)
from tests.helpers import REPO, save_tiny_model

pytestmark = pytest.mark.slow

LOCAL = ("--cores", "2", "--max-threads", "1")  # the same threads everywhere: results compared bit for bit
GPU_RULES = ("generate_completions", "extract_activations")  # the rules of this config with resources gpu=1


@pytest.fixture(scope="module")
def models(tmp_path_factory, stories_dir):
    root = tmp_path_factory.mktemp("models")
    return {"stories": stories_dir, "tinyllama": save_tiny_model("llama", root / "llama", stories_dir)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, models):
    """An uninterrupted local run, no GPU leasing: the results every other run must reproduce."""
    workdir = make_workdir(tmp_path_factory.mktemp("reference"), models)
    run_snakemake(workdir, *LOCAL)
    return workdir


# ---------------------------------------------------------------------------- GPU leasing on one machine

HOLDER = """
import sys, time, types
from layerscope.jobs.runtime import job
with job(types.SimpleNamespace(log=[sys.argv[1]], threads=1, rule="holder"), gpu=True):
    time.sleep(600)
"""


def start_holder(log_file: Path, env: dict) -> subprocess.Popen:
    """A GPU job of another run on this machine: holds one device until it is killed."""
    return subprocess.Popen([sys.executable, "-c", HOLDER, str(log_file)], env={**os.environ, **env})


def waiting_jobs(logs: Path) -> list:
    return [a for a in all_attempts(logs) if a.waiting and not a.leases]


def test_concurrent_gpu_jobs_share_two_devices_safely(tmp_path, models, reference):
    workdir = make_workdir(tmp_path / "run", models)
    env = {"LAYERSCOPE_SIMULATED_GPUS": "2", "LAYERSCOPE_LEASE_DIR": str(tmp_path / "leases")}
    holder_logs = tmp_path / "holders"
    logs = workdir / "results" / "logs"
    holders = {}
    try:
        for device in ("sim0", "sim1"):  # the first free device is leased: start them in order
            holders[device] = start_holder(holder_logs / f"{device}.log", env)
            wait_until(lambda: find_attempt(holder_logs, lambda a: any(le.device == device for le in a.leases)),
                       60, f"the holder of {device}")

        # the GPU stages only: 4 completions and 4 activation caches, two GPU jobs at a time
        run = Background(workdir, *LOCAL, "--resources", "gpu=2", "--keep-going", "--until", "extract_activations",
                         env=env)
        try:
            # both devices are held: the first two GPU jobs Snakemake starts wait
            victim, survivor = wait_until(lambda: (w := waiting_jobs(logs)) and len(w) == 2 and w, 300,
                                          "two GPU jobs waiting for a device", proc=run)
            # one waiting job killed half-way (-9): Snakemake must not take it as done; it starts another
            os.kill(victim.pid, signal.SIGKILL)
            third = wait_until(lambda: next((a for a in waiting_jobs(logs) if a.job not in (victim.job, survivor.job)),
                                            None), 300, "a third GPU job waiting for a device", proc=run)
            # both holders crash (-9): the kernel drops their locks, the two waiting jobs take the devices
            killed_at = time.time()
            for holder in holders.values():
                holder.kill()
            taken = [wait_until(lambda: find_attempt(logs, lambda a: a.job == job.job and a.leases), 60,
                                f"{job.job} to lease a freed device", proc=run).leases[0] for job in (survivor, third)]
            rc = run.wait(timeout=900)
        except BaseException:
            run.kill_all()
            raise
    finally:
        for holder in holders.values():
            holder.kill()
            holder.wait()
    output = run.text()
    attempts = all_attempts(logs)
    timeline = "\n".join(f"{a.job}: pid {a.pid}, waited={a.waiting}, done={a.done}, leases "
                          f"{[(le.device, round(le.start - killed_at, 2), le.end and round(le.end - killed_at, 2)) for le in a.leases]}"
                          for a in attempts)

    # the freed devices went to the waiting jobs at once, one each
    assert sorted(le.device for le in taken) == ["sim0", "sim1"], timeline
    for lease in taken:
        assert lease.waiting_logged and lease.waited_s > 0
        assert 0 <= lease.start - killed_at < 5, f"a crashed holder's device was not freed at once\n{timeline}"

    # the killed job: failed, no output
    assert rc != 0 and "Error in rule generate_completions" in output, output[-3000:]
    killed = [a for a in attempts if a.job == victim.job]
    assert len(killed) == 1 and not killed[0].leases and not killed[0].done, timeline
    model, pset = Path(victim.job).stem.rsplit("_", 1)
    assert victim.job.startswith("generate_completions/")
    assert not (workdir / "results" / model / pset / "completions.parquet").exists()

    # every lease of every job and holder: a device never has two holders at once
    leases = [le for a in attempts for le in a.leases]
    assert all(le.end is not None for le in leases), f"a finished job left a lease open\n{timeline}"
    taken = [next(le for le in leases if (le.job, le.start) == (t.job, t.start)) for t in taken]  # now with ends
    holder_leases = [le for a in all_attempts(holder_logs) for le in a.leases]
    assert sorted(le.device for le in holder_leases) == ["sim0", "sim1"]
    for le in holder_leases:
        assert le.end is None  # it died holding its device
        le.end = killed_at
    for device in ("sim0", "sim1"):
        spans = sorted((le.start, le.end, le.job) for le in leases + holder_leases if le.device == device)
        for (s1, e1, j1), (s2, e2, j2) in zip(spans, spans[1:]):
            assert s2 >= e1 - 0.002, f"{device} held by {j1} and {j2} at once\n{timeline}"
    # two Snakemake GPU jobs held the two devices at the same time (distinct devices, by the check above)
    a, b = taken
    assert a.start < b.end and b.start < a.end, timeline
    assert len(leases) == 6  # 8 GPU jobs: one killed before its lease, so its extraction never ran
    assert all(le.waited_s < 1 for le in leases if le not in taken), \
        f"with --resources gpu=2 and both devices free, no job should wait for a lease\n{timeline}"

    # both devices are free again: nothing leaked
    check = subprocess.run([sys.executable, "-c", "from layerscope.jobs.devices import lease_device as l; "
                            "a = l(timeout_s=2); b = l(timeout_s=2); print(a.name, b.name)"],
                           env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    assert check.stdout.split() == ["sim0", "sim1"], check.stderr

    # resume: the killed job and what depends on it run; the results are the uninterrupted run's
    resumed = run_snakemake(workdir, *LOCAL, "--resources", "gpu=2", "--rerun-incomplete",
                            "--until", "extract_activations", env=env)
    assert f"wildcards: model={model}, pset={pset}" in resumed.stdout + resumed.stderr
    (rerun,) = [a for a in all_attempts(logs) if a.job == victim.job]  # Snakemake starts a job's log afresh
    assert rerun.done and rerun.pid != victim.pid
    assert assert_same_results(reference, workdir,
                               names=("completions.parquet", "resid.safetensors", "tokens.parquet")) == 12
    assert temporaries(workdir) == []


def test_a_two_gpu_model_leases_two_devices_beside_a_one_gpu_model(tmp_path, models):
    """`gpus: 2` for stories, 1 for the tiny Llama, three simulated devices, `--resources gpu=3`: every GPU job
    of stories leases two devices at once, jobs run side by side, no device has two holders, all finish."""
    workdir = make_workdir(tmp_path / "run", models)
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["models"]["stories"]["gpus"] = 2
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    env = {"LAYERSCOPE_SIMULATED_GPUS": "3", "LAYERSCOPE_LEASE_DIR": str(tmp_path / "leases")}
    planned = run_snakemake(workdir, "-n", "--cores", "3", "--resources", "gpu=3", "--until", "extract_activations")
    requests = dict(re.findall(r"wildcards: model=(\w+), pset=\w+\n(?:\s+\w+: [^\n]*\n)*?"
                               r"\s+resources: [^\n]*?\bgpu=(\d+)", planned.stdout))
    assert requests == {"stories": "2", "tinyllama": "1"}, planned.stdout[-3000:]
    run_snakemake(workdir, "--cores", "3", "--max-threads", "1", "--resources", "gpu=3",
                  "--until", "extract_activations", env=env)
    attempts = [a for a in all_attempts(workdir / "results" / "logs") if a.job.split("/")[0] in GPU_RULES]
    assert len(attempts) == 8 and all(a.done for a in attempts)
    for a in attempts:
        assert len(a.leases) == (2 if "stories" in a.job else 1), a
        assert len({le.device for le in a.leases}) == len(a.leases)
    leases = [le for a in attempts for le in a.leases]
    assert all(le.end is not None for le in leases)
    for device in ("sim0", "sim1", "sim2"):
        spans = sorted((le.start, le.end, le.job) for le in leases if le.device == device)
        for (s1, e1, j1), (s2, e2, j2) in zip(spans, spans[1:]):
            assert s2 >= e1 - 0.002, f"{device} held by {j1} and {j2} at once"
    # a two-GPU job and a one-GPU job held their devices at the same time at least once
    jobs = {a.job: (min(le.start for le in a.leases), max(le.end for le in a.leases)) for a in attempts}
    assert any(s1 < e2 and s2 < e1 for j1, (s1, e1) in jobs.items() if "stories" in j1
               for j2, (s2, e2) in jobs.items() if "tinyllama" in j2), jobs
    assert len(list((workdir / "results").glob("*/*/activations/resid.safetensors"))) == 4


# ---------------------------------------------------------------------------- a whole run killed half-way

def test_a_run_killed_mid_write_leaves_nothing_complete(tmp_path, reference):
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir, symlinks=True)
    for log in (workdir / "results" / "logs").rglob("*.log"):
        log.unlink()
    lens_dirs = sorted((workdir / "results").glob("*/*/logit_lens"))
    assert len(lens_dirs) == 4
    started = time.time()

    def half_written():
        # a lens job writes its tables, then its figures, and summary.json last
        for folder in lens_dirs:
            metrics, summary = folder / "metrics.parquet", folder / "summary.json"
            if metrics.exists() and metrics.stat().st_mtime > started and not summary.exists():
                return folder
        return None

    run = Background(workdir, *LOCAL, "--forcerun", "logit_lens")
    try:
        folder = wait_until(half_written, 300, "a logit_lens job half-way through its outputs", poll=0.01, proc=run)
    finally:
        run.kill_all()  # Snakemake and its jobs, -9: nothing can clean up
    assert (folder / "metrics.parquet").exists() and not (folder / "summary.json").exists()

    # what was written is not taken as complete
    dry = run_snakemake(workdir, "-n", "--cores", "1", check=False)
    text = dry.stdout + dry.stderr
    assert dry.returncode != 0 and "IncompleteFilesException" in text, text[-3000:]
    assert str((folder / "metrics.parquet").relative_to(workdir)) in text

    # the killed Snakemake left its lock on the folder: remove it, then resume
    locked = run_snakemake(workdir, *LOCAL, "--rerun-incomplete", check=False)
    assert locked.returncode != 0 and "LockException" in locked.stdout + locked.stderr
    run_snakemake(workdir, "--unlock", "--cores", "1")
    resumed = run_snakemake(workdir, *LOCAL, "--rerun-incomplete")
    assert "logit_lens" in resumed.stdout + resumed.stderr
    assert assert_same_results(reference, workdir) >= 20
    assert temporaries(workdir) == []  # a figure's temporary of the killed job is cleaned by the rewrite


# ---------------------------------------------------------------------------- a real SLURM cluster

CLUSTER_SCRIPT = REPO / "tests" / "slurm_cluster.sh"


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """A fresh one-node cluster (tests/slurm_cluster.sh), stopped and removed afterwards."""
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        pytest.skip("snakemake-executor-plugin-slurm is not installed (pip install -e '.[slurm]')")
    root = tmp_path_factory.mktemp("slurm") / "cluster"
    start = subprocess.run(["bash", str(CLUSTER_SCRIPT), "start", str(root)], capture_output=True, text=True,
                           timeout=300)
    try:
        if start.returncode == 77:
            pytest.skip(start.stderr.strip().splitlines()[-1])
        assert start.returncode == 0, f"the test cluster did not start:\n{start.stderr[-4000:]}"
        yield {"SLURM_CONF": str(root / "etc" / "slurm.conf"), "PATH": f"{root / 'bin'}:{os.environ['PATH']}",
               "root": root}
    finally:
        subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop", str(root)], capture_output=True, text=True, timeout=120)


def slurm_env(cluster) -> dict:
    return {"SLURM_CONF": cluster["SLURM_CONF"], "PATH": cluster["PATH"]}


def slurm(cluster, *cmd: str) -> str:
    result = subprocess.run(cmd, env={**os.environ, **slurm_env(cluster)}, capture_output=True, text=True,
                            timeout=60, check=True)
    return result.stdout


PROFILE_RUN = (
    "--profile", str(REPO / "profiles" / "slurm"),
    "--slurm-init-seconds-before-status-checks", "1",  # the test's jobs take seconds, not hours
    "--slurm-keep-successful-logs",
    "--max-threads", "1",
    # the GPU rules ask for 16 GB: more than a small CI machine's node has
    *("--set-resources", *(f"{rule}:mem_mb=1500" for rule in GPU_RULES)),
)


def submissions(output: str) -> dict[str, str]:
    """SLURM job id -> rule, from Snakemake's 'Job N has been submitted with SLURM jobid X (log: …/rule_R/…)'."""
    found = re.findall(r"submitted with SLURM jobid (\d+) \(log: \S*/rule_([^/\s]+)/", output)
    return dict(found)


def gpu_requests(output: str) -> dict[str, bool]:
    """Rule -> whether Snakemake gave its jobs resources gpu=1 (from the job blocks it prints)."""
    rules = {}
    for block in re.split(r"\n(?=\[[^\]]+\]\n(?:local)?rule )", output):
        m = re.search(r"^(?:local)?rule (\w+):", block, re.M)
        res = re.search(r"^\s+resources: (.*)$", block, re.M)
        if m and res:
            rules[m[1]] = bool(re.search(r"\bgpu=1\b", res[1]))
    return rules


@pytest.mark.slurm
def test_the_slurm_profile_on_a_real_cluster(tmp_path, slurm_cluster, models, reference):
    workdir = make_workdir(tmp_path / "run", {"stories": models["stories"]})
    env = slurm_env(slurm_cluster)
    logs = workdir / "results" / "logs"
    target_log = "generate_completions/stories_setA.log"

    # 1. through sbatch; one GPU job cancelled half-way (scancel)
    first = Background(workdir, *PROFILE_RUN, env=env, limit_s=900, name="first")
    try:
        def started():
            log = logs / target_log
            return log.is_file() and re.search(r"SLURM job (\d+) on node", log.read_text())

        slurm_job = wait_until(started, 600, "generate_completions (setA) to start on the cluster", poll=0.1,
                               proc=first)[1]
        slurm(slurm_cluster, "scancel", slurm_job)
        rc = first.wait(timeout=600)
    except BaseException:
        first.kill_all()
        raise
    output = first.text()
    assert rc != 0, "the run should fail: one of its jobs was cancelled"
    assert f"SLURM-job '{slurm_job}' failed, SLURM status is: 'CANCELLED" in output, output[-4000:]
    cancelled = [a for a in all_attempts(logs) if a.job == target_log]
    assert len(cancelled) == 1 and not cancelled[0].done, "the job finished before it could be cancelled"
    assert "received SIGTERM: stopping the job" in (logs / target_log).read_text()
    assert not (workdir / "results/stories/setA/completions.parquet").exists()
    assert (workdir / "results/stories/setB/logit_lens/summary.json").exists()  # --keep-going ran the rest
    assert temporaries(workdir) == []  # SIGTERM: the cancelled job removed its temporary itself
    planned = run_snakemake(workdir, "-n", "--cores", "1", check=True)
    assert "generate_completions" in planned.stdout and "model=stories, pset=setA" in planned.stdout

    # 2. resumed with the same command
    second = Background(workdir, *PROFILE_RUN, env=env, limit_s=900, name="second")
    try:
        assert second.wait(timeout=900) == 0, second.text()[-4000:]
    except BaseException:
        second.kill_all()
        raise
    output += second.text()

    # every job went through sbatch, GPU jobs to the GPU partition with a GPU, the rest to the CPU partition
    submitted = submissions(output)
    wants_gpu = gpu_requests(output)
    assert {wants_gpu[r] for r in GPU_RULES} == {True} and not wants_gpu["logit_lens"]
    rules = {r for r in submitted.values()}
    assert rules == {"prepare_model", *GPU_RULES, "logit_lens", "model_report", "cross_model_report",
                     "report_index"}, rules
    sacct = slurm(slurm_cluster, "sacct", "-X", "-a", "-n", "-P", "-S", "now-1days",
                  "-o", "JobIDRaw,Partition,AllocTRES,State,Start,End")
    records = {row[0]: row for row in (line.split("|") for line in sacct.splitlines() if line)}
    assert set(submitted) <= set(records), f"submitted jobs missing from sacct: {set(submitted) - set(records)}"
    for job_id, rule in submitted.items():
        _, partition, tres, state, *_ = records[job_id]
        gpu = wants_gpu[rule]
        assert partition == ("gpu" if gpu else "cpu"), (rule, partition)
        assert ("gres/gpu=1" in tres) == gpu, (rule, tres)
        assert state.startswith("CANCELLED") if job_id == slurm_job else state == "COMPLETED", (rule, state)
    # inside the GPU jobs: the scheduler's device, seen by the job (and run on the CPU: no GPU here)
    for rule in GPU_RULES:
        for log in (logs / rule).glob("*.log"):
            text = log.read_text()
            assert re.search(r"SLURM job \d+ on node \S+ \(CUDA_VISIBLE_DEVICES=\d, SLURM_STEP_GPUS=\d", text), text
            assert "SLURM_JOB_PARTITION=gpu" in text
    for log in (logs / "logit_lens").glob("*.log"):
        assert "SLURM_JOB_PARTITION=cpu" in log.read_text()

    # the results are the local run's
    assert assert_same_results(reference, workdir, models=("stories",)) >= 10
    assert temporaries(workdir) == []
