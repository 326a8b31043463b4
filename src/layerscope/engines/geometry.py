"""Geometry of point clouds, shared by the residual, delta and embedding experiments.

Each function names its definition:

* ``mean_pairwise_cosine`` — the mean of cos(x_i, x_j) over all ordered pairs i ≠ j,
  computed exactly in O(n·d) as (‖Σ u_i‖² − n) / (n(n − 1)) with u_i = x_i / ‖x_i‖;
* ``eigen_isotropy`` — 1 − λ_max / Σλ of the covariance eigenvalues (0: one direction
  holds all variance; 1 − 1/d: perfectly isotropic);
* ``between_within_ratio`` — mean distance between points of different labels over the
  mean distance between points of the same label (1: no clustering; > 1: clustered);
* ``cayley_menger_volume`` — the k-volume of a simplex with k + 1 vertices from its squared
  edge lengths (Cayley–Menger determinant), batched;
* ``subspace_overlap`` — ‖AᵀB‖_F² / k for orthonormal bases A, B of two k-dimensional
  subspaces (mean squared cosine of their principal angles: 1 identical, k/d expected
  for random subspaces of R^d);
* ``capture`` — ‖Bᵀv‖² / ‖v‖²: the fraction of a vector's energy inside span(B);
* ``leave_one_out_capture`` — for each member of a group of blocks, the capture of its top
  direction by the shared subspace of the *other* members' directions (batched, so that a
  null distribution of random directions runs through the very same code);
* ``random_frames`` — independent Haar-random orthonormal k-frames, the null of the above;
* ``resampled_pair_means`` — means of a pairwise quantity over the pairs of distinct units
  of a bootstrap resample (copies of one unit never pair with each other);
* ``permuted_between_within`` — the between / within ratio of a distance matrix under many
  label permutations at once (a permutation null of ``between_within_ratio``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.spatial.distance import pdist

from layerscope.engines.spectra import single_thread


def unit_rows(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """The non-zero rows of x scaled to unit norm, in float64 (zero rows are dropped)."""
    x = torch.as_tensor(x).to(torch.float64)
    norms = x.norm(dim=1)
    keep = norms > 0
    if not bool(keep.all()):
        x, norms = x[keep], norms[keep]
    return x / norms[:, None]


def mean_pairwise_cosine(x: torch.Tensor | np.ndarray, *, center: torch.Tensor | np.ndarray | None = None,
                         chunk_rows: int = 1024) -> float:
    """Mean cosine similarity over all ordered pairs of distinct rows of x − center (zero rows excluded).

    Works through x by row chunks in float64, so no float64 copy of x is made.
    """
    m = torch.as_tensor(x).detach()
    shift = None if center is None else torch.as_tensor(center, dtype=torch.float64)
    total = torch.zeros(m.shape[1], dtype=torch.float64)
    n = 0
    for start in range(0, m.shape[0], chunk_rows):
        block = m[start : start + chunk_rows].to(torch.float64)
        if shift is not None:
            block = block - shift
        u = unit_rows(block)
        total += u.sum(dim=0)
        n += u.shape[0]
    if n < 2:
        return float("nan")
    return float(((total @ total) - n) / (n * (n - 1)))


def eigen_isotropy(eigenvalues: np.ndarray) -> float:
    """1 − λ_max / Σλ."""
    lam = np.clip(np.asarray(eigenvalues, dtype=float), 0, None)
    total = lam.sum()
    return float(1.0 - lam.max() / total) if total > 0 else float("nan")


def between_within_ratio(points: np.ndarray, labels, metric: str = "euclidean") -> dict:
    """Mean between-label over mean within-label pairwise distance (scipy ``pdist`` metric).

    Returns ``{"ratio", "between", "within", "n_within_pairs", "n_between_pairs"}``; the ratio
    is NaN when there are no within-label pairs or no between-label pairs.
    """
    points = np.asarray(points, dtype=np.float64)
    labels = np.asarray(labels)
    n = len(labels)
    if n < 2:
        return {"ratio": float("nan"), "between": float("nan"), "within": float("nan"),
                "n_within_pairs": 0, "n_between_pairs": 0}
    dist = pdist(points, metric=metric)
    i, j = np.triu_indices(n, k=1)  # pdist's pair order
    same = labels[i] == labels[j]
    within = float(dist[same].mean()) if same.any() else float("nan")
    between = float(dist[~same].mean()) if (~same).any() else float("nan")
    ratio = between / within if same.any() and (~same).any() and within > 0 else float("nan")
    return {"ratio": ratio, "between": between, "within": within,
            "n_within_pairs": int(same.sum()), "n_between_pairs": int((~same).sum())}


def cayley_menger_volume(points: np.ndarray | torch.Tensor) -> np.ndarray:
    """k-volume of simplices given as [..., k+1, d] vertex arrays, by the Cayley–Menger determinant.

    V² = (−1)^(k+1) / (2^k (k!)²) · det(CM), with CM the (k+2)×(k+2) matrix of squared edge
    lengths bordered by ones. Each simplex is rescaled by its mean squared edge length before
    the determinant (V scales as s^k), which keeps the determinant well conditioned. A
    degenerate simplex (V² ≤ 0 from rounding) gets volume 0.
    """
    p = np.asarray(points, dtype=np.float64)
    if p.ndim < 2 or p.shape[-2] < 2:
        raise ValueError(f"need vertices as [..., k+1, d] with k ≥ 1, got shape {p.shape}")
    m = p.shape[-2]
    k = m - 1
    diff = p[..., :, None, :] - p[..., None, :, :]
    sq = (diff**2).sum(-1)  # [..., m, m]
    iu = np.triu_indices(m, k=1)
    scale = sq[..., iu[0], iu[1]].mean(-1)  # mean squared edge length
    safe = np.where(scale > 0, scale, 1.0)
    sq = sq / safe[..., None, None]
    cm = np.ones(p.shape[:-2] + (m + 1, m + 1))
    cm[..., 0, 0] = 0.0
    cm[..., 1:, 1:] = sq
    det = np.linalg.det(cm)
    vol_sq = (-1) ** (k + 1) * det / (2**k * math.factorial(k) ** 2)
    vol = np.sqrt(np.clip(vol_sq, 0, None)) * safe ** (k / 2)
    return np.where(scale > 0, vol, 0.0)


def regular_simplex_volume(k: int, edge: float = 1.0) -> float:
    """Closed form: the k-volume of a regular k-simplex with the given edge length."""
    return edge**k / math.factorial(k) * math.sqrt((k + 1) / 2**k)


def subspace_overlap(a: np.ndarray, b: np.ndarray) -> float:
    """‖AᵀB‖_F² / k for orthonormal columns A [d, k], B [d, k]."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(np.sum((a.T @ b) ** 2) / min(a.shape[1], b.shape[1]))


