"""The logit lens: exact at the last layer, equal to a plain per-token computation elsewhere."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from layerscope.data.activations import ActivationCache, TokenSequence, extract_activations
from layerscope.model.adapter import load_model, load_tokenizer
from layerscope.experiments.lens.logit_lens import (
    TOKEN_QUANTITIES, first_true, lens_arrays, logit_lens, stays_true_from,
)
from layerscope.engines.phases import segment, select_segments
from layerscope.engines.statistics import Bootstrap
from tests.helpers.tiny_models import tiny_configs

DECODERS = [f for f in tiny_configs() if f != "bert"]


def _random_cache(adapter, tok, folder, seed=0, n=4, empty=()):
    """A cache of random token sequences whose second half is marked as completion.

    Sequences whose index is in ``empty`` have no completion (the model stopped at once).
    """
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for i in range(n):
        length = 9 + 3 * i
        ids = torch.randint(3, adapter.facts.vocab_size, (length,), generator=g).tolist()
        n_completion = 0 if i in empty else length - length // 2
        roles = ["prompt"] * (length - n_completion) + ["completion"] * n_completion
        seqs.append(TokenSequence(f"s{i}", "even" if i % 2 == 0 else "odd", ids, roles))
    extract_activations(adapter, tok, seqs, folder / "resid.safetensors", folder / "tokens.parquet", batch_size=3)
    return ActivationCache(folder), seqs


def _tol(logits):
    """Agreement of float32 logits computed along two code paths (rel ~1e-5 of their scale)."""
    return 1e-5 * (1.0 + float(logits.abs().max()))


def _model_logits(adapter, cache, seqs):
    """The model's own next-token logits at every target position, by plain forwards."""
    rows = []
    with torch.no_grad():
        for seq in seqs:
            logits = adapter.model(torch.tensor([seq.ids])).logits[0]
            targets = [t for t in range(len(seq.ids) - 1) if seq.roles[t + 1] == "completion"]
            rows.append(logits[targets])
    return torch.cat(rows)


@pytest.mark.parametrize("family", ["stories", *DECODERS])
def test_lens_at_the_last_layer_is_the_models_output(family, stories_dir, tiny_dirs, tmp_path):
    folder = stories_dir if family == "stories" else tiny_dirs[family]
    adapter, tok = load_model(folder), load_tokenizer(folder)
    cache, seqs = _random_cache(adapter, tok, tmp_path)
    arrays = lens_arrays(adapter, cache, chunk_tokens=5)
    logits = _model_logits(adapter, cache, seqs)
    L = adapter.n_layers
    top1 = arrays.final_top1
    # the cache and a plain forward are two float32 paths: the top-1 may differ only at a float32 tie
    assert (top1 == logits.argmax(-1).numpy()).mean() > 0.9
    chosen = logits[torch.arange(len(top1)), torch.as_tensor(top1)]
    np.testing.assert_allclose(chosen, logits.max(-1).values, rtol=1e-5, atol=_tol(logits))
    assert arrays.top1_match[L].all() and (arrays.rank[L] == 0).all()
    np.testing.assert_allclose(arrays.kl[L], 0, atol=1e-6)
    probs = torch.softmax(logits.double(), -1)
    np.testing.assert_allclose(arrays.prob[L], probs[torch.arange(len(top1)), top1].numpy(), rtol=1e-4, atol=1e-6)
    entropy = -(probs * probs.clamp_min(1e-300).log()).sum(-1).numpy()
    np.testing.assert_allclose(arrays.entropy[L], entropy, rtol=1e-4, atol=1e-5)


def test_intermediate_layers_match_a_plain_computation(stories, tmp_path):
    """Every metric at every layer, recomputed token by token from the model's own hidden states."""
    adapter, tok = stories
    cache, seqs = _random_cache(adapter, tok, tmp_path, seed=3)
    arrays = lens_arrays(adapter, cache, chunk_tokens=7)
    column = 0
    with torch.no_grad():
        for seq in seqs:
            out = adapter.model(torch.tensor([seq.ids]), output_hidden_states=True)
            head = adapter.model.lm_head
            norm = adapter.model.model.norm
            for t in range(len(seq.ids) - 1):
                if seq.roles[t + 1] != "completion":
                    continue
                final = out.logits[0, t].double()
                target = int(arrays.final_top1[column])
                assert final[target] >= final.max() - _tol(final)  # the final top-1, up to a float32 tie
                p_final = torch.softmax(final, -1)
                for layer in range(adapter.n_layers):
                    logits = head(norm(out.hidden_states[layer][0, t])).double()
                    logp = torch.log_softmax(logits, -1)
                    tol = _tol(logits)
                    if arrays.top1_match[layer, column] != (int(logits.argmax()) == target):
                        assert logits.max() - logits[target] <= tol  # only a float32 tie may differ
                    # the rank, up to logits within float32 agreement of the target's
                    assert int((logits > logits[target] + tol).sum()) <= arrays.rank[layer, column]
                    assert arrays.rank[layer, column] <= int((logits > logits[target] - tol).sum())
                    assert arrays.prob[layer, column] == pytest.approx(float(logp[target].exp()), rel=1e-4, abs=1e-7)
                    kl = float((p_final * (torch.log_softmax(final, -1) - logp)).sum())
                    assert arrays.kl[layer, column] == pytest.approx(kl, rel=1e-4, abs=1e-5)
                column += 1
    assert column == arrays.top1_match.shape[1]


