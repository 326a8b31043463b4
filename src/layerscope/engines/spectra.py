"""Spectral summaries shared by the geometry, weight and quantization experiments.

Each function names the definition it computes, so numbers can be compared across
experiments and with the literature:

* ``roy_vetterli_effective_rank`` — exp(H(p)) with p = σ / Σσ: the effective rank of a matrix as
  Roy & Vetterli (2007) define it, on its singular values;
* ``entropy_effective_rank`` — exp(H(p)) with p = σ² / Σσ² (or p = λ / Σλ for eigenvalues λ
  passed as ``energies``): the entropy rank of the *energy* spectrum. For a matrix W this is
  Roy & Vetterli's effective rank of its Gram matrix WᵀW, not of W (the two differ unless
  the nonzero σ are equal); for a covariance given by its eigenvalues it is theirs;
* ``participation_ratio`` — (Σλ)² / Σλ² of eigenvalues λ (for a matrix: λ = σ²);
* ``stable_rank`` — Σσ² / σ_max² = ‖A‖_F² / ‖A‖_2²;
* ``condition_number`` — σ_max / σ_min over all min(m, n) singular values (inf when σ_min = 0);
* ``dims_for_variance`` — the fewest leading eigen-directions that hold a fraction of Σλ;
* ``gram_eigh`` — eigenvalues and eigenvectors of XᵀX (the squared singular values and the
  right singular vectors of X), in float64: for the tall matrices of the activation cache
  (tokens ≫ d_model) this is several times faster than an SVD of X and exact to float64
  precision on the energies every summary here uses.
"""

from __future__ import annotations

import contextlib
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


def _entropy_rank(weights: np.ndarray) -> float:
    """exp(H(p)) of p = weights / Σ weights (non-negative weights; 0 when they sum to 0)."""
    total = weights.sum()
    if total <= 0:
        return 0.0
    p = weights[weights > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


def entropy_effective_rank(singular: np.ndarray | None = None, *, energies: np.ndarray | None = None) -> float:
    """exp of the Shannon entropy of the normalised energy distribution p = σ²/Σσ² (p = λ/Σλ for eigenvalues).

    Of a matrix W this is Roy & Vetterli's effective rank of WᵀW (of W itself see
    :func:`roy_vetterli_effective_rank`); of covariance eigenvalues it is theirs.
    """
    return _entropy_rank(_energies(singular, energies))


def roy_vetterli_effective_rank(singular: np.ndarray) -> float:
    """Roy & Vetterli's effective rank of a matrix: exp(H(p)) with p = σ/Σσ over its singular values σ.

    O. Roy and M. Vetterli, "The effective rank: a measure of effective dimensionality", EUSIPCO 2007.
    Between 1 and the number of nonzero σ; n for n equal nonzero σ.
    """
    s = np.clip(np.asarray(singular, dtype=float), 0.0, None)
    return _entropy_rank(s)


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


@contextlib.contextmanager
def single_thread():
    """Run torch single-threaded inside the block (restoring the thread count after).

    Small dense eigenproblems (d ≤ a few thousand) gain nothing from threads, and OpenMP
    spin-waiting makes them erratic — up to 50× slower — on a CPU shared with other jobs.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


CHUNK_ROWS = 1024


def row_chunks(n: int, size: int = CHUNK_ROWS):
    """Slices covering 0…n in blocks of ``size`` rows (float64 work on a tall matrix, a block at a time)."""
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def column_mean(x: torch.Tensor | np.ndarray, chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """Mean of the rows of x in float64, accumulated by row chunks."""
    m = torch.as_tensor(x).detach()
    total = torch.zeros(m.shape[1], dtype=torch.float64)
    for rows in row_chunks(m.shape[0], chunk_rows):
        total += m[rows].to(torch.float64).sum(dim=0)
    return total / max(1, m.shape[0])


def gram_matrix(x: torch.Tensor | np.ndarray, *, center: bool = False, chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """XᵀX (of the centred X with ``center``) in float64, accumulated by row chunks: no float64 copy of X is made."""
    m = torch.as_tensor(x).detach()
    mean = column_mean(m, chunk_rows) if center else None
    gram = torch.zeros((m.shape[1], m.shape[1]), dtype=torch.float64)
    for rows in row_chunks(m.shape[0], chunk_rows):
        block = m[rows].to(torch.float64)
        if mean is not None:
            block = block - mean
        gram += block.T @ block
    return gram


def eigh_descending(gram: torch.Tensor, n_vectors: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending, clipped at 0) of a symmetric matrix and its leading ``n_vectors`` eigenvectors
    as columns (all with None, none with 0)."""
    gram = torch.as_tensor(gram).to(torch.float64)
    with single_thread():
        if n_vectors == 0:
            values, vectors = torch.linalg.eigvalsh(gram), torch.zeros((gram.shape[0], 0), dtype=torch.float64)
        else:
            values, vectors = torch.linalg.eigh(gram)
    values = values.flip(0).clamp_min(0.0).cpu().numpy()
    vectors = vectors.flip(1).cpu().numpy()
    return values, vectors if n_vectors is None else vectors[:, : int(n_vectors)].copy()


def gram_eigh(x: torch.Tensor | np.ndarray, *, center: bool = False,
              n_vectors: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition of XᵀX in float64: (all eigenvalues descending, leading eigenvectors as columns).

    The eigenvalues are the squared singular values of X (of the centred X with ``center``),
    the eigenvectors its right singular vectors: all of them with ``n_vectors=None``, else
    the leading ``n_vectors`` ([d, n_vectors]; ``n_vectors=0`` computes eigenvalues only,
    which is cheaper). The covariance eigenvalues of the rows of X are
    ``gram_eigh(x, center=True, n_vectors=0)[0] / (n − 1)``.
    """
    return eigh_descending(gram_matrix(x, center=center), n_vectors)
