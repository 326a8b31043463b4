"""The z_subspace suite's samples, nulls and intervals (issue 13).

Each test would have failed on the definitions before it: the first N pairs of the file, a
single random subspace as "the" control, a leave-one-out R² maximised over the grid it chose
the ridge strength on, a patching verdict read off point rates of four pairs.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from layerscope.engines import statistics as st


# ---------------------------------------------------------------------------- synthetic inputs


class FakeStates:
    """What the analyses read from :class:`PairedStates`: pooled states per layer, [L + 1, N, d] each."""

    def __init__(self, zh: torch.Tensor, en: torch.Tensor):
        self.zh, self.en = zh.double(), en.double()
        n_layers, self.n_pairs, d = zh.shape[0] - 1, zh.shape[1], zh.shape[2]
        self.cache = SimpleNamespace(n_layers=n_layers, d_model=d, directory="synthetic")
        ids = [f"p{i}" for i in range(self.n_pairs)]
        self.sample = {"prompt_ids": ids, "prompt_categories": {"c": self.n_pairs}, "n_pairs_available": self.n_pairs}

    def pooled(self, layer, pooling="mean"):
        assert pooling == "mean"
        return self.zh[layer], self.en[layer]

    def pooled_all_layers(self):
        return self.zh, self.en


def _mask(bases: dict, d: int, n_layers: int):
    from layerscope.experiments.z_subspace.z_mask import ZMask

    layers = sorted({layer for layer, _ in bases})
    ks = sorted({k for _, k in bases})
    return ZMask(layers, ks, d, n_layers, bases, dict(bases))


def _basis(d, k, seed):
    return torch.from_numpy(np.ascontiguousarray(st.random_subspaces(d, k, 1, seed=seed)[0].T))


# ---------------------------------------------------------------------------- the pair sample


def _pairs_file(tmp_path, categories):
    prompts = []
    for i, cat in enumerate(categories):
        for lang in ("en", "zh"):
            prompts.append({"id": f"q{i}-{lang}", "category": cat, "pair": f"q{i}", "lang": lang, "answer": i,
                            "text": f"problem {i} ({lang})"})
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps({"prompts": prompts}))
    return path, [p["id"] for p in prompts]


def test_a_pair_sample_is_stratified_by_category_not_the_first_n(tmp_path, monkeypatch):
    """The file lists three 'a' pairs then three 'b' pairs: the first two pairs would be all 'a'."""
    import layerscope.data.paired_states as ps

    path, ids = _pairs_file(tmp_path, ["a", "a", "a", "b", "b", "b"])
    tokens = pd.DataFrame([{"prompt_id": pid, "role": "prompt", "position": 0, "row": r} for r, pid in enumerate(ids)])
    monkeypatch.setattr(ps, "ActivationCache", lambda directory: SimpleNamespace(tokens=tokens, directory=directory))
    samples = set()
    for seed in range(6):
        states = ps.PairedStates.open(tmp_path, path, max_pairs=2, seed=seed)
        assert [p.category for p in states.pairs] == ["a", "b"]
        assert states.sample["prompt_categories"] == {"a": 1, "b": 1}
        assert states.sample["prompt_ids"] == [p.pair for p in states.pairs]
        assert states.sample["n_pairs_available"] == 6
        assert set(states.rows) == {h.id for p in states.pairs for h in (p.zh, p.en)}
        samples.add(tuple(states.sample["prompt_ids"]))
    assert len(samples) > 1  # the seed decides which pairs, inside each category
    again = ps.PairedStates.open(tmp_path, path, max_pairs=2, seed=3)
    assert again.sample == ps.PairedStates.open(tmp_path, path, max_pairs=2, seed=3).sample
    every = ps.PairedStates.open(tmp_path, path)
    assert every.n_pairs == 6 and every.sample["prompt_categories"] == {"a": 3, "b": 3}


# ---------------------------------------------------------------------------- random-subspace draws


def test_reduced_random_projections_are_exact_and_haar_distributed():
    from layerscope.experiments.z_subspace.subspace_null import projections_from, random_projections, span_coordinates

    rng = np.random.default_rng(0)
    d, k = 40, 6
    rows = rng.standard_normal((9, 3)) @ rng.standard_normal((3, d))  # 9 vectors in a 3-dimensional span
    coords = span_coordinates(rows)
    assert coords.shape == (9, 3)
    np.testing.assert_allclose(coords @ coords.T, rows @ rows.T, rtol=1e-10, atol=1e-9)
    # for a given Gaussian G the reduced formula is exactly the projection on the QR basis of G
    basis = rows.T @ coords @ np.linalg.inv(coords.T @ coords)  # U with rows = coords Uᵀ
    np.testing.assert_allclose(basis.T @ basis, np.eye(3), atol=1e-9)
    np.testing.assert_allclose(coords @ basis.T, rows, atol=1e-9)
    g = rng.standard_normal((d, k))
    g1 = (basis.T @ g)[None]
    w = (g.T @ g - g1[0].T @ g1[0])[None]
    q, _ = np.linalg.qr(g)
    got = projections_from(coords, g1, w)[0]
    np.testing.assert_allclose(got @ got.T, (rows @ q) @ (rows @ q).T, atol=1e-9)
    # the share ‖Qᵀx‖²/‖x‖² of a fixed vector in a Haar-random k-subspace is Beta(k/2, (d − k)/2)
    x = rows[:1]
    share = np.concatenate([(p**2).sum(-1)[:, 0] for p in random_projections(x, d, k, 3000, seed=1)]) / (x**2).sum()
    assert stats.kstest(share, stats.beta(k / 2, (d - k) / 2).cdf).pvalue > 0.01
    reference = ((x @ st.random_subspaces(d, k, 3000, seed=2)) ** 2).sum(-1)[:, 0] / (x**2).sum()
    assert stats.ks_2samp(share, reference).pvalue > 0.01
    # seeded and independent of the chunk size only through the seed: same seed, same draws
    a = np.concatenate(list(random_projections(rows, d, k, 50, seed=5, key=(1, 2))))
    b = np.concatenate(list(random_projections(rows, d, k, 50, seed=5, key=(1, 2))))
    assert np.array_equal(a, b) and a.shape == (50, 9, k)


# ---------------------------------------------------------------------------- z_separation


def _language_planted(n=24, d=48, k=4, seed=0):
    """Pooled states whose zh − en differences lie (almost) in one k-subspace S."""
    g = torch.Generator().manual_seed(seed)
    s = _basis(d, k, 1000 + seed)
    content = torch.randn(n, d, generator=g, dtype=torch.float64)
    lang = 3.0 * torch.randn(n, k, generator=g, dtype=torch.float64) @ s
    zh = content + lang / 2 + 0.05 * torch.randn(n, d, generator=g, dtype=torch.float64)
    en = content - lang / 2
    return zh[None].expand(2, -1, -1), en[None].expand(2, -1, -1), s


def test_separation_null_puts_a_planted_subspace_on_top_and_a_random_one_inside():
    from layerscope.experiments.z_subspace.z_separation import z_separation

    d, k = 48, 4
    zh, en, planted = _language_planted(d=d, k=k)
    states = FakeStates(zh, en)
    result = z_separation(states, _mask({(0, k): planted}, d, 1), model="m", prompt_set="p", n_random_subspaces=500)
    s = result.summary
    assert s["language_energy_z_percentile"] == [100.0]
    assert s["language_energy_z_p_value"][0] == pytest.approx(2 / 501)
    assert s["n_combos_language_energy_z_above_null"] == 1
    lo, hi = s["language_energy_z_over_chance_ci"][0]
    assert lo <= s["language_energy_z_over_chance"][0] <= hi and lo > 5  # ≈ d/k = 12, far above chance
    # random subspaces in the role of Z: each is one more draw from the null, so its percentile is
    # uniform — mid-null on average, and "significant" about 5 % of the time, as a null should be
    percentiles, pvalues = {"language_energy": [], "separation_ratio": []}, []
    for seed in range(24):
        z = _basis(d, k, 500 + seed)
        out = z_separation(states, _mask({(0, k): z}, d, 1), model="m", prompt_set="p", n_random_subspaces=300,
                           seed=seed).summary
        for metric in percentiles:
            percentiles[metric].append(out[f"{metric}_z_percentile"][0])
            pvalues.append(out[f"{metric}_z_p_value"][0])
    for values in percentiles.values():
        assert 30 < np.mean(values) < 70 and stats.kstest(np.array(values) / 100, "uniform").pvalue > 0.01
    assert np.mean(np.array(pvalues) < 0.05) <= 0.15
    # the old single random draw is gone: the control is the null's mean and range
    row = s["by_combo"][0]
    assert "separation_ratio_random" not in row and row["language_energy_null_range"][0] < row["language_energy_null_mean"]


def test_resampled_separation_ratio_is_the_ratio_on_the_sample_and_skips_self_pairs():
    from layerscope.experiments.z_subspace.z_separation import resampled_separation_ratio, separation_ratio

    g = torch.Generator().manual_seed(0)
    zh, en = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64)
    dist = torch.cdist(zh, en).numpy()
    assert resampled_separation_ratio(dist, np.arange(6)[None])[0] == pytest.approx(separation_ratio(zh, en), rel=1e-12)
    idx = np.array([[0, 0, 3, 3, 5, 1]])
    sub = [0, 3, 5, 1]  # the distinct pairs: self-pairs of repeated units are not "other problems"
    paired = dist[idx[0], idx[0]].mean()
    off = np.mean([dist[a, b] for a in idx[0] for b in idx[0] if a != b])
    assert resampled_separation_ratio(dist, idx)[0] == pytest.approx(paired / off)
    assert set(sub) == set(idx[0])


# ---------------------------------------------------------------------------- update_decomposition


def test_update_null_finds_a_planted_block_and_nothing_in_a_random_basis():
    from layerscope.experiments.z_subspace.update_decomposition import update_decomposition

    n, d, k, n_layers = 20, 48, 4, 4
    g = torch.Generator().manual_seed(0)
    s = _basis(d, k, 77)
    steps = torch.randn(n_layers, 2, n, d, generator=g, dtype=torch.float64)
    steps[2] = 0.2 * steps[2] + 2.0 * torch.randn(2, n, k, generator=g, dtype=torch.float64) @ s  # block 2 writes in S
    start = torch.randn(2, n, d, generator=g, dtype=torch.float64)
    states_all = torch.cat([start[None], start[None] + steps.cumsum(0)])  # [L + 1, 2, N, d]
    states = FakeStates(states_all[:, 0], states_all[:, 1])
    out = update_decomposition(states, _mask({(0, k): s}, d, n_layers), model="m", prompt_set="p",
                               n_random_subspaces=400).summary
    row = out["by_combo"][0]
    assert row["transitions_above_null"] == [2] and out["peak_transition"] == [2]
    assert row["ratio_percentile_by_transition"][2] == 100.0 and out["peak_transition_stability"] == [1.0]
    lo, hi = out["peak_ratio_over_chance_ci"][0]
    assert lo <= out["peak_ratio_over_chance"][0] <= hi and lo > 3
    assert not any("Holm" in r for r in out["underpowered_reasons"])  # 400 draws suffice for 4 transitions
    # random bases in the role of Z sit inside the null: uniform percentiles, few Holm-significant blocks
    hits, overall, by_block = 0, [], []
    for seed in range(24):
        z = _basis(d, k, 500 + seed)
        res = update_decomposition(states, _mask({(0, k): z}, d, n_layers), model="m", prompt_set="p",
                                   n_random_subspaces=200, seed=seed).summary["by_combo"][0]
        hits += res["n_transitions_above_null"] + res["n_transitions_below_null"]
        overall.append(res["mean_ratio_percentile"])
        by_block += res["ratio_percentile_by_transition"]
    for values in (overall, by_block):
        assert 30 < np.mean(values) < 70 and stats.kstest(np.array(values) / 100, "uniform").pvalue > 0.01
    assert hits <= 3  # family-wise 5 % per basis over 24 bases
    few = update_decomposition(states, _mask({(0, k): s}, d, n_layers), model="m", prompt_set="p",
                               n_random_subspaces=100).summary
    assert any("Holm" in r for r in few["underpowered_reasons"])  # 2·4/101 ≥ 0.05: cannot be significant


# ---------------------------------------------------------------------------- bridge


def test_nested_loo_weights_equal_explicit_refits():
    from layerscope.experiments.z_subspace.bridge import (NestedLoo, derangements, loo_predictions,
                                                          nested_loo_predictions, nested_r2)

    rng = np.random.default_rng(3)
    grid = [0, 0.01, 0.3, 3]
    for intercept in (True, False):
        for n, k in ((9, 3), (8, 12)):  # over- and underdetermined
            x = rng.standard_normal((n, k))
            y = 0.5 * x @ rng.standard_normal((k, k)) + rng.standard_normal((n, k))
            loo = NestedLoo.build(x, grid, intercept=intercept)
            for g, alpha in enumerate(grid):
                np.testing.assert_allclose(loo.plain_predictions(y)[g], loo_predictions(x, y, alpha, intercept=intercept),
                                           atol=1e-9)
            pred, chosen = loo.nested_predictions(y[None])
            ref, ref_alpha = nested_loo_predictions(x, y, grid, intercept=intercept)
            np.testing.assert_allclose(pred[0], ref, atol=1e-9)
            assert [grid[c] for c in chosen[0]] == ref_alpha
            perms = np.vstack([np.arange(n)[None], derangements(n, 20, 0)])
            gram = y @ y.T
            np.testing.assert_allclose(loo.nested_r2_from_gram(gram[perms[:, :, None], perms[:, None, :]]),
                                       nested_r2(y[perms], loo.nested_predictions(y[perms])[0]), atol=1e-12)


def test_nested_loo_r2_is_not_the_best_score_of_the_grid_it_chose_on():
    """Pure noise: the old number (LOO R² maximised over the grid) is positive here; the nested one is not."""
    from layerscope.experiments.z_subspace.bridge import bridge_fit, nested_loo_predictions, r2

    grid = [0, 0.01, 0.1, 1, 10, 100]
    rng = np.random.default_rng(20)
    x, y = rng.standard_normal((10, 3)), rng.standard_normal((10, 3))
    fit = bridge_fit(x, y, grid, n_shuffles=300)
    assert fit.loo_r2_best_of_grid > 0.05  # what loo_r2 used to report
    assert fit.loo_r2 <= 0 and fit.loo_r2 == pytest.approx(r2(y, nested_loo_predictions(x, y, grid)[0]))
    assert fit.null_summary["p_value"] > 0.05
    lo, hi = fit.loo_r2_ci
    assert lo <= fit.loo_r2 <= hi
    # over many noise sets the nested score is never above the best-of-grid score and is ≤ 0 on average
    gaps, nested = [], []
    for seed in range(40):
        r = np.random.default_rng(1000 + seed)
        f = bridge_fit(r.standard_normal((10, 3)), r.standard_normal((10, 3)), grid, n_shuffles=10)
        gaps.append(f.loo_r2_best_of_grid - f.loo_r2)
        nested.append(f.loo_r2)
    assert min(gaps) >= -1e-12 and np.mean(gaps) > 0.02 and np.mean(nested) < 0


def test_derangements_have_no_fixed_point_and_are_seeded():
    from layerscope.experiments.z_subspace.bridge import derangements

    perms = derangements(7, 300, seed=4)
    assert perms.shape == (300, 7) and not (perms == np.arange(7)).any(axis=1).any()
    assert (np.sort(perms, axis=1) == np.arange(7)).all()
    assert np.array_equal(perms, derangements(7, 300, seed=4)) and len({tuple(p) for p in perms}) > 100


# ---------------------------------------------------------------------------- z_patching


def _patching_table(n, *, z_changes, z_perp_changes, z_keeps_language=True, z_perp_flips_language=True):
    rows = []
    for i in range(n):
        base = {"pair": f"p{i}", "layer": None, "k": None, "source": None}
        rows.append({**base, "condition": "none", "extracted": 1.0, "language": "en", "correct": True,
                     "token_ids": [1, 2, 3]})
        for cond, changes, lang in (("z", z_changes, "en" if z_keeps_language else "zh"),
                                    ("z_perp", z_perp_changes, "zh" if z_perp_flips_language else "en"),
                                    ("random", False, "en")):
            rows.append({**base, "condition": cond, "layer": 1, "k": 4, "source": "mean",
                         "extracted": 2.0 if changes else 1.0, "language": lang, "correct": not changes,
                         "token_ids": [1, 2, 4] if cond == "z" else [5, 6]})
        rows.append({**base, "condition": "full", "layer": 1, "k": None, "source": "mean", "extracted": 2.0,
                     "language": "zh", "correct": False, "token_ids": [1, 2, 4]})
    return pd.DataFrame(rows).astype({"layer": "Int64", "k": "Int64"})


def test_a_verdict_needs_intervals_that_separate_the_conditions():
    from layerscope.experiments.z_subspace.z_patching import derived_rates, verdict_point

    few = derived_rates(_patching_table(4, z_changes=True, z_perp_changes=False))[0]
    # 4 of 4 against 0 of 4 looked like a double dissociation; the exact intervals overlap
    assert verdict_point(few) == "double_dissociation" and few["verdict_point"] == "double_dissociation"
    assert few["verdict"] == "insufficient data"
    assert few["z_answer_change_ci"] == pytest.approx(st.binomial_interval(4, 4))
    assert few["z_answer_change_ci"][0] < few["z_perp_answer_change_ci"][1]
    many = derived_rates(_patching_table(30, z_changes=True, z_perp_changes=False))[0]
    assert many["verdict"] == "double_dissociation" and many["z_specific"]
    assert many["full_resembles"] == "z"
    partial = derived_rates(_patching_table(30, z_changes=True, z_perp_changes=False, z_keeps_language=False))[0]
    assert partial["verdict"] == "partial"
    null = derived_rates(_patching_table(30, z_changes=False, z_perp_changes=True))[0]
    assert null["verdict"] == "null"
    for r in (few, many, partial, null):
        for key, value in r.items():
            if key.endswith("_ci"):
                lo, hi = value
                assert math.isfinite(lo) and math.isfinite(hi) and lo <= r[key[:-3]] <= hi


def test_the_random_condition_draws_its_own_subspace_for_every_pair():
    from layerscope.experiments.z_subspace.z_patching import pair_random_basis

    a = pair_random_basis(32, 5, seed=0, layer=3, pair="p1")
    assert a.shape == (5, 32) and a.dtype == torch.float32
    torch.testing.assert_close(a @ a.T, torch.eye(5), atol=1e-6, rtol=0)
    assert torch.equal(a, pair_random_basis(32, 5, seed=0, layer=3, pair="p1"))
    for other in (dict(pair="p2"), dict(layer=4, pair="p1"), dict(seed=1, pair="p1")):
        b = pair_random_basis(32, 5, **{"seed": 0, "layer": 3, **other})
        assert (a.T @ a - b.T @ b).abs().max() > 0.1  # a different subspace


# ---------------------------------------------------------------------------- ard_mmd


def test_overlap_p_value_is_the_hypergeometric_tail():
    from layerscope.experiments.z_subspace.ard_mmd import overlap_p_value, overlap_with_energy

    d = 20
    energy = np.linspace(1, 0, d)
    active = np.zeros(d, bool)
    active[:5] = True  # exactly the 5 most energetic dimensions
    assert overlap_with_energy(active, energy) == 1.0
    assert overlap_p_value(active, energy) == pytest.approx(1 / math.comb(20, 5))
    rng = np.random.default_rng(0)
    sims = []
    for _ in range(4000):
        a = np.zeros(d, bool)
        a[rng.choice(d, 5, replace=False)] = True
        sims.append(overlap_with_energy(a, energy))
    shifted = np.zeros(d, bool)
    shifted[[0, 1, 2, 10, 15]] = True  # overlap 3/5
    assert overlap_p_value(shifted, energy) == pytest.approx(np.mean(np.array(sims) >= 0.6 - 1e-12), abs=0.01)
    assert math.isnan(overlap_p_value(np.zeros(d, bool), energy))
