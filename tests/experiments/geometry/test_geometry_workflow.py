"""One small real Snakemake run of the representation-geometry rules: stories260K (decoder) and a tiny BERT (encoder)."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pandas as pd
import pytest
import yaml

from tests.helpers import REPO, planned_jobs, save_tiny_model, snakemake

pytestmark = pytest.mark.slow

PROMPTS = {"prompts": [
    {"id": "a1", "category": "story", "text": "Once upon a time, there was a little girl"},
    {"id": "a2", "category": "story", "text": "Tom and Sue went to the park."},
    {"id": "b1", "category": "animals", "text": "The dog ran to the"},
    {"id": "b2", "category": "animals", "text": "A big cat"},
]}


def write_config(workdir, models, delta=None):
    config = {
        "models": models,
        "prompt_sets": {"tiny": {"path": "prompts.json"}},
        "generation": {"max_new_tokens": 8, "batch_size": 4},
        "activations": {"batch_size": 4},
        "experiments": {
            "residual_geometry": {"massive_ratio": 20},
            "delta_svd": {"phase_fractions": [0.5], **(delta or {})},
            "embedding_geometry": {"categories": str(REPO / "resources/word_categories.json"),
                                   "cosine_sample": 200, "n_simplices": 100},
            "contrastive": {"groups": str(REPO / "resources/contrastive/groups.json"), "max_groups": 3},
        },
    }
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))


@pytest.fixture(scope="module")
def run(tmp_path_factory, stories_dir):
    root = tmp_path_factory.mktemp("geo")
    bert = save_tiny_model("bert", root / "bert", stories_dir)
    models = {"stories": {"source": {"type": "local", "path": str(stories_dir)}},
              "tinybert": {"kind": "encoder", "source": {"type": "local", "path": str(bert)}}}
    workdir = root / "w"
    workdir.mkdir()
    (workdir / "prompts.json").write_text(json.dumps(PROMPTS))
    write_config(workdir, {"stories": models["stories"]})
    snakemake(workdir, "--cores", "2")
    return workdir, models


def test_every_output_is_built(run):
    workdir, _ = run
    results = workdir / "results"
    expected = {
        "stories/tiny/residual_geometry": ["summary.json", "metrics.parquet", "massive.parquet", "curves.png",
                                           "massive.png"],
        "stories/tiny/delta_svd": ["summary.json", "metrics.parquet", "pairs.parquet", "curves.png", "directions.png"],
        "stories/embedding_geometry": ["summary.json", "metrics.parquet", "words.parquet", "eigenspectrum.parquet",
                                       "overview.png", "categories.png"],
        "stories/contrastive": ["summary.json", "metrics.parquet", "per_group.parquet", "cosine.png", "kl.png",
                                "crossover.png", "relations.png"],
    }
    for folder, files in expected.items():
        for name in files:
            assert (results / folder / name).is_file(), f"{folder}/{name}"
    rg = json.loads((results / "stories/tiny/residual_geometry/summary.json").read_text())
    for key in ("pr_min", "pr_min_layer", "norm_growth", "final_category_separation", "massive_dims"):
        assert key in rg
    contrast = json.loads((results / "stories/contrastive/summary.json").read_text())
    assert contrast["n_groups"] == 3 and "crossover_layer" in contrast
    assert set(contrast["mean_cosine_by_layer"]) == {"synonym", "antonym", "style", "unrelated"}
    assert (results / "logs/contrastive/stories.log").is_file()
    assert (results / "benchmarks/embedding_geometry/stories.tsv").is_file()
    page = (results / "report/stories.md").read_text()
    for experiment in ("residual_geometry", "delta_svd", "embedding_geometry", "contrastive"):
        assert f"## {experiment}" in page
    table = pd.read_parquet(results / "report/cross_model.parquet")
    assert {"pr_min", "crossover_layer", "participation_ratio", "effective_rank_mean"} <= set(table["metric"])
    assert not list(workdir.rglob("*.tmp*"))


def test_nothing_to_do_after_the_run_and_a_parameter_reruns_only_its_experiment(run, tmp_path):
    workdir, models = run
    assert planned_jobs(workdir) == []
    copy = tmp_path / "w"
    shutil.copytree(workdir, copy, symlinks=True)
    write_config(copy, {"stories": models["stories"]}, delta={"top_k": 4})
    jobs = Counter(rule for rule, _ in planned_jobs(copy))
    assert jobs == Counter({"delta_svd": 1, "model_report": 1, "cross_model_report": 1, "report_index": 1})


def test_an_encoder_is_scheduled_only_for_what_it_supports(run, tmp_path):
    workdir, models = run
    copy = tmp_path / "w"
    shutil.copytree(workdir, copy, symlinks=True)
    write_config(copy, models)
    jobs = planned_jobs(copy)
    assert {wc.get("model") for rule, wc in jobs if "model" in wc} == {"tinybert"}
    assert Counter(rule for rule, _ in jobs) == Counter({
        "prepare_model": 1, "extract_activations": 1, "residual_geometry": 1, "embedding_geometry": 1,
        "model_report": 1, "cross_model_report": 1, "report_index": 1,
    })
