"""The cross-experiment rule, its scheduling, and one real Snakemake run of linearization + quantization + the rule."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import yaml

from tests.helpers import REPO, planned_jobs, snakemake
from layerscope import LayerscopeError
from layerscope.jobs import config as lsconfig
from layerscope.experiments.nonlinearity.sensitivity_vs_linearity import sensitivity_vs_linearity


def _lin(gaps, layers=None, n_layers=None):
    layers = list(range(len(gaps))) if layers is None else layers
    gaps = list(map(float, gaps))
    return {"n_layers": n_layers or len(gaps), "layers": layers, "ref_eps": 0.1, "gap_by_layer": gaps,
            "attn_gap_by_layer": gaps[::-1], "mlp_gap_by_layer": [g * 2 for g in gaps]}


def _quant(sens_by_bits, sensitivity_bits=3):
    n = len(next(iter(sens_by_bits.values())))
    return {"n_layers": n, "sensitivity_bits": sensitivity_bits,
            "sensitivity": {str(b): list(map(float, v)) for b, v in sens_by_bits.items()}}


def _plain_spearman(x, y):
    """Independent: Pearson correlation of ranks (no ties in these inputs)."""
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def test_rho_matches_a_plain_rank_correlation():
    rng = np.random.default_rng(0)
    gaps = rng.random(12)
    sens3 = gaps * 3 + rng.normal(0, 0.3, 12)
    sens2 = -gaps
    result = sensitivity_vs_linearity(_lin(gaps), _quant({2: sens2, 3: sens3}), model="m", prompt_set="p")
    s = result.summary
    assert s["spearman_rho"] == pytest.approx(_plain_spearman(gaps, sens3))
    assert s["rho_by_bits"]["2"] == pytest.approx(-1.0)
    assert s["attn_spearman_rho"] == pytest.approx(_plain_spearman(gaps[::-1], sens3))
    assert s["mlp_spearman_rho"] == pytest.approx(s["spearman_rho"])  # 2·gap has the same ranks
    assert 0 <= s["p_value"] <= 1 and s["n_layers"] == 12
    m = result.metrics
    assert set(m["sublayer"]) == {"block", "attn", "mlp"} and set(m["bits"]) == {2, 3}


def test_subset_of_layers_is_aligned_by_index():
    gaps = [0.5, 0.1, 0.3]
    lin = _lin(gaps, layers=[4, 0, 2], n_layers=6)
    sens = [0.0, 9, 1.0, 9, 5.0, 9]  # sensitivity of blocks 0, 2, 4 = 0, 1, 5 → same order as their gaps 0.1, 0.3, 0.5
    s = sensitivity_vs_linearity(lin, _quant({3: sens}), model="m", prompt_set="p").summary
    assert s["spearman_rho"] == pytest.approx(1.0) and s["n_layers"] == 3


def test_a_shared_depth_trend_is_not_taken_for_a_relation():
    """Gap and sensitivity both grow with depth but are otherwise independent: the raw ρ is high (what the
    old summary reported as the finding), the partial ρ with depth partialled out is near 0, not
    significant after Holm adjustment, and the claim is flagged."""
    rng = np.random.default_rng(0)
    depth = np.arange(30.0)
    raw, partial, significant, flagged = [], [], [], []
    for _ in range(100):
        gaps = 0.1 + 0.01 * depth + rng.normal(0, 0.02, 30)
        sens = 0.5 + 0.02 * depth + rng.normal(0, 0.04, 30)
        s = sensitivity_vs_linearity(_lin(gaps), _quant({3: sens}), model="m", prompt_set="p").summary
        raw.append(s["spearman_rho"])
        partial.append(s["partial_spearman_rho"])
        significant.append(s["partial_p_holm"] < 0.05)
        flagged.append(any("depth partialled out" in r for r in s["underpowered_reasons"]))
    assert np.min(raw) > 0.7  # the old headline: a strong "relation" in every draw
    assert abs(np.mean(partial)) < 0.05 and np.std(partial) < 0.25  # centred on 0, sd ≈ 1/√(n−3)
    assert np.mean(significant) <= 0.05  # Holm keeps false claims at or below the nominal rate
    assert flagged == [not x for x in significant]  # every claim the test does not carry is flagged
    # a relation beyond depth: sensitivity follows the gap's deviations from the depth trend
    resid = rng.normal(0, 0.02, 30)
    gaps2 = 0.1 + 0.01 * depth + resid
    sens2 = 0.5 + 0.02 * depth + 3 * resid + rng.normal(0, 0.01, 30)
    s2 = sensitivity_vs_linearity(_lin(gaps2), _quant({3: sens2}), model="m", prompt_set="p").summary
    assert s2["partial_spearman_rho"] > 0.7 and s2["partial_p_holm"] < 0.01 and not s2["underpowered"]


def test_p_values_are_holm_adjusted_over_every_test_made():
    from layerscope.engines.statistics import holm, partial_spearman

    rng = np.random.default_rng(1)
    gaps = rng.random(10)
    sens = {2: gaps + rng.normal(0, 0.2, 10), 3: rng.random(10), 4: -gaps}
    result = sensitivity_vs_linearity(_lin(gaps), _quant(sens), model="m", prompt_set="p")
    m, s = result.metrics, result.summary
    raw = m[m["metric"] == "p_value"].sort_values(["bits", "sublayer"])
    part = m[m["metric"] == "partial_p_value"].sort_values(["bits", "sublayer"])
    assert s["n_tests"] == 3 * 3 * 2  # bit widths × gaps × (raw, partial)
    family = raw["value"].tolist() + part["value"].tolist()
    adjusted = holm(family)
    got = (m[m["metric"] == "p_holm"].sort_values(["bits", "sublayer"])["value"].tolist()
           + m[m["metric"] == "partial_p_holm"].sort_values(["bits", "sublayer"])["value"].tolist())
    np.testing.assert_allclose(got, adjusted)
    assert s["p_holm"] >= s["p_value"] and s["partial_p_holm"] >= s["partial_p_value"]
    rho, p = partial_spearman(gaps, sens[3], np.arange(10))
    assert s["partial_spearman_rho"] == pytest.approx(rho) and s["partial_p_value"] == pytest.approx(p)
    assert s["uncertainty"]["unit"] == "layer" and s["uncertainty"]["n_units"] == 10


def test_upstream_underpowered_reasons_are_carried():
    lin = dict(_lin([0.1, 0.3, 0.2, 0.5, 0.4]), underpowered=True, underpowered_reasons=["only 2 prompts"])
    s = sensitivity_vs_linearity(lin, _quant({3: [1, 3, 2, 5, 4]}), model="m", prompt_set="p").summary
    assert "linearization: only 2 prompts" in s["underpowered_reasons"] and s["underpowered"]


def test_undefined_correlation_is_none_not_a_number():
    s = sensitivity_vs_linearity(_lin([0.1, 0.2, 0.3, 0.4]), _quant({3: [1.0, 1.0, 1.0, 1.0]}),
                                 model="m", prompt_set="p").summary
    assert s["spearman_rho"] is None and s["p_value"] is None
    assert s["partial_spearman_rho"] is None and s["p_holm"] is None and s["underpowered"]


def test_summaries_of_different_models_are_refused():
    with pytest.raises(LayerscopeError, match="different models"):
        sensitivity_vs_linearity(_lin([0.1, 0.2, 0.3]), _quant({3: [1, 2, 3, 4]}), model="m", prompt_set="p")


# ---------------------------------------------------------------------------- scheduling


def _config(**experiments):
    cfg = {
        "models": {"dec": {"source": {"type": "local", "path": "/x"}},
                   "dec2": {"source": {"type": "local", "path": "/y"}},
                   "enc": {"kind": "encoder", "source": {"type": "local", "path": "/z"}}},
        "prompt_sets": {"core": {"path": "resources/prompt_sets/core.json"}},
        "experiments": experiments,
    }
    return lsconfig.validate_config(cfg, REPO / lsconfig.SCHEMA_FILE, base_dir=REPO)


def test_cross_rule_runs_only_where_both_experiments_run():
    cfg = _config(linearization={}, quantization={}, sensitivity_vs_linearity={})
    # linearization also runs on the encoder, quantization (a loss) does not: the rule follows the intersection
    assert {r["model"] for r in lsconfig.experiment_runs(cfg, "linearization")} == {"dec", "dec2", "enc"}
    assert {r["model"] for r in lsconfig.experiment_runs(cfg, "sensitivity_vs_linearity")} == {"dec", "dec2"}
    cfg = _config(linearization={}, quantization={"models": ["dec2"]}, sensitivity_vs_linearity={})
    assert lsconfig.experiment_runs(cfg, "sensitivity_vs_linearity") == [{"model": "dec2", "pset": "core"}]
    cfg = _config(linearization={"enabled": False}, quantization={}, sensitivity_vs_linearity={})
    assert lsconfig.experiment_runs(cfg, "sensitivity_vs_linearity") == []
    assert not any("sensitivity_vs_linearity" in t for t in lsconfig.targets(cfg))
    cfg = _config(linearization={}, quantization={})  # not listed: not run
    assert not any("sensitivity_vs_linearity" in t for t in lsconfig.targets(cfg))


def test_parameters_reach_the_rules_and_bad_ones_are_named():
    cfg = _config(linearization={}, quantization={})
    params = lsconfig.experiment_params(cfg, "quantization")
    assert params["bits"] == [2, 3, 4, 6, 8] and params["group_size"] == 128 and params["seed"] == 0
    assert lsconfig.experiment_params(cfg, "linearization")["eps"] == [0.01, 0.03, 0.1, 0.3]
    with pytest.raises(lsconfig.ConfigError, match="config.experiments.quantization.bits"):
        _config(quantization={"bits": [1, 4]})
    with pytest.raises(lsconfig.ConfigError, match="config.experiments.linearization.perturb"):
        _config(linearization={"perturb": "some"})
    with pytest.raises(lsconfig.ConfigError, match="config.experiments.quantization.library_methods"):
        _config(quantization={"library_methods": ["awq"]})


# ---------------------------------------------------------------------------- a real run


PROMPTS = {"prompts": [
    {"id": "a1", "category": "story", "text": "Once upon a time, there was a little girl"},
    {"id": "a2", "category": "story", "text": "The dog ran to the"},
    {"id": "a3", "category": "animals", "text": "A big cat"},
    {"id": "a4", "category": "animals", "text": "Tom and Sue went to the park."},
]}


def _write_config(workdir, stories_dir, lin_extra=None):
    config = {
        "models": {"stories": {"source": {"type": "local", "path": str(stories_dir)}}},
        "prompt_sets": {"tiny": {"path": "prompts.json"}},
        "generation": {"max_new_tokens": 8, "batch_size": 4},
        "activations": {"batch_size": 4},
        "experiments": {
            "linearization": {"n_sequences": 2, "tokens_per_sequence": 1, "n_directions": 2, "power_iterations": 3,
                              **(lin_extra or {})},
            "quantization": {"bits": [2, 4, 8], "sensitivity_bits": 2, "group_size": 32, "max_prompts": 2,
                             "heldout_prompts": 2, "library_methods": ["nf4"]},
            "sensitivity_vs_linearity": {},
        },
    }
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, stories_dir):
    workdir = tmp_path_factory.mktemp("quantlin")
    (workdir / "prompts.json").write_text(json.dumps(PROMPTS))
    _write_config(workdir, stories_dir)
    # one core: these jobs are many small ops, which two OpenMP threads slow down on a loaded machine
    snakemake(workdir, "--cores", "1")
    return workdir


@pytest.mark.slow
def test_snakemake_runs_linearization_quantization_and_the_cross_rule(run_dir):
    base = run_dir / "results/stories/tiny"
    for name in ("linearization/summary.json", "linearization/metrics.parquet", "linearization/per_sample.parquet",
                 "linearization/per_token.parquet", "linearization/gap.png", "linearization/order.png",
                 "linearization/jacobian.png", "quantization/summary.json", "quantization/metrics.parquet",
                 "quantization/layers.png", "quantization/matrices.png", "quantization/mixed.png",
                 "sensitivity_vs_linearity/summary.json", "sensitivity_vs_linearity/metrics.parquet",
                 "sensitivity_vs_linearity/scatter.png"):
        assert (base / name).is_file(), name
    lin = json.loads((base / "linearization/summary.json").read_text())
    quant = json.loads((base / "quantization/summary.json").read_text())
    cross = json.loads((base / "sensitivity_vs_linearity/summary.json").read_text())
    assert len(lin["gap_by_layer"]) == 5 and lin["n_tokens"] == 2
    assert quant["weights_restored"] and set(quant["sensitivity"]) == {"2", "4", "8"}
    assert quant["library_methods"]["nf4"]["status"] == "skipped"
    log = (run_dir / "results/logs/quantization/stories_tiny.log").read_text()
    assert "skipping library method nf4" in log and "CUDA GPU" in log
    assert quant["mixed"]["split"] == "heldout"
    # the rule's ρ is the one computed from the two summaries
    from scipy.stats import spearmanr

    expected = spearmanr(lin["gap_by_layer"], quant["sensitivity"]["2"])[0]
    assert cross["spearman_rho"] == pytest.approx(expected)
    metrics = pd.read_parquet(base / "quantization/metrics.parquet")
    assert {"model", "prompt_set", "scope", "layer", "matrix", "bits", "metric", "value"} <= set(metrics.columns)
    report = (run_dir / "results/report/stories.md").read_text()
    assert "linearization" in report and "quantization" in report and "spearman_rho" in report


@pytest.mark.slow
def test_changing_a_linearization_parameter_reruns_it_the_rule_and_reports_only(run_dir, tmp_path, stories_dir):
    assert planned_jobs(run_dir) == []
    workdir = tmp_path / "w"
    shutil.copytree(run_dir, workdir, symlinks=True)
    _write_config(workdir, stories_dir, lin_extra={"n_directions": 3})
    jobs = Counter(rule for rule, _ in planned_jobs(workdir))
    assert jobs == Counter({"linearization": 1, "sensitivity_vs_linearity": 1, "model_report": 1,
                            "cross_model_report": 1, "report_index": 1})
