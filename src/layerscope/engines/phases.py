"""Phases of depth: optimal change-point segmentation of per-layer curves, with the number of
segments chosen by a penalised criterion.

The curves (one column per metric, one row per layer) are standardised per column and cut
into ``k`` contiguous segments minimising the total within-segment squared deviation from
each segment's mean (exact dynamic programme, O(k·n²) — n is a few dozen layers).

How many segments: :func:`select_segments` fits every k = 1 … K (K a maximum, never the
answer by construction) and keeps the k with the smallest Bayesian information criterion
of a piecewise-constant model with Gaussian noise of one unknown variance,

    BIC(k) = N · log(RSS_k / N) + p_k · log N,   N = n·m,   p_k = k·m + (k − 1) + 1,

(n layers, m standardised curves; p_k counts the k·m segment means, the k − 1 change
points and the noise variance). K is capped so that p_k < N and k < n (a segmentation
into single layers leaves no residual to estimate the noise from). The m curves of one
model are usually strongly correlated, so N overstates the independent evidence: the
criterion leans towards more segments, not fewer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def _segment_costs(x: np.ndarray) -> np.ndarray:
    """cost[i, j] = within-segment sum of squares of rows i..j-1 (j > i); inf elsewhere."""
    n = x.shape[0]
    c1 = np.vstack([np.zeros((1, x.shape[1])), np.cumsum(x, axis=0)])  # [n + 1, m]
    c2 = np.concatenate([[0.0], np.cumsum((x**2).sum(axis=1))])  # [n + 1]
    s = c1[None, :, :] - c1[:, None, :]  # s[i, j] = Σ rows i..j-1
    length = np.arange(n + 1)[None, :] - np.arange(n + 1)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        cost = (c2[None, :] - c2[:, None]) - (s**2).sum(axis=2) / length
    cost = np.where(length > 0, np.maximum(cost, 0.0), np.inf)
    return cost


def standardise(curves: np.ndarray) -> np.ndarray:
    x = np.asarray(curves, dtype=float)
    if x.ndim == 1:
        x = x[:, None]
    x = x[:, np.all(np.isfinite(x), axis=0)]
    std = x.std(axis=0)
    keep = std > 1e-12
    return (x[:, keep] - x[:, keep].mean(axis=0)) / std[keep]


def _prepare(curves: np.ndarray, standardize: bool) -> np.ndarray:
    return standardise(curves) if standardize else np.asarray(curves, dtype=float).reshape(len(curves), -1)


def _optimal(x: np.ndarray, k_max: int) -> tuple[np.ndarray, np.ndarray]:
    """best[s, j]: least cost of rows 0..j-1 in s segments; arg[s, j]: start of the last one."""
    n = x.shape[0]
    cost = _segment_costs(x)
    best = np.full((k_max + 1, n + 1), np.inf)
    arg = np.zeros((k_max + 1, n + 1), dtype=int)
    best[0, 0] = 0.0
    for s in range(1, k_max + 1):
        for j in range(s, n + 1):
            candidates = best[s - 1, s - 1 : j] + cost[s - 1 : j, j]
            i = int(np.argmin(candidates))
            best[s, j] = candidates[i]
            arg[s, j] = i + s - 1
    return best, arg


def _boundaries(arg: np.ndarray, n: int, k: int) -> list[int]:
    bounds = []
    j = n
    for s in range(k, 0, -1):
        i = int(arg[s, j])
        bounds.append(i)
        j = i
    return sorted(b for b in bounds if b > 0)


def segment(curves: np.ndarray, n_segments: int, *, standardize: bool = True) -> list[int]:
    """Start indices of segments 2..k of the optimal k-segmentation of the rows of ``curves`` (k fixed)."""
    x = _prepare(curves, standardize)
    n = x.shape[0]
    k = max(1, min(int(n_segments), n))
    if k == 1 or x.shape[1] == 0:
        return []
    _, arg = _optimal(x, k)
    return _boundaries(arg, n, k)


@dataclass
class Segmentation:
    """The segmentation chosen by BIC among k = 1 … ``max_segments`` (see the module docstring)."""

    n_segments: int  # the chosen k
    boundaries: list[int]  # first row of segments 2..k
    max_segments: int  # the K asked for
    bic: list[float] = field(default_factory=list)  # BIC(k) for k = 1 … len(bic) (K capped, see the docstring)
    rss: list[float] = field(default_factory=list)  # within-segment sum of squares for the same k


def bic_value(rss: float, n_points: int, n_params: int, floor: float) -> float:
    return float(n_points * np.log(max(rss, floor) / n_points) + n_params * np.log(n_points))


def select_segments(curves: np.ndarray, max_segments: int, *, standardize: bool = True) -> Segmentation:
    """The optimal segmentation whose number of segments k ≤ ``max_segments`` minimises BIC."""
    x = _prepare(curves, standardize)
    n, m = x.shape[0], x.shape[1]
    K = max(1, int(max_segments))
    if m == 0 or n < 3:
        return Segmentation(1, [], K, [], [])
    n_points = n * m
    k_cap = min(K, n - 1)
    while k_cap > 1 and k_cap * (m + 1) >= n_points:
        k_cap -= 1
    best, arg = _optimal(x, k_cap)
    rss = [float(best[k, n]) for k in range(1, k_cap + 1)]
    # a k that fits exactly (RSS 0) must not win by log(0): floor RSS at a tiny fraction of the total
    floor = max(rss[0], 1e-300) * 1e-12
    bic = [bic_value(r, n_points, k * (m + 1), floor) for k, r in enumerate(rss, start=1)]
    k = int(np.argmin(bic)) + 1
    return Segmentation(k, _boundaries(arg, n, k) if k > 1 else [], K, bic, rss)


def phases_from_boundaries(boundaries: list[int], n: int) -> list[dict]:
    """[{'phase': 1, 'start': 0, 'end': b1 - 1}, …] with inclusive layer ranges."""
    edges = [0, *boundaries, n]
    return [{"phase": i + 1, "start": edges[i], "end": edges[i + 1] - 1} for i in range(len(edges) - 1)]
