"""End-to-end Snakemake runs of a small config: every target, incremental re-runs, determinism, report."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter

import pytest
import yaml

from tests.helpers import REPO, planned_jobs, save_tiny_model, snakemake

pytestmark = pytest.mark.slow

PROMPTS_A = {"prompts": [
    {"id": "a1", "category": "story", "text": "Once upon a time, there was a little girl"},
    {"id": "a2", "category": "story", "text": "The dog ran to the"},
    {"id": "a3", "category": "animals", "text": "A big cat"},
]}
PROMPTS_B = {"prompts": [
    {"id": "b1", "category": "park", "text": "Tom and Sue went to the park."},
    {"id": "b2", "category": "park", "text": "One day, a bird"},
]}


def write_config(workdir, models: dict, lens: dict | None = None):
    config = {
        "models": models,
        "prompt_sets": {"setA": {"path": "prompts_a.json"}, "setB": {"path": "prompts_b.json"}},
        "generation": {"max_new_tokens": 8, "batch_size": 2},
        "activations": {"batch_size": 2},
        "experiments": {"logit_lens": {"topk": 5, "max_phases": 3, **(lens or {})}},
    }
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))


@pytest.fixture(scope="module")
def models(tmp_path_factory, stories_dir):
    root = tmp_path_factory.mktemp("models")
    return {
        "stories": {"source": {"type": "local", "path": str(stories_dir)}},
        "tinyllama": {"source": {"type": "local", "path": str(save_tiny_model("llama", root / "llama", stories_dir))}},
        "tinyqwen": {"source": {"type": "local", "path": str(save_tiny_model("qwen2", root / "qwen2", stories_dir))}},
    }


def fresh_workdir(path, models, names=("stories", "tinyllama")):
    path.mkdir(parents=True, exist_ok=True)
    (path / "prompts_a.json").write_text(json.dumps(PROMPTS_A))
    (path / "prompts_b.json").write_text(json.dumps(PROMPTS_B))
    write_config(path, {n: models[n] for n in names})
    return path


def summaries(workdir) -> dict[str, str]:
    return {str(p.relative_to(workdir)): p.read_text() for p in sorted(workdir.glob("results/*/*/*/summary.json"))}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, models):
    workdir = fresh_workdir(tmp_path_factory.mktemp("run1"), models)
    snakemake(workdir, "--cores", "2")
    return workdir


def test_every_target_is_built(first_run):
    from layerscope.jobs import config as lsconfig

    cfg = lsconfig.validate_config(yaml.safe_load((first_run / "config.yaml").read_text()),
                                   REPO / lsconfig.SCHEMA_FILE, base_dir=first_run)
    targets = lsconfig.targets(cfg)
    assert len(targets) == 4 + 2 + 2 + 4 + 2  # lens runs, model pages (md+html), cross-model + index + provenance, models
    for target in targets:
        assert (first_run / target).exists(), target
    for model in ("stories", "tinyllama"):
        for pset in ("setA", "setB"):
            run = first_run / "results" / model / pset
            for name in ("completions.parquet", "activations/resid.safetensors", "activations/tokens.parquet",
                         "logit_lens/metrics.parquet", "logit_lens/per_token.parquet", "logit_lens/curves.png",
                         "logit_lens/categories.png", "logit_lens/crystallization.png"):
                assert (run / name).is_file(), run / name
            assert (first_run / f"results/logs/logit_lens/{model}_{pset}.log").is_file()
            assert (first_run / f"results/benchmarks/extract_activations/{model}_{pset}.tsv").is_file()
    cross = (first_run / "results/report/cross_model.md").read_text()
    assert "stories" in cross and "tinyllama" in cross and "crystallization_mean" in cross
    assert not list(first_run.rglob("*.tmp*")), "no temporary files may remain"


def test_progress_lines_land_in_the_job_logs(first_run):
    """Generation, extraction and the lens each end their log with a progress line (count and time)."""
    import re

    for model in ("stories", "tinyllama"):
        expected = {"generate_completions": r"generate completions done: 3/3 prompts in \S+",
                    "extract_activations": r"extract activations done: 3/3 sequences in \S+",
                    "logit_lens": r"logit lens done: (\d+)/\1 tokens in \S+"}
        for rule, pattern in expected.items():
            text = (first_run / f"results/logs/{rule}/{model}_setA.log").read_text()
            assert re.search(r" INFO layerscope\.progress: " + pattern, text), (rule, model, text[-2000:])


def test_second_run_does_nothing(first_run):
    assert planned_jobs(first_run) == []


def test_changing_a_lens_parameter_reruns_only_the_lens_and_reports(first_run, tmp_path, models):
    workdir = tmp_path / "w"
    shutil.copytree(first_run, workdir, symlinks=True)
    write_config(workdir, {n: models[n] for n in ("stories", "tinyllama")}, lens={"topk": 3})
    jobs = Counter(rule for rule, _ in planned_jobs(workdir))
    assert jobs == Counter({"logit_lens": 4, "model_report": 2, "cross_model_report": 1, "report_index": 1})


def test_editing_one_prompt_reruns_only_that_prompt_sets_jobs(first_run, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(first_run, workdir, symlinks=True)
    edited = json.loads(json.dumps(PROMPTS_A))
    edited["prompts"][1]["text"] = "The cat ran to the"
    (workdir / "prompts_a.json").write_text(json.dumps(edited))
    jobs = planned_jobs(workdir)
    per_pset = {wc.get("pset") for rule, wc in jobs if "pset" in wc}
    assert per_pset == {"setA"}
    assert Counter(rule for rule, _ in jobs) == Counter({
        "generate_completions": 2, "extract_activations": 2, "logit_lens": 2,
        "model_report": 2, "cross_model_report": 1, "report_index": 1,
    })


def test_adding_a_model_runs_only_its_jobs_and_the_cross_model_report(first_run, tmp_path, models):
    workdir = tmp_path / "w"
    shutil.copytree(first_run, workdir, symlinks=True)
    write_config(workdir, models)  # all three
    jobs = planned_jobs(workdir)
    assert {wc.get("model") for rule, wc in jobs if "model" in wc} == {"tinyqwen"}
    assert Counter(rule for rule, _ in jobs) == Counter({
        "prepare_model": 1, "generate_completions": 2, "extract_activations": 2, "logit_lens": 2,
        "model_report": 1, "cross_model_report": 1, "report_index": 1,
    })
    snakemake(workdir, "--cores", "2")
    assert "tinyqwen" in (workdir / "results/report/cross_model.md").read_text()
    assert planned_jobs(workdir) == []


def test_two_runs_give_identical_summaries(first_run, tmp_path, models):
    workdir = fresh_workdir(tmp_path / "again", models)
    snakemake(workdir, "--cores", "2")
    first, second = summaries(first_run), summaries(workdir)
    assert len(first) == 4 and first == second


def test_snakemake_html_report(first_run, tmp_path):
    out = tmp_path / "report.html"
    snakemake(first_run, "--report", str(out))
    text = out.read_text(errors="replace")
    assert out.stat().st_size > 10_000 and "logit_lens" in text
    # captions are reStructuredText: docutils' complaints would be rendered into the report
    assert "System Message" not in text and "Undefined substitution" not in text


def test_a_bad_config_stops_the_run_with_its_name(tmp_path, models):
    workdir = fresh_workdir(tmp_path, models, names=("stories",))
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["experiments"]["logit_lenz"] = {}
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(workdir, "-n", check=False)
    assert result.returncode != 0
    assert "unknown experiment(s) ['logit_lenz']" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_lint_and_dry_run_of_the_default_config():
    lint = subprocess.run([sys.executable, "-m", "snakemake", "--lint"], cwd=REPO, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert "Congratulations" in lint.stdout + lint.stderr
    dry = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1"], cwd=REPO,
                         capture_output=True, text=True)
    assert dry.returncode == 0, dry.stdout[-3000:] + dry.stderr[-3000:]