def test_first_and_crystallization_layers():
    match = np.array([
        # token: 0      1      2      3
        [False, True, False, False],  # layer 0
        [True, True, False, False],  # layer 1
        [False, True, True, False],  # layer 2
        [True, True, True, True],  # layer 3
    ])
    np.testing.assert_array_equal(first_true(match), [1, 0, 2, 3])
    np.testing.assert_array_equal(stays_true_from(match), [3, 0, 2, 3])
    # a plain loop agrees on random masks
    rng = np.random.default_rng(0)
    masks = rng.random((7, 50)) < 0.6
    masks[-1] = True
    for j in range(50):
        col = masks[:, j]
        assert first_true(masks)[j] == next(i for i in range(7) if col[i])
        assert stays_true_from(masks)[j] == next(i for i in range(7) if col[i:].all())


def test_segmentation_recovers_planted_phases():
    rng = np.random.default_rng(1)
    levels = np.repeat([0.0, 3.0, -2.0, 5.0], [6, 9, 4, 8])
    curves = np.column_stack([levels + 0.05 * rng.standard_normal(27), -levels + 0.05 * rng.standard_normal(27)])
    assert segment(curves, 4) == [6, 15, 19]
    assert segment(curves, 1) == []
    assert segment(curves[:3], 10) == [1, 2]
    chosen = select_segments(curves, 5)  # the number is chosen, not given
    assert (chosen.n_segments, chosen.boundaries) == (4, [6, 15, 19])
    assert len(chosen.bic) == 5 and int(np.argmin(chosen.bic)) == 3


@pytest.mark.parametrize("seed", range(5))
def test_the_number_of_phases_is_chosen_by_bic_not_fixed(seed):
    """Two true segments plus noise: BIC picks 2 of at most 4 (the old code always returned 4)."""
    rng = np.random.default_rng(seed)
    levels = np.repeat([0.0, 1.0], [5, 7])
    curves = np.column_stack([levels + 0.15 * rng.standard_normal(12) for _ in range(3)])
    chosen = select_segments(curves, 4)
    assert chosen.n_segments == 2 and chosen.boundaries == [5]
    assert chosen.max_segments == 4 and len(chosen.bic) == len(chosen.rss) == 4
    assert len(segment(curves, 4)) == 3  # a fixed k = 4 always finds 4 segments
    # pure noise: one phase
    assert select_segments(rng.standard_normal((12, 3)), 4).n_segments == 1
    # an exactly piecewise-constant curve: RSS 0 must not make a larger k win
    exact = select_segments(np.column_stack([levels, 2 * levels]), 4)
    assert (exact.n_segments, exact.boundaries) == (2, [5])


def test_the_number_of_phases_is_capped_by_the_data():
    curves = np.random.default_rng(0).standard_normal((4, 1)).cumsum(0)
    chosen = select_segments(curves, 10)
    assert len(chosen.bic) < 4  # fewer segments than layers, and fewer parameters than points
    assert select_segments(np.ones((6, 2)), 4).n_segments == 1  # constant curves: nothing to cut


def test_logit_lens_summary(stories, tmp_path):
    adapter, tok = stories
    cache, _ = _random_cache(adapter, tok, tmp_path, n=6)
    result = logit_lens(adapter, cache, model="m", prompt_set="p", topk=5, max_phases=3, chunk_tokens=16)
    s = result.summary
    for key in ("crystallization_mean", "first_top1_mean", "gap_mean", "n_tokens", "n_layers", "phase_boundaries"):
        assert key in s
    assert s["n_tokens"] == len(cache.target_rows()) and s["n_layers"] == 5
    assert s["gap_mean"] == pytest.approx(s["crystallization_mean"] - s["first_top1_mean"])
    assert 0 <= s["first_top1_mean"] <= s["crystallization_mean"] <= 5
    assert s["crystallization_topk_mean"] <= s["crystallization_mean"]
    assert set(s["by_category"]) == {"even", "odd"}
    assert s["max_phases"] == 3 and 1 <= s["n_phases"] <= 3 and len(s["phases"]) == s["n_phases"]
    assert len(s["phase_boundaries"]) == s["n_phases"] - 1 and len(s["phases_bic"]) <= 3
    assert s["n_phases"] == int(np.argmin(s["phases_bic"])) + 1
    assert 0 <= s["phases_stability"] <= s["n_phases_stability"] <= 1
    per_layer = result.metrics.query("view == 'all' and category == 'all' and metric == 'top1_agreement'")
    assert per_layer["layer"].tolist() == list(range(6)) and per_layer["value"].iloc[-1] == 1.0


