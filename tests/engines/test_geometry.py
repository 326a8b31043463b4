"""Shared geometry numerics against closed forms, brute-force loops and peer computations."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from layerscope.engines.geometry import (
    between_within_ratio, capture, cayley_menger_volume, eigen_isotropy, leave_one_out_capture, mean_pairwise_cosine,
    orthonormal_basis, permuted_between_within, random_frames, regular_simplex_volume, resample_counts, resampled_pair_means, subspace_overlap,
)
from layerscope.engines.spectra import (
    covariance_eigenvalues, entropy_effective_rank, gram_eigh, participation_ratio, single_thread,
)


def random_rotation(d, rng):
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def data_with_covariance(eigenvalues, n, rng):
    """n points whose sample covariance has exactly the given eigenvalues (in a random basis)."""
    d = len(eigenvalues)
    z = rng.standard_normal((n, d))
    z -= z.mean(axis=0)
    # whiten exactly, then scale: the sample covariance becomes diag(eigenvalues) before rotation
    cov = z.T @ z / (n - 1)
    w = np.linalg.cholesky(np.linalg.inv(cov))
    z = z @ w
    return (z * np.sqrt(eigenvalues)) @ random_rotation(d, rng).T + rng.standard_normal(d) * 10


def test_participation_ratio_of_a_covariance_with_known_eigenvalues():
    rng = np.random.default_rng(0)
    lam = np.array([9.0, 4.0, 4.0, 1.0, 0.5, 0.25, 0.0, 0.0])
    x = data_with_covariance(lam + 1e-300, 500, rng)
    got = gram_eigh(x, center=True, n_vectors=0)[0] / (len(x) - 1)
    np.testing.assert_allclose(got, np.sort(lam)[::-1], atol=1e-9)
    closed = lam.sum() ** 2 / (lam**2).sum()
    assert participation_ratio(energies=got) == pytest.approx(closed, rel=1e-9)
    # the SVD route of spectra.covariance_eigenvalues agrees
    np.testing.assert_allclose(covariance_eigenvalues(x), got, atol=1e-9)


def test_gram_eigh_equals_the_svd():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 20)) @ rng.standard_normal((20, 20))
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    values, vectors = gram_eigh(x)
    np.testing.assert_allclose(values, s**2, rtol=1e-10)
    np.testing.assert_allclose(np.abs(np.sum(vectors * vt.T, axis=0)), 1.0, atol=1e-8)  # same up to sign
    top, top_vectors = gram_eigh(torch.as_tensor(x, dtype=torch.float32), n_vectors=3)
    assert top_vectors.shape == (20, 3)
    np.testing.assert_allclose(np.abs(np.sum(top_vectors * vt[:3].T, axis=0)), 1.0, atol=1e-4)
    assert gram_eigh(x, n_vectors=0)[1].shape == (20, 0)


def test_single_thread_restores_the_thread_count():
    before = torch.get_num_threads()
    with single_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("r", [1, 3, 10])
def test_effective_rank_of_a_constructed_rank_r_matrix(r):
    rng = np.random.default_rng(r)
    u = np.linalg.qr(rng.standard_normal((200, r)))[0]
    v = np.linalg.qr(rng.standard_normal((40, r)))[0]
    x = u @ np.diag(np.full(r, 3.0)) @ v.T
    energies = gram_eigh(x, n_vectors=0)[0]
    assert entropy_effective_rank(energies=energies) == pytest.approx(r, rel=1e-6)
    assert participation_ratio(energies=energies) == pytest.approx(r, rel=1e-6)
    sigma = np.linspace(1, 2, r)
    y = u @ np.diag(sigma) @ v.T
    p = sigma**2 / (sigma**2).sum()
    assert entropy_effective_rank(energies=gram_eigh(y, n_vectors=0)[0]) == pytest.approx(np.exp(-(p * np.log(p)).sum()),
                                                                                            rel=1e-6)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("edge", [1.0, 3.7, 1e-3])
def test_cayley_menger_volume_of_a_regular_simplex(k, edge):
    # the standard simplex e_0 … e_k in R^(k+1) has edge √2; scale, rotate into R^40 and translate
    rng = np.random.default_rng(k)
    vertices = np.eye(k + 1) * edge / math.sqrt(2)
    embedded = np.zeros((k + 1, 40))
    embedded[:, : k + 1] = vertices
    embedded = embedded @ random_rotation(40, rng).T + rng.standard_normal(40)
    assert cayley_menger_volume(embedded) == pytest.approx(regular_simplex_volume(k, edge), rel=1e-7)


def test_regular_simplex_closed_form_and_gram_determinant():
    assert regular_simplex_volume(1, 2.0) == pytest.approx(2.0)
    assert regular_simplex_volume(2, 1.0) == pytest.approx(math.sqrt(3) / 4)
    assert regular_simplex_volume(3, 1.0) == pytest.approx(1 / (6 * math.sqrt(2)))
    # random pentachora: Cayley–Menger against sqrt(det(EᵀE))/k! of the edge vectors, batched
    rng = np.random.default_rng(5)
    points = rng.standard_normal((50, 5, 30)) * rng.uniform(0.1, 10, size=(50, 1, 1))
    edges = points[:, 1:] - points[:, :1]
    gram = np.einsum("bik,bjk->bij", edges, edges)
    expected = np.sqrt(np.linalg.det(gram)) / math.factorial(4)
    np.testing.assert_allclose(cayley_menger_volume(points), expected, rtol=1e-6)


def test_degenerate_simplices_have_zero_volume():
    points = np.zeros((2, 5, 8))
    points[1, :, 0] = np.arange(5)  # collinear
    np.testing.assert_allclose(cayley_menger_volume(points), 0.0, atol=1e-9)
    with pytest.raises(ValueError):
        cayley_menger_volume(np.zeros((1, 4)))


def test_mean_pairwise_cosine_equals_a_plain_loop():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((30, 7)) + 0.5
    x[4] = 0  # zero rows are left out
    rows = [v / np.linalg.norm(v) for v in x if np.linalg.norm(v) > 0]
    loop = np.mean([a @ b for a, b in itertools.permutations(rows, 2)])
    assert mean_pairwise_cosine(x) == pytest.approx(loop, abs=1e-12)
    assert math.isnan(mean_pairwise_cosine(x[:1]))


def test_isotropy_of_isotropic_gaussian_data_is_near_its_expectation():
    rng = np.random.default_rng(3)
    n, d = 4000, 64
    x = rng.standard_normal((n, d))
    # E[cos] = 0 with s.d. of the mean ≈ sqrt(2 / (n(n−1)d))
    assert abs(mean_pairwise_cosine(x)) < 6 * math.sqrt(2 / (n * (n - 1) * d))
    assert abs(mean_pairwise_cosine(x - x.mean(axis=0))) < 1e-3
    lam = gram_eigh(x, center=True, n_vectors=0)[0] / (n - 1)
    # Marchenko–Pastur: λmax → (1 + √(d/n))², Σλ → d
    expected = 1 - (1 + math.sqrt(d / n)) ** 2 / d
    assert eigen_isotropy(lam) == pytest.approx(expected, abs=3e-3)
    # a shared mean direction makes raw cosines large, but not the centred ones
    shifted = x + 5.0 * np.eye(d)[0]
    assert mean_pairwise_cosine(shifted) == pytest.approx(25 / (25 + d), abs=0.02)
    assert abs(mean_pairwise_cosine(shifted - shifted.mean(axis=0))) < 1e-3
    assert eigen_isotropy(np.array([1.0, 0, 0])) == 0.0


def test_between_within_ratio_equals_a_plain_loop():
    rng = np.random.default_rng(4)
    labels = np.array(list("aabbbcc d".replace(" ", "")))
    x = rng.standard_normal((len(labels), 5))
    within, between = [], []
    for i, j in itertools.combinations(range(len(labels)), 2):
        (within if labels[i] == labels[j] else between).append(np.linalg.norm(x[i] - x[j]))
    out = between_within_ratio(x, labels)
    assert out["ratio"] == pytest.approx(np.mean(between) / np.mean(within))
    assert out["n_within_pairs"] == len(within) and out["n_between_pairs"] == len(between)
    clustered = np.repeat(np.eye(3) * 10, 5, axis=0) + rng.standard_normal((15, 3)) * 0.1
    assert between_within_ratio(clustered, np.repeat([0, 1, 2], 5))["ratio"] > 10
    assert math.isnan(between_within_ratio(x[:3], ["a", "b", "c"])["ratio"])  # no within pairs


def test_subspace_overlap_and_capture():
    rng = np.random.default_rng(6)
    d, k = 50, 4
    a = np.linalg.qr(rng.standard_normal((d, k)))[0]
    assert subspace_overlap(a, a @ random_rotation(k, rng)) == pytest.approx(1.0)
    q = np.linalg.qr(rng.standard_normal((d, 2 * k)))[0]
    assert subspace_overlap(q[:, :k], q[:, k:]) == pytest.approx(0.0, abs=1e-12)
    randoms = [subspace_overlap(a, np.linalg.qr(rng.standard_normal((d, k)))[0]) for _ in range(300)]
    assert np.mean(randoms) == pytest.approx(k / d, rel=0.15)
    v = a @ rng.standard_normal(k)
    assert capture(a, v) == pytest.approx(1.0)
    assert capture(a, q[:, k]) < 1  # a direction with a component outside
    basis = orthonormal_basis(np.vstack([a.T, 1e-3 * rng.standard_normal((2, d))]), k)
    assert subspace_overlap(basis, a) == pytest.approx(1.0, abs=1e-4)


def test_random_frames_are_orthonormal_and_uniform():
    frames = random_frames((400, 2), 3, 10, np.random.default_rng(0))
    assert frames.shape == (400, 2, 3, 10)
    np.testing.assert_allclose(frames @ np.swapaxes(frames, -1, -2), np.broadcast_to(np.eye(3), (400, 2, 3, 3)),
                               atol=1e-12)
    # a uniform unit vector has E[v_j²] = 1/d in every coordinate
    np.testing.assert_allclose((frames[:, :, 0, :] ** 2).mean(axis=(0, 1)), 0.1, atol=0.02)
    again = random_frames((400, 2), 3, 10, np.random.default_rng(0))
    np.testing.assert_array_equal(frames, again)


def test_leave_one_out_capture_of_independent_frames_is_rank_over_d():
    d, k, rank = 30, 4, 5
    frames = random_frames((500, 4), k, d, np.random.default_rng(1))
    out = leave_one_out_capture(frames, [0, 0, 1, 1], rank)  # one other block: its k = 4 < rank directions
    assert np.nanmean(out) == pytest.approx(k / d, rel=0.1)
    out = leave_one_out_capture(frames, [0, 0, 0, 0], rank)
    assert np.nanmean(out) == pytest.approx(rank / d, rel=0.1)


def test_resample_counts_and_pair_means_equal_a_plain_loop():
    rng = np.random.default_rng(2)
    n = 7
    index = rng.integers(0, n, size=(5, n))
    counts = resample_counts(index, n)
    for row, draw in zip(counts, index):
        np.testing.assert_array_equal(row, np.bincount(draw, minlength=n))
    np.testing.assert_array_equal(resample_counts(np.arange(n)[None], n), np.ones((1, n)))
    values = rng.random((n, n))
    values = values + values.T
    labels = np.array(list("aabbbcc"))
    same = labels[:, None] == labels[None, :]
    out = resampled_pair_means(values, {"within": same, "between": ~same}, counts)
    for b, draw in enumerate(index):  # every pair of drawn units except copies of one unit
        within, between = [], []
        for x, y in itertools.combinations(range(n), 2):
            i, j = draw[x], draw[y]
            if i != j:
                (within if labels[i] == labels[j] else between).append(values[i, j])
        assert out["within"][b] == pytest.approx(np.mean(within) if within else np.nan, nan_ok=True)
        assert out["between"][b] == pytest.approx(np.mean(between))
    ones = resampled_pair_means(values, {"within": same}, np.ones((1, n)))["within"][0]
    iu = np.triu_indices(n, k=1)
    assert ones == pytest.approx(values[iu][same[iu]].mean())


def test_permuted_between_within_equals_the_ratio_of_each_labelling():
    from scipy.spatial.distance import pdist, squareform

    rng = np.random.default_rng(3)
    x = rng.standard_normal((9, 4))
    labels = np.array(list("aaabbbccc"))
    perms = [labels, rng.permutation(labels), rng.permutation(labels), np.array(list("abcdefghi"))]
    out = permuted_between_within(squareform(pdist(x)), perms)
    assert out.shape == (4, 1)
    for row, perm in zip(out[:3, 0], perms[:3]):
        assert row == pytest.approx(between_within_ratio(x, perm)["ratio"])
    assert math.isnan(out[3, 0])  # no within-label pair