def capture(basis: np.ndarray, v: np.ndarray) -> float:
    """Fraction of ‖v‖² inside the span of the orthonormal columns of ``basis`` [d, r]."""
    v = np.asarray(v, dtype=float)
    norm = v @ v
    return float(np.sum((np.asarray(basis, dtype=float).T @ v) ** 2) / norm) if norm > 0 else float("nan")


def orthonormal_basis(vectors: np.ndarray, rank: int) -> np.ndarray:
    """The top-``rank`` right singular vectors of the stacked row vectors, as columns [d, rank]."""
    _, _, vt = np.linalg.svd(np.asarray(vectors, dtype=float), full_matrices=False)
    return vt[:rank].T


def leave_one_out_capture(directions: np.ndarray, groups, rank: int, *, include_self: bool = False,
                          rtol: float = 1e-10) -> np.ndarray:
    """Capture of each block's top direction by the shared subspace of its group.

    ``directions`` [..., n_blocks, k, d]: each block's k orthonormal directions (row 0 the top
    one), any leading batch axes (resamples, null draws). ``groups``: the group (phase) of every
    block. For block i of group G the shared subspace is spanned by the top-``rank`` right
    singular vectors of the stacked directions of G \\ {i} (of G with ``include_self``, which
    contains v_i and is inflated by construction); the capture is ‖Bᵀv_i‖² / ‖v_i‖². Computed
    from the Gram matrix S Sᵀ of the stacked rows S: with S = U Σ Vᵀ, ‖V_rᵀ v‖² = Σ_j (u_j·S v)²
    / σ_j² over the top r components (those with σ_j² ≤ ``rtol`` · σ_1² are rank deficiency and
    are dropped). A block that is alone in its group gets NaN (no other direction to share).
    Returns [..., n_blocks].
    """
    x = torch.as_tensor(np.asarray(directions, dtype=np.float64))
    *batch, n_blocks, k, d = x.shape
    groups = np.asarray(groups)
    if groups.shape != (n_blocks,):
        raise ValueError(f"{n_blocks} blocks but {groups.shape} group labels")
    if rank < 1:
        raise ValueError(f"rank must be ≥ 1, got {rank}")
    out = torch.full((*batch, n_blocks), float("nan"), dtype=torch.float64)
    for g in dict.fromkeys(groups.tolist()):
        members = np.nonzero(groups == g)[0]
        stacked = x[..., members, :, :].reshape(*batch, len(members) * k, d)
        gram = stacked @ stacked.transpose(-1, -2)  # [..., m·k, m·k]
        for pos, block in enumerate(members):
            own = pos * k  # the row of v_i (its top direction) in the stack
            keep = np.arange(len(members) * k) if include_self else np.concatenate(
                [np.arange(0, own), np.arange(own + k, len(members) * k)])
            if len(keep) == 0:
                continue
            index = torch.from_numpy(keep)
            sub = gram.index_select(-2, index).index_select(-1, index)
            projected = gram[..., own].index_select(-1, index)  # S v_i
            with single_thread():
                values, vectors = torch.linalg.eigh(sub)  # ascending
            r = min(int(rank), len(keep))
            values, vectors = values[..., -r:], vectors[..., -r:]
            coefficient = (vectors * projected[..., :, None]).sum(-2)
            usable = values > rtol * values[..., -1:]
            energy = torch.where(usable, coefficient**2 / torch.where(usable, values, 1.0), 0.0).sum(-1)
            norm = gram[..., own, own]
            out[..., block] = torch.where(norm > 0, energy / torch.where(norm > 0, norm, 1.0), float("nan"))
    return out.numpy()


