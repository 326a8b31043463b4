"""Layer repeat: the engine's repeat sweep against independent forwards; ratios, Spearman, summary."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from layerscope.engines.statistics import Bootstrap
from layerscope.engines.surgery import LossEvaluator, naive_losses, skip
from layerscope.experiments import registry
from layerscope.experiments.surgery.layer_repeat import (
    layer_repeat,
    layer_repeat_sweep,
    repeat,
    repeat_pair,
    spearman_rows,
)
from layerscope.jobs.writer import check_summary, run_experiment
from layerscope.model.adapter import load_model, load_tokenizer
from tests.helpers.surgery import Reference, reference_loss, shared_prefix_cache, token_cache
from tests.helpers.surgery_data import story_cache


@pytest.fixture(scope="module")
def story(stories, tmp_path_factory):
    adapter, tok = stories
    cache, completions = story_cache(adapter, tok, tmp_path_factory.mktemp("story"))
    return adapter, cache, completions


def test_sequences():
    assert repeat(5, 2, 3) == [0, 1, 2, 2, 2, 3, 4]
    assert repeat(5, 0, 2) == [0, 0, 1, 2, 3, 4] and repeat(5, 4, 2) == [0, 1, 2, 3, 4, 4]
    assert repeat(5, 3, 1) == list(range(5)) and repeat(5, 3, 0) == skip(5, 3)
    assert repeat_pair(5, 1) == [0, 1, 2, 1, 2, 3, 4] and repeat_pair(5, 3) == [0, 1, 2, 3, 4, 3, 4]
    with pytest.raises(ValueError):
        repeat_pair(5, 4)


def _plain_loop_loss(adapter, seqs, sequence):
    """Independent of both the engine and Hugging Face's layer list: embeddings, then the blocks called one
    after the other in ``sequence`` (each with the block inputs of the intact model), final norm, unembedding,
    cross-entropy on the completion tokens; one prompt at a time, float64 log-softmax."""
    nll = []
    with torch.no_grad():
        for seq in seqs:
            ids = torch.tensor([seq.ids])
            inputs = adapter.capture_block_inputs(ids, torch.ones_like(ids))
            state = inputs.resid0
            for block in sequence:
                state = adapter.run_block(block, state, inputs)
            logp = torch.log_softmax(adapter.readout(state)[0].double(), -1)
            nll += [-float(logp[t, seq.ids[t + 1]]) for t in range(len(seq.ids) - 1)
                    if seq.roles[t + 1] == "completion"]
    return float(np.mean(nll))


def test_repeat_losses_equal_naive_forwards_in_the_same_block_order(story):
    """(1) Prefix reuse, sharing and packing change nothing: every variant of the sweep equals the model's own
    forward with its layer list replaced (batched and one prompt at a time) and a plain loop over the blocks."""
    from layerscope.data.activations import sequences_from_completions

    adapter, cache, completions = story
    seqs = sequences_from_completions(completions)
    ev = LossEvaluator(adapter, cache, batch_size=4)
    sweep = layer_repeat_sweep(ev, repeats=(2, 3), pairs=True)
    n = 5
    variants = [repeat(n, i, r) for r in (2, 3) for i in range(n)] + [repeat_pair(n, i) for i in range(n - 1)]
    engine = list(sweep["repeat"].ravel()) + list(sweep["pair"])
    np.testing.assert_allclose(engine, naive_losses(ev, variants, batch_size=3), rtol=1e-5)
    np.testing.assert_allclose(sweep["skip"], naive_losses(ev, [skip(n, i) for i in range(n)]), rtol=1e-5)
    for sequence, loss in list(zip(variants, engine))[::3]:
        assert loss == pytest.approx(reference_loss(adapter, seqs, sequence), rel=1e-5)
        assert loss == pytest.approx(_plain_loop_loss(adapter, seqs, sequence), rel=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_repeat_sweep_equals_plain_reruns_across_families(family, tiny_dirs, tmp_path):
    """Packed rows with a shared prefix, cached starts and shared heads against padded re-runs from the
    embeddings (gemma2: alternating sliding-window layers, whose types follow the repeated block)."""
    adapter, tok = load_model(tiny_dirs[family]), load_tokenizer(tiny_dirs[family])
    cache, _ = shared_prefix_cache(adapter, tok, tmp_path)
    engine = layer_repeat_sweep(LossEvaluator(adapter, cache, batch_size=3), repeats=(2, 3))
    plain = layer_repeat_sweep(Reference(adapter, cache, batch_size=2), repeats=(2, 3))
    assert engine["baseline"] == pytest.approx(plain["baseline"], rel=1e-5)
    for key in ("skip", "repeat", "pair"):
        np.testing.assert_allclose(engine[key], plain[key], rtol=1e-5, atol=1e-6)


def test_applying_a_block_once_is_the_baseline_and_repeating_it_changes_the_loss(stories, tmp_path):
    """(2) r = 1 is the identity: ratio exactly 1; (3) r = 2 and 3, and every pair repeat, change the loss."""
    adapter, tok = stories
    cache, _ = token_cache(adapter, tok, tmp_path)
    ev = LossEvaluator(adapter, cache)
    sweep = layer_repeat_sweep(ev, repeats=(1, 2, 3), pairs=True)
    base = ev.baseline()
    assert sweep["baseline"] == base
    assert np.all(sweep["repeat"][0] == base)  # exactly, not approximately
    ratio = sweep["repeat"] / base
    assert np.all(ratio[0] == 1.0)
    assert np.all(np.abs(ratio[1:] - 1) > 1e-4)
    assert np.all(np.abs(sweep["pair"] / base - 1) > 1e-4)
    assert not np.allclose(ratio[1], ratio[2], rtol=1e-6)  # a third application is not the second
    # the per-prompt sums are what the pooled losses decompose into
    pp = sweep["per_prompt"]
    np.testing.assert_allclose(pp["repeat"].sum(0) / pp["counts"].sum(), sweep["repeat"], rtol=1e-12)
    np.testing.assert_allclose(pp["pair"].sum(0) / pp["counts"].sum(), sweep["pair"], rtol=1e-12)


def test_spearman_matches_scipy_on_the_produced_arrays(story):
    """(4) The point Spearman is scipy's on the summary's arrays; the batched one used on resamples is scipy's
    on each resample (ties included), and the interval is the percentile interval of those."""
    adapter, cache, _ = story
    ev = LossEvaluator(adapter, cache, batch_size=6)
    s = layer_repeat(ev, model="m", prompt_set="p", max_repeats=3, seed=2, n_boot=200).summary
    cost, skip_ratio = np.array(s["iteration_cost_by_layer"]), np.array(s["skip_ratio_by_layer"])
    assert s["repeat_vs_skip_spearman"] == pytest.approx(stats.spearmanr(cost, skip_ratio).statistic, abs=1e-12)
    for k in range(2):
        expected = stats.spearmanr(s["ratio_by_layer"][k], skip_ratio).statistic
        assert s["repeat_vs_skip_spearman_by_r"][k] == pytest.approx(expected, abs=1e-12)
    # the iteration cost is the geometric mean over r
    np.testing.assert_allclose(cost, np.sqrt(np.prod(s["ratio_by_layer"], axis=0)), rtol=1e-12)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 7)), rng.integers(0, 3, size=(40, 7)).astype(float)  # y has ties
    np.testing.assert_allclose(spearman_rows(x, y), [stats.spearmanr(a, b).statistic for a, b in zip(x, y)],
                               atol=1e-12)
    assert np.isnan(spearman_rows(np.ones((1, 5)), x[:1, :5]))[0]
    # the interval, from the same per-prompt sums through the shared bootstrap
    sweep = layer_repeat_sweep(ev, repeats=(2, 3))
    pp = sweep["per_prompt"]
    boot = Bootstrap(len(pp["counts"]), n_boot=200, seed=2)
    q, sk, b = (pp[k][boot.index] for k in ("repeat", "skip", "baseline"))
    total = b.sum(1)
    rho = [stats.spearmanr(np.exp(np.log(q[j].sum(0) / total[j]).mean(0)), sk[j].sum(0) / total[j]).statistic
           for j in range(200)]
    lo, hi = np.quantile(rho, [0.025, 0.975])
    assert s["repeat_vs_skip_spearman_ci"] == pytest.approx([min(lo, s["repeat_vs_skip_spearman"]),
                                                             max(hi, s["repeat_vs_skip_spearman"])], abs=1e-12)


def test_summary_passes_the_writer_and_the_experiment_writes_its_outputs(story, stories_dir, tmp_path):
    """(5) The summary passes check_summary; its numbers are the evaluator's pooled losses; the registered
    experiment run from the model folder and the cache writes the same summary."""
    from layerscope.engines.sampling import sample_cache_prompts

    adapter, cache, _ = story
    ids, sample = sample_cache_prompts(cache.tokens, 5, seed=1)
    ev = LossEvaluator(adapter, cache, batch_size=8, prompt_ids=ids)
    result = layer_repeat(ev, model="stories", prompt_set="s", max_repeats=3, tolerance_ratio=1.2, seed=1)
    s = result.summary
    exp = registry.get("layer_repeat")
    check_summary(exp, s)
    base = ev.baseline()
    assert s["baseline_loss"] == base
    assert s["ratio_by_layer"] == [[ev.loss(repeat(5, i, r)) / base for i in range(5)] for r in (2, 3)]
    assert s["skip_ratio_by_layer"] == [ev.loss(skip(5, i)) / base for i in range(5)]
    assert s["pair_ratio_by_layer"] == [ev.loss(repeat_pair(5, i)) / base for i in range(4)]
    assert s["repeats"] == [2, 3] and len(s["ratio_by_layer_ci"]) == 2 and len(s["ratio_by_layer_ci"][0]) == 5
    cost = s["iteration_cost_by_layer"]
    assert s["most_tolerant_layer"] == int(np.argmin(cost)) and s["least_tolerant_layer"] == int(np.argmax(cost))
    assert 0 <= s["most_tolerant_layer_stability"] <= 1
    upper = np.array([[hi for _, hi in row] for row in s["ratio_by_layer_ci"]])
    assert s["tolerant_layers"] == [i for i in range(5) if (upper[:, i] <= 1.2).all()]
    assert s["tolerant_layers_by_r"] == [[i for i in range(5) if upper[k, i] <= 1.2] for k in range(2)]
    cheaper = np.array(s["ratio_by_layer"][0]) < np.array(s["skip_ratio_by_layer"])
    assert s["repeat_cheaper_than_skip_fraction"] == pytest.approx(cheaper.mean())
    assert s["prompt_ids"] == sample["prompt_ids"] and s["n_prompts"] == 5 and s["n_tokens"] == ev.n_targets
    assert s["uncertainty"]["unit"] == "prompt" and s["uncertainty"]["n_units"] == 5
    table = result.metrics
    np.testing.assert_allclose(table.query("metric == 'ratio' and repeats == 3")["value"], s["ratio_by_layer"][1])
    assert (table["lo"] <= table["value"]).all() and (table["value"] <= table["hi"]).all()
    # a summary with a broken interval is refused (the check is not vacuous for the nested per-r lists)
    bad = json.loads(json.dumps(s))
    bad["ratio_by_layer_ci"][1][2] = [s["ratio_by_layer"][1][2] + 1, s["ratio_by_layer"][1][2] + 2]
    with pytest.raises(Exception, match="ratio_by_layer_ci"):
        check_summary(exp, bad)
    # the registered experiment, same parameters, writes it all
    outputs = {k: tmp_path / name for k, name in [("table_metrics", "metrics.parquet"), ("figure_ratio", "ratio.png"),
                                                  ("figure_scatter", "scatter.png"), ("summary", "summary.json")]}
    params = {"max_prompts": 5, "batch_size": 8, "layout": "auto", "dtype": "float32", "max_target_tokens": None,
              "max_repeats": 3, "pairs": True, "tolerance_ratio": 1.2, "seed": 1}
    run_experiment("layer_repeat", {"model": stories_dir, "resid": cache.directory / "resid.safetensors",
                                    "tokens": cache.directory / "tokens.parquet"}, outputs, params=params,
                   wildcards={"model": "stories", "pset": "s"})
    assert all(p.is_file() and p.stat().st_size > 0 for p in outputs.values())
    written = json.loads(outputs["summary"].read_text())
    assert written.pop("provenance")["experiment"] == "layer_repeat"
    assert written == json.loads(json.dumps(s))
    pd.testing.assert_frame_equal(pd.read_parquet(outputs["table_metrics"]), table)


def test_without_pairs_and_with_two_repeats(story, tmp_path):
    adapter, cache, _ = story
    ev = LossEvaluator(adapter, cache, batch_size=6)
    result = layer_repeat(ev, model="m", prompt_set="p", max_repeats=2, pairs=False, n_boot=100)
    s = result.summary
    check_summary(registry.get("layer_repeat"), s)
    assert s["repeats"] == [2] and not s["pairs"] and "pair_ratio_by_layer" not in s
    np.testing.assert_allclose(s["iteration_cost_by_layer"], s["ratio_by_layer"][0], rtol=1e-12)
    assert s["repeat_vs_skip_spearman"] == pytest.approx(s["repeat_vs_skip_spearman_by_r"][0], abs=1e-12)
    assert set(result.metrics["metric"]) == {"ratio", "loss", "skip_ratio", "skip_loss", "iteration_cost"}
    from layerscope.experiments.surgery.layer_repeat import plot_ratio

    plot_ratio(result, tmp_path / "ratio.png")
    assert (tmp_path / "ratio.png").stat().st_size > 0
