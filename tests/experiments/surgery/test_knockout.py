"""Knockout sweep and pairwise synergy: against plain re-runs and Hugging Face's own forward; intervals."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from layerscope.engines.sampling import sample_cache_prompts
from layerscope.model.adapter import load_model, load_tokenizer
from layerscope.experiments.surgery.knockout import knockout, knockout_sweep
from layerscope.engines.surgery import LossEvaluator, naive_losses, skip
from layerscope.jobs.writer import run_experiment
from tests.helpers.surgery_data import story_cache
from tests.helpers.surgery import Reference, reference_loss, shared_prefix_cache


@pytest.fixture(scope="module")
def story(stories, tmp_path_factory):
    adapter, tok = stories
    cache, completions = story_cache(adapter, tok, tmp_path_factory.mktemp("story"))
    return adapter, cache, completions


def _sequences(completions):
    from layerscope.data.activations import sequences_from_completions

    return sequences_from_completions(completions)


@pytest.mark.parametrize("family", ["stories", "llama", "qwen2", "gemma2", "gpt2", "gpt_neox"])
def test_knockout_sweep_equals_plain_reruns(family, stories_dir, tiny_dirs, tmp_path):
    folder = stories_dir if family == "stories" else tiny_dirs[family]
    adapter, tok = load_model(folder), load_tokenizer(folder)
    cache, seqs = shared_prefix_cache(adapter, tok, tmp_path)
    engine = knockout_sweep(LossEvaluator(adapter, cache, batch_size=3), pairwise_top=3)
    plain = knockout_sweep(Reference(adapter, cache, batch_size=2), pairwise_top=3)
    assert engine["baseline"] == pytest.approx(plain["baseline"], rel=1e-5)
    np.testing.assert_allclose(engine["single"], plain["single"], rtol=1e-5, atol=1e-6)
    assert engine["top"] == plain["top"]
    np.testing.assert_allclose(engine["pairs"][["loss", "synergy"]], plain["pairs"][["loss", "synergy"]],
                               rtol=1e-5, atol=1e-5)


def test_knockout_ratios_match_huggingface_forward_with_a_block_removed(story):
    """Second, independent computation: one prompt at a time through the model's own forward."""
    adapter, cache, completions = story
    seqs = _sequences(completions)
    ev = LossEvaluator(adapter, cache, batch_size=4)
    sweep = knockout_sweep(ev, pairwise_top=3)
    baseline = reference_loss(adapter, seqs, list(range(5)))
    assert sweep["baseline"] == pytest.approx(baseline, rel=1e-5)
    for i in range(5):
        expected = reference_loss(adapter, seqs, skip(5, i)) / baseline
        assert sweep["single"][i] / sweep["baseline"] == pytest.approx(expected, rel=1e-5)
    for row in sweep["pairs"].itertuples():
        loss = reference_loss(adapter, seqs, skip(5, row.layer_i, row.layer_j))
        assert row.loss == pytest.approx(loss, rel=1e-5)
        di = reference_loss(adapter, seqs, skip(5, row.layer_i)) - baseline
        dj = reference_loss(adapter, seqs, skip(5, row.layer_j)) - baseline
        assert row.synergy == pytest.approx(loss - baseline - di - dj, rel=1e-4, abs=1e-5)
    # the benchmark's naive baseline (batched, padded, logits everywhere) agrees too
    np.testing.assert_allclose(naive_losses(ev, [skip(5, i) for i in range(5)], batch_size=3), sweep["single"],
                               rtol=1e-5)


def _contains(ci, value, rel=0.0):
    lo, hi = ci
    assert np.isfinite(lo) and np.isfinite(hi)
    slack = rel * abs(value)
    assert lo - slack <= value <= hi + slack, (ci, value)


