"""Swap sweep, zones and position sensitivity."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from layerscope.model.adapter import load_model, load_tokenizer
from layerscope.engines.surgery import LossEvaluator, swap
from layerscope.experiments.surgery.swap import layer_ranges, swap_experiment, swap_matrix, zones
from layerscope.jobs.writer import run_experiment
from tests.helpers.surgery import Reference, reference_loss, shared_prefix_cache, token_cache


@pytest.mark.parametrize("family", ["stories", "llama", "qwen3", "gemma2", "gpt2", "phi3"])
def test_swap_matrix_equals_plain_reruns(family, stories_dir, tiny_dirs, tmp_path):
    folder = stories_dir if family == "stories" else tiny_dirs[family]
    adapter, tok = load_model(folder), load_tokenizer(folder)
    cache, seqs = shared_prefix_cache(adapter, tok, tmp_path)
    base, loss, ratio = swap_matrix(LossEvaluator(adapter, cache, batch_size=3))
    plain_base, plain_loss, _ = swap_matrix(Reference(adapter, cache, batch_size=2))
    assert base == pytest.approx(plain_base, rel=1e-5)
    np.testing.assert_allclose(loss, plain_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.diag(ratio), 1.0)
    np.testing.assert_allclose(loss, loss.T)
    L = adapter.n_layers
    assert loss[0, L - 1] == pytest.approx(reference_loss(adapter, seqs, swap(L, 0, L - 1)), rel=1e-5)


def test_swapping_a_block_with_itself_is_the_identity(stories, tmp_path):
    adapter, tok = stories
    cache, _ = token_cache(adapter, tok, tmp_path)
    ev = LossEvaluator(adapter, cache)
    base = ev.baseline()
    assert all(ev.loss(swap(5, i, i)) == base for i in range(5))
    assert all(ev.loss(swap(5, i, j)) != pytest.approx(base, rel=1e-4) for i in range(5) for j in range(i + 1, 5))


def test_zones_recover_planted_blocks():
    rng = np.random.default_rng(0)
    truth = np.array([0] * 4 + [1] * 5 + [2] * 3)
    n = len(truth)
    ratio = np.where(truth[:, None] == truth[None, :], 1.02, 3.0) + rng.uniform(0, 0.01, (n, n))
    ratio = (ratio + ratio.T) / 2
    np.fill_diagonal(ratio, 1.0)
    assert zones(ratio, 3).tolist() == truth.tolist()
    # numbered by depth whatever the cluster ids
    assert zones(ratio[::-1, ::-1], 3).tolist() == (2 - truth[::-1]).tolist()
    assert zones(ratio, 1).tolist() == [0] * n
    assert set(zones(ratio, 50)) == set(range(n))  # at most one zone per block


def test_layer_ranges():
    assert layer_ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert layer_ranges([3]) == "3" and layer_ranges([4, 3]) == "3-4"


def test_swap_experiment_summary_and_outputs(stories, stories_dir, tmp_path):
    adapter, tok = stories
    cache, _ = token_cache(adapter, tok, tmp_path / "cache")
    ev = LossEvaluator(adapter, cache)
    result = swap_experiment(ev, model="stories", prompt_set="p", interchangeable_ratio=1.5, n_zones=2)
    s = result.summary
    r = result.ratio
    pairs = [(i, j) for i in range(5) for j in range(i + 1, 5)]
    assert s["n_pairs"] == 10 and len(result.pairs) == 10
    # point values: the pooled losses exactly as the evaluator gives them
    base = ev.baseline()
    assert s["baseline_loss"] == base
    assert all(r[i, j] == ev.loss(swap(5, i, j)) / base for i, j in pairs)
    # interchangeable: the upper end of the ratio's interval is at most the threshold; the point count is kept apart
    ci = {(row.layer_i, row.layer_j): (row.ratio_lo, row.ratio_hi) for row in result.pairs.itertuples()}
    assert s["n_interchangeable"] == sum(ci[p][1] <= 1.5 for p in pairs)
    assert s["n_below_threshold_point"] == sum(r[i, j] < 1.5 for i, j in pairs)
    for (i, j), (lo, hi) in ci.items():
        assert np.isfinite(lo) and lo <= r[i, j] <= hi
    # position sensitivity: the geometric mean of the ratios over the partners
    sensitivity = [np.exp(np.mean([np.log(r[i, j]) for j in range(5) if j != i])) for i in range(5)]
    np.testing.assert_allclose(s["position_sensitivity"], sensitivity, rtol=1e-12)
    assert s["most_position_sensitive_layer"] == int(np.argmax(sensitivity))
    assert s["max_position_sensitivity"] == pytest.approx(max(sensitivity))
    for value, (lo, hi) in zip(s["position_sensitivity"], s["position_sensitivity_ci"]):
        assert lo <= value <= hi
    assert s["adjacent_mean_ratio"] == pytest.approx(np.mean([r[i, i + 1] for i in range(4)]))
    lo, hi = s["adjacent_mean_ratio_ci"]
    assert lo <= s["adjacent_mean_ratio"] <= hi and hi > lo
    cheapest = min(pairs, key=lambda p: r[p])
    assert s["cheapest_swap"] == f"{cheapest[0]}<->{cheapest[1]}" and s["cheapest_swap_ratio"] == pytest.approx(r[cheapest])
    assert s["cheapest_swap_ratio_ci"] == [*ci[cheapest]]
    assert s["n_zones"] == 2 and len(s["zones"]) == 2 and len(s["zone_of_layer"]) == 5
    assert 0 <= s["zones_stability"] <= 1
    covered = sorted(int(x) for zone in s["zones"] for part in zone.split(",")
                     for x in range(int(part.split("-")[0]), int(part.split("-")[-1]) + 1))
    assert covered == list(range(5))
    assert s["prompt_ids"] == [p.prompt_id for p in ev.prompts] and s["uncertainty"]["n_units"] == len(ev.prompts)
    # the registered experiment, run from the model folder and the cache with the same parameters, writes it all
    outputs = {k: tmp_path / name for k, name in [
        ("table_metrics", "metrics.parquet"), ("table_pairs", "pairs.parquet"), ("figure_cost_matrix", "cost_matrix.png"),
        ("figure_sensitivity", "sensitivity.png"), ("summary", "summary.json")]}
    params = {"max_prompts": None, "batch_size": 8, "layout": "auto", "dtype": "float32", "max_target_tokens": None,
              "interchangeable_ratio": 1.5, "n_zones": 2, "seed": 0}
    run_experiment("swap", {"model": stories_dir, "resid": cache.directory / "resid.safetensors",
                            "tokens": cache.directory / "tokens.parquet"}, outputs, params=params,
                   wildcards={"model": "stories", "pset": "p"})
    assert all(p.is_file() for p in outputs.values())
    written = json.loads(outputs["summary"].read_text())
    assert written.pop("provenance")["experiment"] == "swap"
    assert written == json.loads(json.dumps(s))
    pd.testing.assert_frame_equal(pd.read_parquet(outputs["table_pairs"]), result.pairs)
    for key in ("n_interchangeable", "zones", "most_position_sensitive_layer", "cheapest_swap", "adjacent_mean_ratio",
                "adjacent_mean_ratio_ci", "zones_stability", "position_sensitivity_ci", "prompt_ids", "uncertainty"):
        assert key in written


def test_a_pair_below_the_threshold_by_its_point_but_not_by_its_interval_is_not_interchangeable(stories, tmp_path):
    """The old count tested the point ratio against the threshold; the interval's upper end decides now."""
    adapter, tok = stories
    cache, _ = token_cache(adapter, tok, tmp_path / "cache")
    ev = LossEvaluator(adapter, cache)
    first = swap_experiment(ev, model="m", prompt_set="p", n_zones=2).pairs
    row = first.loc[first["ratio"].idxmin()]
    assert row.ratio_hi > row.ratio  # the prompts disagree, so the interval has width
    threshold = (row.ratio + row.ratio_hi) / 2  # above the point, below the interval's upper end
    result = swap_experiment(ev, model="m", prompt_set="p", interchangeable_ratio=threshold, n_zones=2)
    pairs = result.pairs.set_index(["layer_i", "layer_j"])
    assert not pairs.loc[(row.layer_i, row.layer_j), "interchangeable"]
    assert pairs.loc[(row.layer_i, row.layer_j), "below_threshold_point"]
    assert result.summary["n_below_threshold_point"] >= 1
    assert result.summary["n_interchangeable"] == int((result.pairs["ratio_hi"] <= threshold).sum())
    assert result.summary["n_interchangeable"] < result.summary["n_below_threshold_point"]


