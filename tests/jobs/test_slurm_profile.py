"""profiles/slurm without a cluster: Snakemake accepts it, and the plugin's own code sends every job of the
default run that asks for a GPU to the GPU partition with `--gpus=1` (no `--gres`, no task geometry) and
every other job to the CPU partition. (tests/test_cluster.py runs the profile on a real cluster.)"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import yaml

from tests.helpers import REPO

plugin = pytest.importorskip("snakemake_executor_plugin_slurm",
                             reason="snakemake-executor-plugin-slurm is not installed (pip install -e '.[slurm]')")
from snakemake_executor_plugin_slurm.partitions import get_best_partition, read_partition_file  # noqa: E402
from snakemake_executor_plugin_slurm.submit_string import get_submit_command  # noqa: E402
from snakemake_executor_plugin_slurm.utils import set_gres_string  # noqa: E402

PROFILE = REPO / "profiles" / "slurm"
pytestmark = pytest.mark.slow  # one dry run of the default config


class Resources(dict):
    """What the plugin reads: `job.resources.get(key)` and `job.resources.key`."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


def _value(text: str):
    try:
        return int(text)
    except ValueError:
        return text


@pytest.fixture(scope="module")
def planned_jobs() -> list[SimpleNamespace]:
    """Every job of the default run as Snakemake plans it with the profile: rule, threads, resources."""
    result = subprocess.run(["timeout", "-s", "KILL", "300", sys.executable, "-m", "snakemake", "--profile",
                             str(PROFILE), "-n", "--forceall"], cwd=REPO, capture_output=True, text=True)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert f"Using profile {PROFILE}" in output
    jobs = []
    for block in re.split(r"\n(?=\[[^\]]+\]\n(?:local)?rule )", output):
        rule = re.search(r"^(?:local)?rule (\w+):", block, re.M)
        resources = re.search(r"^\s+resources: (.*)$", block, re.M)
        if not rule or not resources:
            continue
        threads = re.search(r"^\s+threads: (\d+)$", block, re.M)
        pairs = (item.split("=", 1) for item in resources[1].split(", "))
        jobs.append(SimpleNamespace(name=rule[1], threads=int(threads[1]) if threads else 1,
                                    resources=Resources({k: _value(v) for k, v in pairs})))
    return jobs


def test_the_profile_is_what_the_plugin_expects():
    profile = yaml.safe_load((PROFILE / "config.v8+.yaml").read_text())
    assert profile["executor"] == "slurm"
    assert profile["slurm-partition-config"] == "partitions.yaml" and (PROFILE / "partitions.yaml").is_file()
    defaults = profile.get("default-resources", {})
    # a partition here would bypass partitions.yaml; tasks would add --ntasks-per-gpu to GPU jobs
    assert not {"slurm_partition", "tasks", "gres", "gpu"} & set(defaults)
    assert "resources" not in profile  # `--resources gpu=N` would cap GPU jobs cluster-wide
    assert profile.get("rerun-incomplete") is True
    partitions = {p.name: p.limits for p in read_partition_file(PROFILE / "partitions.yaml")}
    assert partitions["cpu"].max_gpu == 0 and partitions["gpu"].max_gpu > 0


def test_gpu_jobs_go_to_the_gpu_partition_and_the_rest_to_the_cpu_partition(planned_jobs):
    partitions = read_partition_file(PROFILE / "partitions.yaml")
    logger = logging.getLogger("test")
    rules = {}
    for job in planned_jobs:
        wants_gpu = bool(job.resources.get("gpu"))
        assert get_best_partition(partitions, job, logger) == ("gpu" if wants_gpu else "cpu"), job
        rules[job.name] = wants_gpu
    # the default run has GPU and CPU jobs, and the spine's forward-pass rules are GPU rules
    assert rules["generate_completions"] and rules["extract_activations"] and not rules["logit_lens"]
    assert not rules["prepare_model"] and not rules["model_report"]


def test_sbatch_asks_for_a_gpu_with_gpus_only(planned_jobs):
    params = {"run_uuid": "run", "slurm_logfile": "log", "comment_str": "c", "account": "", "partition": " -p gpu",
              "workdir": "."}
    for job in planned_jobs:
        call = get_submit_command(job, params) + set_gres_string(job)
        if job.resources.get("gpu"):
            assert call.count("--gpus=1") == 1 and "--gres" not in call and "--ntasks-per-gpu" not in call, call
        else:
            assert "--gpus" not in call and "--gres" not in call, call
        assert f"--cpus-per-task={job.threads}" in call and f"--mem {job.resources['mem_mb']}" in call, call
        assert f"-t {job.resources['runtime']}" in call, call


def test_a_multi_gpu_model_asks_slurm_for_its_gpus(tmp_path):
    """`gpus: 2` for SmolLM2: its GPU jobs go to the GPU partition with `--gpus=2`, the other model's with 1."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["models"]["smollm2-135m"]["gpus"] = 2
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump(config))
    result = subprocess.run(["timeout", "-s", "KILL", "300", sys.executable, "-m", "snakemake", "--profile",
                             str(PROFILE), "-n", "--forceall", "--configfile", str(configfile)],
                            cwd=REPO, capture_output=True, text=True)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    partitions = read_partition_file(PROFILE / "partitions.yaml")
    logger = logging.getLogger("test")
    seen = {}
    for block in re.split(r"\n(?=\[[^\]]+\]\n(?:local)?rule )", output):
        rule = re.search(r"^(?:local)?rule (\w+):", block, re.M)
        resources = re.search(r"^\s+resources: (.*)$", block, re.M)
        model = re.search(r"^\s+wildcards: model=([\w.-]+)", block, re.M)
        if not (rule and resources and model):
            continue
        pairs = dict(item.split("=", 1) for item in resources[1].split(", "))
        if "gpu" not in pairs:
            continue
        job = SimpleNamespace(name=rule[1], threads=1, resources=Resources({k: _value(v) for k, v in pairs.items()}))
        assert get_best_partition(partitions, job, logger) == "gpu", job
        expected = 2 if model[1] == "smollm2-135m" else 1
        assert f"--gpus={expected}" in set_gres_string(job), (job, set_gres_string(job))
        seen[(rule[1], model[1])] = job.resources["gpu"]
    assert seen[("extract_activations", "smollm2-135m")] == 2 and seen[("generate_completions", "smollm2-135m")] == 2
    assert seen[("knockout", "smollm2-135m")] == 2 and seen[("extract_activations", "minilm-l6")] == 1
