"""One small real Snakemake run of weight_spectra, weight_topology and cross_model (decoder + encoder)."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest
import yaml

from tests.helpers import planned_jobs, save_tiny_model, snakemake

pytestmark = pytest.mark.slow

PROMPTS = {"prompts": [
    {"id": "a1", "category": "story", "text": "Once upon a time, there was a little girl"},
    {"id": "a2", "category": "story", "text": "The dog ran to the"},
    {"id": "a3", "category": "animals", "text": "A big cat"},
    {"id": "a4", "category": "park", "text": "Tom and Sue went to the park."},
]}


def write_config(workdir, models, experiments):
    config = {
        "models": models,
        "prompt_sets": {"tiny": {"path": "prompts.json"}},
        "generation": {"max_new_tokens": 4, "batch_size": 2},
        "activations": {"batch_size": 2},
        "experiments": experiments,
    }
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))


@pytest.fixture(scope="module")
def models(tmp_path_factory, stories_dir):
    root = tmp_path_factory.mktemp("wmodels")
    bert = save_tiny_model("bert", root / "bert", stories_dir)  # an encoder with stories' tokenizer
    return {
        "stories": {"source": {"type": "local", "path": str(stories_dir)}},
        "tinybert": {"kind": "encoder", "source": {"type": "local", "path": str(bert)}},
    }


EXPERIMENTS = {"weight_spectra": {"top_k": 8}, "weight_topology": {}, "cross_model": {"max_eval_tokens": 100}}


@pytest.fixture(scope="module")
def run(tmp_path_factory, models):
    workdir = tmp_path_factory.mktemp("wrun")
    (workdir / "prompts.json").write_text(json.dumps(PROMPTS))
    write_config(workdir, models, EXPERIMENTS)
    snakemake(workdir, "--cores", "2")
    return workdir


def test_every_output_is_built(run):
    for model in ("stories", "tinybert"):
        spectra = run / "results" / model / "weight_spectra"
        for name in ("summary.json", "metrics.parquet", "singular_values.parquet", "jumps.parquet", "rank_ratio.png",
                     "singular_values.png"):
            assert (spectra / name).is_file(), spectra / name
        topology = run / "results" / model / "weight_topology"
        for name in ("summary.json", "metrics.parquet", "qk_circuits.png", "cross_layer.png", "norm_scales.png",
                     "position.png", "mlp_neurons.parquet"):
            assert (topology / name).is_file(), topology / name
        assert (run / f"results/benchmarks/weight_spectra/{model}.tsv").is_file()
    summary = json.loads((run / "results/stories/weight_spectra/summary.json").read_text())
    assert summary["n_matrices"] == 37 and summary["n_layers"] == 5
    cka = json.loads((run / "results/cross_model/cka/tiny/stories/tinybert/summary.json").read_text())
    assert (cka["n_prompts"], cka["layers_a"], cka["layers_b"]) == (4, 5, 3)
    assert (run / "results/cross_model/cka/tiny/stories/tinybert/cka.png").is_file()
    procrustes = json.loads((run / "results/cross_model/procrustes/stories/tinybert/summary.json").read_text())
    assert procrustes["applicable"] and procrustes["pca_reduced"] == "a" and procrustes["n_heldout"] == 100
    cross = (run / "results/report/cross_model.md").read_text()
    for text in ("weight_spectra — weights", "weight_topology — weights", "cross_model/cka — prompt set `tiny`",
                 "stories vs tinybert", "heldout_cosine_mean", "entropy_effective_rank_ratio_q"):
        assert text in cross, text
    page = (run / "results/report/tinybert.md").read_text()
    assert "weight_topology" in page and "qk_circuits" in page
    assert not list(run.rglob("*.tmp*"))


def test_second_run_does_nothing_and_a_parameter_reruns_only_its_experiment(run, tmp_path, models):
    assert planned_jobs(run) == []
    workdir = tmp_path / "w"
    shutil.copytree(run, workdir, symlinks=True)
    write_config(workdir, models, {**EXPERIMENTS, "weight_topology": {"dead_ratio": 0.02}})
    jobs = Counter(rule for rule, _ in planned_jobs(workdir))
    assert jobs == Counter({"weight_topology": 2, "model_report": 2, "cross_model_report": 1, "report_index": 1})


def test_weight_experiments_need_no_prompts_or_activations(tmp_path, models):
    (tmp_path / "prompts.json").write_text(json.dumps(PROMPTS))
    write_config(tmp_path, models, {"weight_spectra": {}, "weight_topology": {}})
    jobs = Counter(rule for rule, _ in planned_jobs(tmp_path))
    assert jobs == Counter({"prepare_model": 2, "weight_spectra": 2, "weight_topology": 2, "model_report": 2,
                            "cross_model_report": 1, "report_index": 1})
