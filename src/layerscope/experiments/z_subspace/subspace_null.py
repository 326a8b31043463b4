"""Null distributions from random subspaces: projections of fixed data onto many Haar-random k-subspaces.

The z_subspace controls ask how a number computed in Z compares with the same number in a
random subspace of the same dimension k. Every such number depends on the data only through
the projections Qᵀx of the data vectors x onto the subspace (Q: an orthonormal d × k basis),
and the data lie in their own span, of dimension r (at most the number of vectors). So the
draws never need a d × k basis:

* a Haar-random subspace is the span of a d × k matrix G of independent standard normals,
  and Q = G L⁻ᵀ (GᵀG = LLᵀ, Cholesky) is an orthonormal basis of it, so Qᵀx = L⁻¹Gᵀx;
* with U an orthonormal basis of the data's span and x = Uc, Gᵀx = G₁ᵀc where G₁ = UᵀG is an
  r × k matrix of independent standard normals, and GᵀG = G₁ᵀG₁ + W with W = G₂ᵀG₂ (G₂ = U⊥ᵀG,
  independent of G₁) a Wishart_k(d − r, I) matrix, drawn by the Bartlett decomposition (or as
  G₂ᵀG₂ itself when d − r < k).

Each draw therefore costs O(r·k² + k³ + n·r·k) instead of a QR factorisation of a d × k
matrix, with exactly the distribution of :func:`layerscope.engines.statistics.random_subspaces`
(the tests compare the two). Draws are generated in chunks that keep memory bounded, from one
generator seeded by (seed, key), so a given (seed, key, n) always gives the same null.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from layerscope import LayerscopeError

CHUNK_BYTES = 64 * 2**20  # float64 held per chunk of draws


def span_coordinates(rows: np.ndarray) -> np.ndarray:
    """Coordinates [n, r] of the rows of ``rows`` [n, d] in an orthonormal basis of a space that holds them.

    With fewer rows than dimensions, the basis is that of their span (r = rank), from the
    eigendecomposition of the n × n Gram matrix (directions with an eigenvalue below a float64
    tolerance of the largest are dropped); otherwise the rows themselves (the standard basis, r = d).
    """
    rows = np.asarray(rows, dtype=np.float64)
    if rows.ndim != 2 or rows.shape[0] == 0:
        raise LayerscopeError(f"span_coordinates needs a non-empty [n, d] array, got shape {rows.shape}")
    n, d = rows.shape
    if n >= d:
        return rows
    gram = torch.from_numpy(rows) @ torch.from_numpy(rows).T
    values, vectors = torch.linalg.eigh(gram)
    values, vectors = values.numpy(), vectors.numpy()
    top = values.max(initial=0.0)
    if top <= 0:
        return np.zeros((n, 1))
    keep = values > top * max(n, d) * np.finfo(np.float64).eps * 10
    return vectors[:, keep] * np.sqrt(values[keep])  # rows = P S Wᵀ: coordinates P S in the basis W


def _wishart(rng: np.random.Generator, c: int, k: int, df: int) -> np.ndarray:
    """``c`` draws of a Wishart_k(df, I) matrix [c, k, k] (df may be 0 or smaller than k)."""
    if df <= 0:
        return np.zeros((c, k, k))
    if df < k:
        h = rng.standard_normal((c, df, k))
        return np.matmul(h.transpose(0, 2, 1), h)
    a = np.tril(rng.standard_normal((c, k, k)), -1)
    idx = np.arange(k)
    a[:, idx, idx] = np.sqrt(rng.chisquare(df - idx, size=(c, k)))
    return np.matmul(a, a.transpose(0, 2, 1))


def projections_from(coords: np.ndarray, g1: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Qᵀx for every row of ``coords`` [n, r] and every draw (G₁ [c, r, k], W [c, k, k]): [c, n, k].

    Qᵀx = L⁻¹G₁ᵀc with GᵀG = G₁ᵀG₁ + W = LLᵀ: the triangular solves act on G₁ (r × k per draw),
    then one matrix product projects every row for every draw. The products run in torch
    (float64), whose thread count the job sets, rather than in numpy's BLAS, which sizes its
    own thread pool when it is imported.
    """
    c, r, k = g1.shape
    g1t = torch.from_numpy(np.ascontiguousarray(g1))
    gram = g1t.mT @ g1t + torch.from_numpy(np.ascontiguousarray(w))
    chol = torch.linalg.cholesky(gram)
    basis = torch.linalg.solve_triangular(chol, g1t.mT, upper=False)  # [c, k, r] = L⁻¹G₁ᵀ
    flat = basis.permute(2, 0, 1).reshape(r, c * k)  # [r, c·k]
    out = torch.from_numpy(np.ascontiguousarray(coords)) @ flat  # [n, c·k]
    return out.reshape(-1, c, k).permute(1, 0, 2).numpy()


def random_projections(rows: np.ndarray, d: int, k: int, n: int, *, seed: int, key: tuple[int, ...] = (),
                       max_bytes: int = CHUNK_BYTES) -> Iterator[np.ndarray]:
    """Projections Qᵀx [c, n_rows, k] of the rows onto ``n`` Haar-random k-subspaces of R^d, in chunks.

    The rows are the data vectors (in R^d); chunks together hold ``n`` independent draws.
    """
    if not 1 <= k <= d:
        raise LayerscopeError(f"random subspace of dimension {k} in R^{d}")
    if n < 1:
        raise LayerscopeError(f"a null distribution needs at least one random subspace (got {n})")
    coords = span_coordinates(rows)
    n_rows, r = coords.shape
    per_draw = 8 * (r * k + 3 * k * k + 2 * n_rows * k + (max(d - r, 0) * k if d - r < k else 0))
    per = max(1, int(max_bytes // per_draw))
    rng = np.random.default_rng([int(seed) % 2**32, 0x5B5, *[int(v) % 2**32 for v in key]])
    done = 0
    while done < n:
        c = min(per, n - done)
        g1 = rng.standard_normal((c, r, k))
        w = _wishart(rng, c, k, d - r)
        yield projections_from(coords, g1, w)
        done += c
