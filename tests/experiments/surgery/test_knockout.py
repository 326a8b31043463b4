"""Knockout sweep, pairwise synergy and causal tracing: against plain re-runs and Hugging Face's own forward."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from layerscope.model.adapter import load_model, load_tokenizer
from layerscope.experiments.surgery.knockout import knockout, knockout_sweep
from layerscope.engines.surgery import LossEvaluator, naive_losses, skip
from layerscope.engines.tracing import causal_trace, restored_probabilities, trace_prompts
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
    assert engine["baseline"] == pytest.approx(plain["baseline"], rel=1e-6)
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
    assert sweep["baseline"] == pytest.approx(baseline, rel=1e-6)
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


def test_every_knockout_changes_the_loss_and_the_summary_is_consistent(story, stories_dir, tmp_path):
    adapter, cache, _ = story
    ev = LossEvaluator(adapter, cache, batch_size=4, max_prompts=4)
    trace = causal_trace(adapter, cache, n_prompts=2, n_positions=4, noise_scale=3.0, seed=1)
    result = knockout(ev, model="stories", prompt_set="s", pairwise_top=4, top_synergy=3, trace=trace)
    s = result.summary
    ratio = np.array(s["ratio_by_layer"])
    assert len(ratio) == 5 and np.all(np.abs(ratio - 1) > 1e-3)
    assert s["most_critical_layer"] == int(np.argmax(ratio)) and s["min_ratio"] == pytest.approx(ratio.min())
    assert s["baseline_loss"] == pytest.approx(ev.baseline())
    assert len(result.pairs) == 6 and len(s["top_synergy_pairs"]) == 3
    best = result.pairs.sort_values("synergy", ascending=False).iloc[0]
    assert s["top_synergy_pairs"][0] == f"{int(best.layer_i)}+{int(best.layer_j)}"
    assert s["top_synergy"] == sorted(s["top_synergy"], reverse=True)
    assert s["n_prompts"] == 4 and s["n_tokens"] == ev.n_targets
    per_layer = result.metrics.query("metric == 'ratio'")
    np.testing.assert_allclose(per_layer["value"], ratio)
    # the registered experiment, run from the model folder and the cache with the same parameters, writes it all
    outputs = {k: tmp_path / name for k, name in [
        ("table_metrics", "metrics.parquet"), ("table_pairs", "pairs.parquet"), ("table_tracing", "tracing.parquet"),
        ("figure_ratio", "ratio.png"), ("figure_synergy", "synergy.png"), ("figure_tracing", "tracing.png"),
        ("summary", "summary.json")]}
    params = {"max_prompts": 4, "batch_size": 4, "layout": "auto", "dtype": "float32", "pairwise_top": 4,
              "top_synergy": 3, "trace_prompts": 2, "trace_positions": 4, "trace_noise": 3.0, "trace_samples": 1,
              "seed": 1}
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
                "trace_p_clean", "trace_peak_layer"):
        assert key in written


# ---------------------------------------------------------------------------- causal tracing


def _noise(prompt, d, scale, seed=0, samples=1):
    g = torch.Generator().manual_seed(seed)
    noise = torch.zeros((samples, len(prompt.ids), d), dtype=torch.float64)
    noise[:, prompt.noised] = scale * torch.randn((samples, len(prompt.noised), d), generator=g, dtype=torch.float64)
    return noise


def test_clean_probability_is_the_models_own(story):
    adapter, cache, _ = story
    for prompt in trace_prompts(cache, 3):
        with torch.no_grad():
            logits = adapter.model(torch.tensor([prompt.ids]), use_cache=False).logits[0, -1].double()
        expected = float(torch.softmax(logits, -1)[prompt.answer_id])
        p_clean, _, _ = restored_probabilities(adapter, cache, prompt, [[0]], _noise(prompt, 64, 0.0))
        assert p_clean == pytest.approx(expected, rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("layout", ["auto", "padded"])
def test_tracing_properties(story, layout):
    adapter, cache, _ = story
    prompt = trace_prompts(cache, 1)[0]
    T, L, d = len(prompt.ids), adapter.n_layers, adapter.facts.d_model
    sets = [[t] for t in range(T)] + [list(range(T))]
    # noise 0: corrupted = clean, every restoration gives the clean probability
    p_clean, p_corrupt, probs = restored_probabilities(adapter, cache, prompt, sets, _noise(prompt, d, 0.0),
                                                       layout=layout)
    assert p_corrupt == pytest.approx(p_clean, rel=1e-4)
    np.testing.assert_allclose(probs, p_clean, rtol=1e-4)
    # real noise
    p_clean, p_corrupt, probs = restored_probabilities(adapter, cache, prompt, sets, _noise(prompt, d, 5.0, samples=2),
                                                       layout=layout)
    assert abs(p_clean - p_corrupt) > 1e-3
    np.testing.assert_allclose(probs[:, -1], p_clean, rtol=1e-4)  # every position restored, at any layer
    np.testing.assert_allclose(probs[L, T - 1], p_clean, rtol=1e-4)  # resid.L at the answer position
    np.testing.assert_allclose(probs[L, : T - 1], p_corrupt, rtol=1e-6)  # resid.L elsewhere: nothing read
    first_noised = min(prompt.noised)
    assert first_noised > 0  # the template token before the prompt is never noised
    np.testing.assert_allclose(probs[:, :first_noised], p_corrupt, rtol=1e-4)  # before the noise: no effect
    if layout == "padded":  # the packed layout (shared untouched prefix computed once) gives the same numbers
        packed = restored_probabilities(adapter, cache, prompt, sets, _noise(prompt, d, 5.0, samples=2))
        assert packed[1] == pytest.approx(p_corrupt, rel=1e-4)
        np.testing.assert_allclose(packed[2], probs, rtol=1e-4, atol=1e-7)


def test_causal_trace_table_and_determinism(story):
    adapter, cache, _ = story
    a = causal_trace(adapter, cache, n_prompts=2, n_positions=5, noise_scale=3.0, seed=7)
    b = causal_trace(adapter, cache, n_prompts=2, n_positions=5, noise_scale=3.0, seed=7)
    c = causal_trace(adapter, cache, n_prompts=2, n_positions=5, noise_scale=3.0, seed=8)
    assert a.table.equals(b.table)
    assert not np.allclose(a.heatmap, c.heatmap)
    assert a.heatmap.shape == (adapter.n_layers + 1, 5) and a.offsets == [-4, -3, -2, -1, 0]
    assert set(a.table["prompt_id"]) == {"story-0", "story-1"}
    mean = a.table.groupby(["layer", "offset"])["p_restored"].mean().unstack()
    np.testing.assert_allclose(mean.to_numpy(), a.heatmap)
    assert a.noise_std == pytest.approx(3.0 * float(cache.resid(0).double().std()))
    s = a.summary()
    assert s["trace_peak_layer"] < adapter.n_layers and s["trace_peak_offset"] in a.offsets


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen3"])
def test_packed_tracing_with_a_shared_system_prefix_equals_padded(family, tiny_dirs, tmp_path):
    adapter, tok = load_model(tiny_dirs[family]), load_tokenizer(tiny_dirs[family])
    cache, _ = shared_prefix_cache(adapter, tok, tmp_path)
    packed = causal_trace(adapter, cache, n_prompts=3, n_positions=6, noise_scale=2.0, n_samples=2, seed=3)
    padded = causal_trace(adapter, cache, n_prompts=3, n_positions=6, noise_scale=2.0, n_samples=2, seed=3,
                          layout="padded")
    assert min(trace_prompts(cache, 1)[0].noised) == 7  # 7 untouched leading tokens, computed once when packed
    np.testing.assert_allclose(packed.table["p_restored"], padded.table["p_restored"], rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(packed.prompts["p_corrupt"], padded.prompts["p_corrupt"], rtol=1e-4)