def test_every_knockout_changes_the_loss_and_the_summary_is_consistent(story, stories_dir, tmp_path):
    adapter, cache, _ = story
    ids, sample = sample_cache_prompts(cache.tokens, 4, seed=1)
    ev = LossEvaluator(adapter, cache, batch_size=4, prompt_ids=ids)
    result = knockout(ev, model="stories", prompt_set="s", pairwise_top=4, top_synergy=3, seed=1)
    s = result.summary
    ratio = np.array(s["ratio_by_layer"])
    assert len(ratio) == 5 and np.all(np.abs(ratio - 1) > 1e-3)
    assert s["most_critical_layer"] == int(np.argmax(ratio)) and s["min_ratio"] == pytest.approx(ratio.min())
    # the point values are the pooled losses, exactly as the evaluator gives them
    assert s["baseline_loss"] == ev.baseline()
    assert s["ratio_by_layer"] == [ev.loss(skip(5, i)) / ev.baseline() for i in range(5)]
    assert s["delta_by_layer"] == [ev.loss(skip(5, i)) - ev.baseline() for i in range(5)]
    assert len(result.pairs) == 6 and len(s["top_synergy_pairs"]) == 3
    best = result.pairs.sort_values("synergy", ascending=False).iloc[0]
    assert s["top_synergy_pairs"][0] == f"{int(best.layer_i)}+{int(best.layer_j)}" == s["top_synergy_pair"]
    assert s["top_synergy"] == sorted(s["top_synergy"], reverse=True)
    assert s["n_prompts"] == 4 and s["n_tokens"] == ev.n_targets
    assert s["prompt_ids"] == sample["prompt_ids"] and s["prompt_categories"] == {"park": 2, "story": 2}
    assert s["n_empty_completions"] == 0
    per_layer = result.metrics.query("metric == 'ratio'")
    np.testing.assert_allclose(per_layer["value"], ratio)
    # every interval is finite and contains its point value
    _contains(s["baseline_loss_ci"], s["baseline_loss"])
    for key in ("ratio_by_layer", "delta_by_layer"):
        assert len(s[f"{key}_ci"]) == 5
        for value, ci in zip(s[key], s[f"{key}_ci"]):
            _contains(ci, value)
    for key in ("min_ratio", "max_ratio", "max_delta"):
        _contains(s[f"{key}_ci"], s[key])
    for value, ci in zip(s["top_synergy"], s["top_synergy_ci"]):
        _contains(ci, value)
    for entry in s["synergy_pairs"]:
        for key in ("ratio", "delta", "synergy"):
            _contains(entry[f"{key}_ci"], entry[key])
    assert 0 <= s["most_critical_layer_stability"] <= 1 and 0 <= s["top_synergy_pair_stability"] <= 1
    assert s["uncertainty"]["unit"] == "prompt" and s["uncertainty"]["n_units"] == 4
    assert s["underpowered"] and any("only 4 prompts" in r for r in s["underpowered_reasons"])
    # the registered experiment, run from the model folder and the cache with the same parameters, writes it all
    outputs = {k: tmp_path / name for k, name in [
        ("table_metrics", "metrics.parquet"), ("table_pairs", "pairs.parquet"),
        ("figure_ratio", "ratio.png"), ("figure_synergy", "synergy.png"), ("summary", "summary.json")]}
    params = {"max_prompts": 4, "batch_size": 4, "layout": "auto", "dtype": "float32", "max_target_tokens": None,
              "pairwise_top": 4, "top_synergy": 3, "seed": 1}
    run_experiment("knockout", {"model": stories_dir, "resid": cache.directory / "resid.safetensors",
                                "tokens": cache.directory / "tokens.parquet"}, outputs, params=params,
                   wildcards={"model": "stories", "pset": "s"})
    for path in outputs.values():
        assert path.is_file() and path.stat().st_size > 0
    written = json.loads(outputs["summary"].read_text())
    assert written.pop("provenance")["experiment"] == "knockout"
    assert written == json.loads(json.dumps(s))
    pd.testing.assert_frame_equal(pd.read_parquet(outputs["table_pairs"]), result.pairs)
    for key in ("baseline_loss", "ratio_by_layer", "most_critical_layer", "min_ratio", "top_synergy_pairs",
                "baseline_loss_ci", "ratio_by_layer_ci", "min_ratio_ci", "most_critical_layer_stability",
                "delta_by_layer", "delta_by_layer_ci", "prompt_ids", "prompt_categories", "uncertainty"):
        assert key in written
    assert not any(key.startswith("trace") for key in written)  # causal tracing is its own experiment now


def test_knockout_intervals_are_a_bootstrap_over_prompts(story):
    """The interval of a loss resamples whole prompts (token-weighted mean of per-prompt sums), never tokens."""
    from layerscope.engines.statistics import Bootstrap, weighted_mean

    adapter, cache, _ = story
    ev = LossEvaluator(adapter, cache, batch_size=6)
    result = knockout(ev, model="stories", prompt_set="s", pairwise_top=0, seed=3, n_boot=400)
    s = result.summary
    # the same numbers from per-prompt sums and counts through the shared bootstrap
    baseline = ev.losses([list(range(5))], per_token=True)[0]
    _, b, c = ev.per_prompt(baseline)
    sums = np.stack([ev.per_prompt(ev.losses([skip(5, i)], per_token=True)[0])[1] for i in range(5)], axis=1)
    boot = Bootstrap(len(c), n_boot=400, seed=3)
    point, ci = boot.interval(b, c, statistic=weighted_mean)
    assert point == pytest.approx(s["baseline_loss"], rel=1e-12)
    assert s["baseline_loss_ci"] == pytest.approx(ci, rel=1e-12)
    _, ratio_ci = boot.interval(sums, b, statistic=lambda s_, b_: s_.sum(1) / b_.sum(1)[:, None])
    np.testing.assert_allclose(s["ratio_by_layer_ci"], ratio_ci, rtol=1e-12)
    # the prompts differ, so the intervals have width; a single prompt gives no spread and is flagged
    assert all(hi > lo for lo, hi in s["ratio_by_layer_ci"])
    assert s["uncertainty"]["n_units"] == 6 and s["uncertainty"]["n_boot"] == 400
    one = knockout(LossEvaluator(adapter, cache, prompt_ids=["story-0"]), model="m", prompt_set="p", pairwise_top=2)
    for r, (lo, hi) in zip(one.summary["ratio_by_layer"], one.summary["ratio_by_layer_ci"]):
        assert lo <= r <= hi and hi - lo <= 1e-12 * r  # no spread (up to the order of summation)
    assert one.summary["underpowered"]
    assert one.summary["most_critical_layer_stability"] == 1.0


def test_most_critical_layer_stability_counts_resamples_with_the_same_argmax(story):
    adapter, cache, _ = story
    ev = LossEvaluator(adapter, cache, batch_size=6)
    result = knockout(ev, model="stories", prompt_set="s", pairwise_top=0, seed=0, n_boot=300)
    s = result.summary
    from layerscope.engines.statistics import Bootstrap

    sums = np.stack([ev.per_prompt(ev.losses([skip(5, i)], per_token=True)[0])[1] for i in range(5)], axis=1)
    _, b, _ = ev.per_prompt(ev.losses([list(range(5))], per_token=True)[0])
    boot = Bootstrap(len(b), n_boot=300, seed=0)
    resampled = sums[boot.index].sum(1) / b[boot.index].sum(1)[:, None]
    expected = float(np.mean(resampled.argmax(1) == s["most_critical_layer"]))
    assert s["most_critical_layer_stability"] == pytest.approx(expected)
    flagged = any("most_critical_layer" in r for r in s["underpowered_reasons"])
    assert flagged == (expected < 0.8)