def random_frames(shape: tuple[int, ...], k: int, d: int, rng: np.random.Generator) -> np.ndarray:
    """Independent Haar-random orthonormal k-frames of R^d as rows: [*shape, k, d]."""
    g = torch.from_numpy(rng.standard_normal((*shape, d, k)))
    with single_thread():
        q, r = torch.linalg.qr(g)
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[..., None, :]
    return q.transpose(-1, -2).numpy()


def resample_counts(index: np.ndarray, n_units: int) -> np.ndarray:
    """[n_resamples, n_units] multiplicity of every unit in each resample, from a resample index array
    [n_resamples, n_draws] (the identity resample ``arange(n_units)[None]`` gives ones)."""
    index = np.asarray(index, dtype=np.int64)
    offsets = np.arange(index.shape[0])[:, None] * n_units
    return np.bincount((index + offsets).ravel(), minlength=index.shape[0] * n_units).reshape(
        index.shape[0], n_units).astype(np.float64)


def resampled_pair_means(values: np.ndarray, masks: dict[str, np.ndarray], counts: np.ndarray) -> dict[str, np.ndarray]:
    """Weighted means of a symmetric pairwise quantity over the pairs of *distinct* units.

    ``values`` [n, n] (e.g. distances between prompts), ``masks`` name → boolean [n, n]
    (e.g. same-category pairs), ``counts`` [B, n] multiplicities of a resample. A pair (i, j),
    i ≠ j, weighs counts_i · counts_j: the mean over every pair of drawn units except the pairs
    of two copies of one unit (which would pair a point with itself). With counts of ones it is
    the plain mean over the masked pairs i < j. Returns name → [B] (NaN without any pair).
    """
    values = np.asarray(values, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.float64)
    off = ~np.eye(values.shape[0], dtype=bool)
    out = {}
    for name, mask in masks.items():
        m = (np.asarray(mask, dtype=bool) & off).astype(np.float64)
        weight = np.einsum("bi,ij,bj->b", counts, m, counts)
        total = np.einsum("bi,ij,bj->b", counts, m * values, counts)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[name] = np.where(weight > 0, total / np.where(weight > 0, weight, 1.0), np.nan)
    return out


def permuted_between_within(distances: np.ndarray, permutations) -> np.ndarray:
    """Between / within mean distance under each labelling: [n_perm, n_matrices].

    ``distances`` [n_matrices, n, n] (symmetric, e.g. one per layer), ``permutations`` a sequence
    of label arrays [n] (e.g. permuted category labels). With the original labels it equals
    :func:`between_within_ratio`'s ratio on the points the distances come from; NaN where a
    labelling has no within or no between pair.
    """
    d = np.asarray(distances, dtype=np.float64)
    if d.ndim == 2:
        d = d[None]
    n = d.shape[-1]
    flat = np.nan_to_num(d).reshape(len(d), n * n)
    labels = np.stack([np.asarray(x) for x in permutations])  # [P, n]
    off = ~np.eye(n, dtype=bool)
    same = (labels[:, :, None] == labels[:, None, :]) & off
    different = (labels[:, :, None] != labels[:, None, :]) & off
    same = same.reshape(len(labels), n * n).astype(np.float64)
    different = different.reshape(len(labels), n * n).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        within = (same @ flat.T) / same.sum(1, keepdims=True)
        between = (different @ flat.T) / different.sum(1, keepdims=True)
        return np.where(within > 0, between / within, np.nan)
