"""End-to-end Snakemake run of the surgery rules (knockout, swap, shuffle, layer_repeat) on stories260K."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest
import yaml

from tests.helpers import planned_jobs, snakemake

pytestmark = pytest.mark.slow

PROMPTS = {"prompts": [
    {"id": "s1", "category": "story", "text": "Once upon a time, there was a little girl named Lily. She"},
    {"id": "s2", "category": "story", "text": "Tom and Sue went to the park. They saw a big"},
    {"id": "s3", "category": "animals", "text": "The dog ran to the door because"},
]}


def write_config(workdir, stories_dir, swap: dict | None = None):
    config = {
        "models": {"stories": {"source": {"type": "local", "path": str(stories_dir)}}},
        "prompt_sets": {"tiny": {"path": "prompts.json"}},
        "generation": {"max_new_tokens": 10, "batch_size": 3},
        "activations": {"batch_size": 3},
        "experiments": {
            "logit_lens": {"enabled": False},
            "knockout": {"max_prompts": 3, "pairwise_top": 3},
            "swap": {"max_prompts": 2, "n_zones": 2, **(swap or {})},
            "shuffle": {"max_prompts": 2, "refine_max_evals": 20, "anneal_steps": 20, "pipeline_max_evals": 30},
            "layer_repeat": {"max_prompts": 3, "max_repeats": 2},
        },
    }
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))


@pytest.fixture(scope="module")
def run(tmp_path_factory, stories_dir):
    workdir = tmp_path_factory.mktemp("surgery")
    (workdir / "prompts.json").write_text(json.dumps(PROMPTS))
    write_config(workdir, stories_dir)
    snakemake(workdir, "--cores", "2")
    return workdir


def test_surgery_outputs(run):
    base = run / "results/stories/tiny"
    files = {
        "knockout": ["summary.json", "metrics.parquet", "pairs.parquet", "ratio.png", "synergy.png"],
        "swap": ["summary.json", "metrics.parquet", "pairs.parquet", "cost_matrix.png", "sensitivity.png"],
        "shuffle": ["summary.json", "metrics.parquet", "orders.parquet", "methods.png", "orders.png"],
        "layer_repeat": ["summary.json", "metrics.parquet", "ratio.png", "scatter.png"],
    }
    for experiment, names in files.items():
        for name in names:
            assert (base / experiment / name).is_file(), (experiment, name)
        assert (run / f"results/logs/{experiment}/stories_tiny.log").is_file()
        assert (run / f"results/benchmarks/{experiment}/stories_tiny.tsv").is_file()
    knockout = json.loads((base / "knockout/summary.json").read_text())
    assert len(knockout["ratio_by_layer"]) == 5 and knockout["n_prompts"] == 3 and len(knockout["top_synergy_pairs"]) == 3
    assert knockout["prompt_categories"] == {"story": 2, "animals": 1} and len(knockout["ratio_by_layer_ci"]) == 5
    swap = json.loads((base / "swap/summary.json").read_text())
    assert swap["n_pairs"] == 10 and swap["n_zones"] == 2 and swap["n_prompts"] == 2
    assert swap["prompt_categories"] == {"story": 1, "animals": 1}  # stratified: not the first two (both story)
    for summary in (knockout, swap):
        assert summary["uncertainty"]["unit"] == "prompt" and summary["underpowered"]
    shuffle = json.loads((base / "shuffle/summary.json").read_text())
    assert shuffle["permutation_seeds"] == [0, 1, 2] and len(shuffle["methods"]) == 3 * 10  # 'none' + 9 methods
    assert shuffle["all_exact"] and shuffle["exact_profile_chain"] == 3
    repeat = json.loads((base / "layer_repeat/summary.json").read_text())
    assert repeat["repeats"] == [2] and len(repeat["ratio_by_layer"][0]) == 5 and len(repeat["pair_ratio_by_layer"]) == 4
    assert repeat["skip_ratio_by_layer"] == pytest.approx(knockout["ratio_by_layer"], rel=1e-12)  # same sample
    page = (run / "results/report/stories.md").read_text()
    for key in ("most_critical_layer", "top_synergy_pairs", "cheapest_swap", "best_tau", "most_tolerant_layer"):
        assert key in page
    assert not list(run.rglob("*.tmp*"))


def test_changing_a_swap_parameter_reruns_only_swap_and_reports(run, tmp_path, stories_dir):
    workdir = tmp_path / "w"
    shutil.copytree(run, workdir, symlinks=True)
    write_config(workdir, stories_dir, swap={"interchangeable_ratio": 1.2})
    jobs = Counter(rule for rule, _ in planned_jobs(workdir))
    assert jobs == Counter({"swap": 1, "model_report": 1, "cross_model_report": 1, "report_index": 1})
