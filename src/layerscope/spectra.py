"""Spectral summaries shared by the geometry, weight and quantization experiments.

Each function names the definition it computes, so numbers can be compared across
experiments and with the literature:

* ``entropy_effective_rank`` — exp(H(p)) with p = σ² / Σσ² (Roy & Vetterli's effective rank
  on the energy distribution of a matrix, or on eigenvalues λ passed as ``energies``);
* ``participation_ratio`` — (Σλ)² / Σλ² of eigenvalues λ (for a matrix: λ = σ²);
* ``stable_rank`` — Σσ² / σ_max² = ‖A‖_F² / ‖A‖_2²;
* ``condition_number`` — σ_max / σ_min over all min(m, n) singular values (inf when σ_min = 0);
* ``dims_for_variance`` — the fewest leading eigen-directions that hold a fraction of Σλ.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch


def singular_values(matrix: torch.Tensor | np.ndarray, *, chunk_rows: int | None = None) -> np.ndarray:
    """Singular values in descending order, computed in float64.

    With ``chunk_rows``, a matrix with more than ``chunk_rows`` rows (or columns: the
    singular values of Aᵀ are those of A) is first reduced to its n × n triangular factor
    by a streamed QR (R of [R_prev; next row block], in float64), so only one block is
    ever converted to float64: memory O(chunk_rows · n) instead of O(m · n). The
    factorisation is orthogonal, so the singular values are those of the whole matrix.
    """
    m = torch.as_tensor(matrix).detach()
    if chunk_rows is not None:
        if m.shape[0] < m.shape[1]:
            m = m.T
        rows, cols = m.shape
        if rows > max(chunk_rows, 2 * cols):
            r = torch.zeros((0, cols), dtype=torch.float64, device=m.device)
            for start in range(0, rows, chunk_rows):
                block = m[start : start + chunk_rows].to(torch.float64)
                r = torch.linalg.qr(torch.cat([r, block]), mode="r").R
            return torch.linalg.svdvals(r).cpu().numpy()
    return torch.linalg.svdvals(m.to(torch.float64)).cpu().numpy()


def _energies(singular: np.ndarray | None, energies: np.ndarray | None) -> np.ndarray:
    if (singular is None) == (energies is None):
        raise ValueError("pass exactly one of singular values or energies (eigenvalues)")
    e = np.asarray(energies, dtype=float) if energies is not None else np.asarray(singular, dtype=float) ** 2
    return np.clip(e, 0.0, None)


def entropy_effective_rank(singular: np.ndarray | None = None, *, energies: np.ndarray | None = None) -> float:
    """exp of the Shannon entropy of the normalised energy distribution p = σ²/Σσ²."""
    e = _energies(singular, energies)
    total = e.sum()
    if total <= 0:
        return 0.0
    p = e[e > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


def participation_ratio(singular: np.ndarray | None = None, *, energies: np.ndarray | None = None) -> float:
    """(Σλ)² / Σλ² with λ the eigenvalues (σ² for a matrix)."""
    e = _energies(singular, energies)
    denom = (e**2).sum()
    return float(e.sum() ** 2 / denom) if denom > 0 else 0.0


def stable_rank(singular: np.ndarray) -> float:
    """Σσ² / σ_max²."""
    s = np.asarray(singular, dtype=float)
    return float((s**2).sum() / s.max() ** 2) if s.size and s.max() > 0 else 0.0


def condition_number(singular: np.ndarray) -> float:
    """σ_max / σ_min over the given singular values (all min(m, n) of them); inf when σ_min = 0."""
    s = np.asarray(singular, dtype=float)
    if not s.size or s.max() == 0:
        return float("nan")
    return float(s.max() / s.min()) if s.min() > 0 else float("inf")


def dims_for_variance(energies: np.ndarray, fractions: Iterable[float] = (0.8, 0.9, 0.95, 0.99)) -> dict[float, int]:
    """For each fraction f, the fewest leading eigenvalues (sorted descending) whose sum reaches f·Σλ."""
    e = np.sort(np.clip(np.asarray(energies, dtype=float), 0, None))[::-1]
    cumulative = np.cumsum(e) / e.sum()
    return {f: int(np.searchsorted(cumulative, f - 1e-12) + 1) for f in fractions}


def covariance_eigenvalues(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """Eigenvalues (descending) of the covariance of the rows of x, via the SVD of the centred data."""
    m = torch.as_tensor(x).detach().to(torch.float64)
    m = m - m.mean(dim=0, keepdim=True)
    s = torch.linalg.svdvals(m).cpu().numpy()
    return s**2 / max(1, m.shape[0] - 1)
