"""The shared sampling and uncertainty engine."""

from collections import Counter

import numpy as np
import pytest
from scipy import stats

from layerscope import LayerscopeError
from layerscope.engines import statistics as st
from layerscope.engines.sampling import stratified_sample


def test_bootstrap_interval_covers_the_true_mean_at_close_to_the_nominal_rate():
    rng = np.random.default_rng(1)
    hits = 0
    trials = 300
    for t in range(trials):
        x = rng.exponential(2.0, size=40)  # skewed, true mean 2
        _, (lo, hi) = st.Bootstrap(40, seed=t, n_boot=400).interval(x)
        hits += lo <= 2.0 <= hi
    # the percentile bootstrap undercovers slightly at n = 40 on a skewed law; nominal is 0.95
    assert 0.88 <= hits / trials <= 0.98


def test_interval_contains_its_point_and_is_deterministic():
    x = np.random.default_rng(0).normal(size=(12, 3))
    p1, ci1 = st.Bootstrap(12, seed=3).interval(x)
    p2, ci2 = st.Bootstrap(12, seed=3).interval(x)
    assert ci1 == ci2 and p1 == pytest.approx(x.mean(0).tolist())
    for v, (lo, hi) in zip(p1, ci1):
        assert lo <= v <= hi


def test_weighted_statistic_point_is_the_pooled_mean():
    sums, counts = np.array([3.0, 10.0, 1.0]), np.array([1.0, 4.0, 2.0])
    point, (lo, hi) = st.Bootstrap(3).interval(sums, counts, statistic=st.weighted_mean)
    assert point == pytest.approx(14 / 7) and lo <= point <= hi
    assert min(sums / counts) <= lo and hi <= max(sums / counts)


def test_stability_of_a_clear_argmax_is_one_and_of_a_tie_is_not():
    clear = np.tile([0.0, 5.0, 1.0], (10, 1)) + np.random.default_rng(0).normal(0, 0.1, (10, 3))
    boot = st.Bootstrap(10)
    assert boot.stability(clear) == (1, 1.0)
    tie = np.random.default_rng(0).normal(0, 1, (10, 3))
    _, s = boot.stability(tie)
    assert s < 0.9


def test_few_units_are_flagged_underpowered():
    assert st.Bootstrap(3).summary()["underpowered"]
    b = st.Bootstrap(20)
    assert not b.summary()["underpowered"]
    b.check_stability("most_critical_layer", 0.5)
    out = b.summary()
    assert out["underpowered"] and "most_critical_layer" in out["underpowered_reasons"][0]
    assert out["uncertainty"] == {"unit": "prompt", "n_units": 20, "n_boot": 1000, "level": 0.95,
                                  "method": "percentile bootstrap over units"}


def test_binomial_interval_is_clopper_pearson():
    lo, hi = st.binomial_interval(3, 10)
    # Clopper–Pearson from the beta quantiles
    assert lo == pytest.approx(stats.beta.ppf(0.025, 3, 8)) and hi == pytest.approx(stats.beta.ppf(0.975, 4, 7))
    assert st.binomial_interval(0, 0) == [0.0, 1.0]


def test_holm_matches_its_definition():
    p = [0.01, 0.04, 0.03, 0.2]
    # sorted 0.01, 0.03, 0.04, 0.2 -> 0.04, 0.09, 0.09 (monotone), 0.2
    assert st.holm(p) == pytest.approx([0.04, 0.09, 0.09, 0.2])


def test_partial_spearman_removes_a_shared_trend():
    rng = np.random.default_rng(0)
    z = np.arange(30.0)
    x = z + rng.normal(0, 1, 30)
    y = z + rng.normal(0, 1, 30)
    assert stats.spearmanr(x, y)[0] > 0.9
    r, p = st.partial_spearman(x, y, z)
    assert abs(r) < 0.4 and p > 0.05


def test_random_subspaces_are_orthonormal():
    q = st.random_subspaces(16, 4, 5)
    assert q.shape == (5, 16, 4)
    np.testing.assert_allclose(np.einsum("ndk,ndl->nkl", q, q), np.broadcast_to(np.eye(4), (5, 4, 4)), atol=1e-12)


def test_empirical_p_and_null_summary():
    null = np.arange(100.0)
    assert st.empirical_p(1000, null) == pytest.approx(1 / 101)
    out = st.null_summary(49.5, null)
    assert out["percentile"] == 50 and out["n_null"] == 100


def test_stratified_sample_covers_every_category_and_is_not_the_head():
    ids = [f"{c}-{i}" for c in "abcdefg" for i in range(7)]
    cats = [i.split("-")[0] for i in ids]
    sample = stratified_sample(ids, cats, 7, seed=0)
    assert Counter(s.split("-")[0] for s in sample) == Counter("abcdefg")
    assert sample != ids[:7]
    assert sample == stratified_sample(ids, cats, 7, seed=0)
    assert sample != stratified_sample(ids, cats, 7, seed=1)
    assert sample == [i for i in ids if i in sample]  # file order
    big = stratified_sample(ids, cats, 20, seed=0)
    counts = Counter(s.split("-")[0] for s in big)
    assert len(big) == 20 and max(counts.values()) - min(counts.values()) <= 1
    small = stratified_sample(ids, cats, 3, seed=0)
    assert len({s.split("-")[0] for s in small}) == 3
    assert stratified_sample(ids, cats, None) == ids
    with pytest.raises(LayerscopeError):
        stratified_sample(ids, cats, 0)


def test_stratified_sample_respects_unequal_categories():
    ids = [f"a{i}" for i in range(20)] + ["b0", "c0", "c1"]
    cats = ["a"] * 20 + ["b", "c", "c"]
    sample = stratified_sample(ids, cats, 8, seed=0)
    counts = Counter(s[0] for s in sample)
    assert counts["b"] == 1 and counts["c"] >= 1 and sum(counts.values()) == 8


def test_contain_widens_to_a_reported_point_element_by_element():
    assert st.contain([1.0, 2.0], 2.5) == [1.0, 2.5]
    assert st.contain([1.0, 2.0], 1.5) == [1.0, 2.0]
    assert st.contain([[1.0, 2.0], [None, None], [0.0, 1.0]], [0.5, float("nan"), 1.0]) == [
        [0.5, 2.0], [None, None], [0.0, 1.0]]
