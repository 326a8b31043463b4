"""Spectral summaries against closed forms on matrices with known spectra."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from layerscope.engines.spectra import (
    condition_number, covariance_eigenvalues, dims_for_variance, entropy_effective_rank, participation_ratio, roy_vetterli_effective_rank, singular_values,
    stable_rank,
)


def with_spectrum(sigma, m=40, n=30, seed=0):
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((m, m)))
    v, _ = np.linalg.qr(rng.standard_normal((n, n)))
    s = np.zeros((m, n))
    s[: len(sigma), : len(sigma)] = np.diag(sigma)
    return u @ s @ v.T


def test_rank_r_matrix_with_equal_singular_values():
    a = with_spectrum([2.0] * 7)
    s = singular_values(a)
    assert np.sum(s > 1e-9) == 7
    assert entropy_effective_rank(s) == pytest.approx(7.0, rel=1e-9)
    assert participation_ratio(s) == pytest.approx(7.0, rel=1e-9)
    assert stable_rank(s) == pytest.approx(7.0, rel=1e-9)


def test_flat_and_geometric_spectra():
    flat = singular_values(with_spectrum([1.0] * 30))
    assert entropy_effective_rank(flat) == pytest.approx(30.0, rel=1e-9)
    q = 0.8
    sigma = q ** np.arange(30)
    s = singular_values(with_spectrum(sigma))
    p = sigma**2 / (sigma**2).sum()
    assert entropy_effective_rank(s) == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-8)
    # geometric energies r = q²: PR = (1 + r)/(1 − r) · (1 − r^n)²/(1 − r^{2n})
    r, n = q**2, 30
    closed = (1 + r) / (1 - r) * (1 - r**n) ** 2 / (1 - r ** (2 * n))
    assert participation_ratio(s) == pytest.approx(closed, rel=1e-8)
    assert stable_rank(s) == pytest.approx((sigma**2).sum(), rel=1e-8)


def test_roy_vetterli_effective_rank_uses_singular_values_not_energies():
    """Roy & Vetterli: p = σ/Σσ. On σ = (3, 1) that is p = (3/4, 1/4); the energy entropy rank uses
    p = σ²/Σσ² = (9/10, 1/10) instead, and equals Roy & Vetterli's rank of WᵀW (singular values σ²)."""
    s = singular_values(with_spectrum([3.0, 1.0]))
    roy = np.exp(-(0.75 * np.log(0.75) + 0.25 * np.log(0.25)))  # 1.7548
    energy = np.exp(-(0.9 * np.log(0.9) + 0.1 * np.log(0.1)))  # 1.3836
    assert roy_vetterli_effective_rank(s) == pytest.approx(roy, rel=1e-9)
    assert entropy_effective_rank(s) == pytest.approx(energy, rel=1e-9)
    assert abs(roy - energy) > 0.3
    assert roy_vetterli_effective_rank(s**2) == pytest.approx(entropy_effective_rank(s), rel=1e-12)
    # flat spectra: both are the rank; a zero matrix has rank 0
    assert roy_vetterli_effective_rank(singular_values(with_spectrum([2.0] * 7))) == pytest.approx(7.0, rel=1e-9)
    assert roy_vetterli_effective_rank(np.zeros(4)) == 0.0
    # geometric σ_i = q^i: p_i = q^i (1 − q) / (1 − q^n)
    q, n = 0.8, 30
    sigma = q ** np.arange(n)
    p = sigma / sigma.sum()
    assert roy_vetterli_effective_rank(singular_values(with_spectrum(sigma))) == pytest.approx(
        np.exp(-(p * np.log(p)).sum()), rel=1e-8)


def test_participation_ratio_of_a_known_covariance():
    lam = np.array([5.0, 3.0, 1.0, 1.0])
    assert participation_ratio(energies=lam) == pytest.approx(100 / 36)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((200_000, 4)) * np.sqrt(lam)
    assert participation_ratio(energies=covariance_eigenvalues(x)) == pytest.approx(100 / 36, rel=0.02)


def test_dims_for_variance():
    assert dims_for_variance(np.array([6.0, 3.0, 1.0]), (0.5, 0.9, 0.95, 1.0)) == {0.5: 1, 0.9: 2, 0.95: 3, 1.0: 3}


def test_input_validation():
    with pytest.raises(ValueError):
        entropy_effective_rank()
    assert entropy_effective_rank(np.zeros(3)) == 0.0
    assert singular_values(torch.eye(3)).tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("shape", [(400, 30), (30, 400), (40, 30)])
def test_streamed_qr_gives_the_singular_values_of_the_whole_matrix(shape):
    rng = np.random.default_rng(2)
    a = rng.standard_normal(shape) * np.geomspace(1, 1e-6, shape[1])[None, :]  # condition number ~1e6
    direct = np.linalg.svd(a, compute_uv=False)
    a32 = torch.as_tensor(a, dtype=torch.float32)  # float32 weights are converted block by block
    streamed = singular_values(a32, chunk_rows=64)
    assert streamed.shape == direct.shape
    np.testing.assert_allclose(streamed, np.linalg.svd(a32.double().numpy(), compute_uv=False), rtol=1e-9,
                               atol=1e-12 * direct[0])
    np.testing.assert_allclose(singular_values(a, chunk_rows=7), direct, rtol=1e-9, atol=1e-12 * direct[0])


def test_condition_number_and_rank_r_with_streaming():
    a = with_spectrum([3.0, 2.0, 0.5], m=500, n=20)
    s = singular_values(a, chunk_rows=50)
    assert condition_number(s) > 1e12  # 17 zero singular values, zero up to rounding
    assert condition_number(np.array([2.0, 1.0, 0.0])) == np.inf
    full = with_spectrum(np.linspace(4.0, 0.25, 20), m=60, n=20)
    assert condition_number(singular_values(full, chunk_rows=16)) == pytest.approx(16.0, rel=1e-9)
    sigma = np.array([3.0, 2.0, 0.5])
    p = sigma**2 / (sigma**2).sum()
    assert entropy_effective_rank(s) == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-9)
    assert np.isnan(condition_number(np.zeros(3)))