def test_position_sensitivity_is_the_geometric_mean_of_the_ratios():
    """The old arithmetic mean let one catastrophic partner outweigh every free swap."""
    from layerscope.experiments.surgery.swap import position_sensitivity

    ratio = np.ones((5, 5))
    ratio[0, 1] = ratio[1, 0] = 100.0  # blocks 0 and 1: one terrible swap (each other), free otherwise but with 2
    ratio[2, :] = ratio[:, 2] = 8.0  # block 2: costly with every partner
    ratio[2, 2] = 1.0
    s = position_sensitivity(ratio)
    assert s[0] == pytest.approx(800 ** (1 / 4)) and s[2] == pytest.approx(8.0) and s[3] == pytest.approx(8 ** 0.25)
    assert int(np.argmax(s)) == 2  # the arithmetic mean would pick block 0 (27.5 against 8)
    assert int(np.argmax([(ratio[i].sum() - 1) / 4 for i in range(5)])) == 0
    np.testing.assert_allclose(position_sensitivity(np.stack([ratio, ratio])), [s, s])


def test_zones_stability_is_the_fraction_of_resamples_with_the_point_segmentation(stories, tmp_path):
    from layerscope.engines.statistics import Bootstrap
    from layerscope.experiments.surgery.swap import ratio_matrices, swap_sweep

    adapter, tok = stories
    cache, _ = token_cache(adapter, tok, tmp_path / "cache")
    ev = LossEvaluator(adapter, cache)
    result = swap_experiment(ev, model="m", prompt_set="p", n_zones=2, seed=2, n_boot=200)
    sweep = swap_sweep(ev)
    q, b = sweep["per_prompt"]["pairs"], sweep["per_prompt"]["baseline"]
    boot = Bootstrap(len(b), n_boot=200, seed=2)
    matrices = ratio_matrices(q[boot.index], b[boot.index], 5)
    same = [zones(m, 2).tolist() == result.zone_of_layer.tolist() for m in matrices]
    assert result.summary["zones_stability"] == pytest.approx(np.mean(same))
    assert swap_experiment(ev, model="m", prompt_set="p", n_zones=1, n_boot=50).summary["zones_stability"] == 1.0