def test_lens_means_are_token_means_with_a_bootstrap_over_prompts(stories, tmp_path):
    """Point values are the plain means over tokens; intervals resample prompts, not tokens."""
    adapter, tok = stories
    cache, _ = _random_cache(adapter, tok, tmp_path, n=7, empty=(2,))
    result = logit_lens(adapter, cache, model="m", prompt_set="p", topk=5, max_phases=3, seed=3, n_boot=200)
    s, table = result.summary, result.per_token
    assert s["uncertainty"] == {"unit": "prompt", "n_units": 6, "n_boot": 200, "level": 0.95,
                                "method": "percentile bootstrap over units"}
    # the prompt without a completion is left out and counted, never a NaN
    assert s["n_empty_completions"] == 1 and s["n_prompts"] == 6 and "s2" not in set(table["prompt_id"])
    assert s["prompt_categories"] == {"even": 3, "odd": 3}
    boot = Bootstrap(6, n_boot=200, seed=3)
    ids = list(dict.fromkeys(table["prompt_id"]))
    for quantity in TOKEN_QUANTITIES:
        assert s[f"{quantity}_mean"] == table[quantity].mean()  # exactly the old per-token mean
        lo, hi = s[f"{quantity}_mean_ci"]
        assert np.isfinite([lo, hi]).all() and lo <= s[f"{quantity}_mean"] <= hi
        # the same interval from a resample of whole prompts (each prompt's sum and token count)
        grouped = table.groupby("prompt_id", sort=False)[quantity].agg(["sum", "count"]).loc[ids]
        sums, counts = grouped["sum"].to_numpy(float)[boot.index], grouped["count"].to_numpy(float)[boot.index]
        values = sums.sum(1) / counts.sum(1)
        np.testing.assert_allclose([lo, hi], [min(np.quantile(values, 0.025), s[f"{quantity}_mean"]),
                                              max(np.quantile(values, 0.975), s[f"{quantity}_mean"])], rtol=1e-12)
    first = table[table["target_index"] == 0]
    assert s["first_token"]["n_tokens"] == 6 and s["first_token"]["gap_mean"] == first["gap"].mean()
    for category, stats in s["by_category"].items():
        part = table[table["category"] == category]
        assert stats["n_prompts"] == 3 and stats["crystallization_mean"] == part["crystallization"].mean()
        assert stats["underpowered"]  # 3 prompts cannot carry an interval
        assert stats["crystallization_mean_ci"][0] <= stats["crystallization_mean"] <= stats["crystallization_mean_ci"][1]
    assert s["crystallization_mean_frac"] == table["crystallization"].mean() / 5
    assert s["greedy_agreement"] == (table["final_top1"] == table["target_id"]).mean()
    # per-layer curves: bands that contain the curve
    m = result.metrics
    assert np.isfinite(m[["ci_lo", "ci_hi"]].to_numpy()).all()
    assert ((m["ci_lo"] <= m["value"]) & (m["value"] <= m["ci_hi"])).all()
    assert s["final_entropy_mean_ci"][0] <= s["final_entropy_mean"] <= s["final_entropy_mean_ci"][1]
    assert s["underpowered"] is bool(s["underpowered_reasons"])


def test_lens_figures_draw(stories, tmp_path):
    from layerscope.experiments.lens.logit_lens import plot_categories, plot_crystallization, plot_curves

    adapter, tok = stories
    cache, _ = _random_cache(adapter, tok, tmp_path, n=5)
    result = logit_lens(adapter, cache, model="m", prompt_set="p", topk=5, n_boot=50)
    for plot in (plot_curves, plot_categories, plot_crystallization):
        plot(result, tmp_path / f"{plot.__name__}.png")
        assert (tmp_path / f"{plot.__name__}.png").stat().st_size > 0


@pytest.mark.parametrize("params, expected", [({"max_phases": 2}, 2), ({"max_phases": 3}, 3)])
def test_run_reads_max_phases(params, expected, stories, stories_dir, tmp_path):
    from layerscope.jobs.writer import run_experiment

    adapter, tok = stories
    _random_cache(adapter, tok, tmp_path, n=5)
    out = {"summary": tmp_path / "summary.json", "table_metrics": tmp_path / "m.parquet",
           "table_per_token": tmp_path / "t.parquet", **{f"figure_{f}": tmp_path / f"{f}.png"
                                                         for f in ("curves", "categories", "crystallization")}}
    inputs = {"model": str(stories_dir), "resid": str(tmp_path / "resid.safetensors"),
              "tokens": str(tmp_path / "tokens.parquet")}
    summary = run_experiment("logit_lens", inputs, out, params={"topk": 5, "chunk_tokens": 64, "seed": 0, **params},
                             wildcards={"model": "stories", "pset": "p"}).summary
    assert summary["max_phases"] == expected and summary["n_phases"] <= expected
