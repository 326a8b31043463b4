"""Phases of depth: optimal change-point segmentation of per-layer curves.

The curves (one column per metric, one row per layer) are standardised per column and cut
into ``k`` contiguous segments minimising the total within-segment squared deviation from
each segment's mean (exact dynamic programme, O(k·n²) — n is a few dozen layers).
"""

from __future__ import annotations

import numpy as np


def _segment_costs(x: np.ndarray) -> np.ndarray:
    """cost[i, j] = within-segment sum of squares of rows i..j-1 (j > i)."""
    n = x.shape[0]
    c1 = np.vstack([np.zeros((1, x.shape[1])), np.cumsum(x, axis=0)])
    c2 = np.concatenate([[0.0], np.cumsum((x**2).sum(axis=1))])
    cost = np.full((n + 1, n + 1), np.inf)
    for i in range(n):
        for j in range(i + 1, n + 1):
            s = c1[j] - c1[i]
            cost[i, j] = (c2[j] - c2[i]) - (s @ s) / (j - i)
    return np.maximum(cost, 0.0)


def standardise(curves: np.ndarray) -> np.ndarray:
    x = np.asarray(curves, dtype=float)
    if x.ndim == 1:
        x = x[:, None]
    x = x[:, np.all(np.isfinite(x), axis=0)]
    std = x.std(axis=0)
    keep = std > 1e-12
    return (x[:, keep] - x[:, keep].mean(axis=0)) / std[keep]


def segment(curves: np.ndarray, n_segments: int, *, standardize: bool = True) -> list[int]:
    """Start indices of segments 2..k of the optimal k-segmentation of the rows of ``curves``."""
    x = standardise(curves) if standardize else np.asarray(curves, dtype=float).reshape(len(curves), -1)
    n = x.shape[0]
    k = max(1, min(int(n_segments), n))
    if k == 1 or x.shape[1] == 0:
        return []
    cost = _segment_costs(x)
    best = np.full((k + 1, n + 1), np.inf)
    arg = np.zeros((k + 1, n + 1), dtype=int)
    best[0, 0] = 0.0
    for s in range(1, k + 1):
        for j in range(s, n + 1):
            candidates = best[s - 1, s - 1 : j] + cost[s - 1 : j, j]
            i = int(np.argmin(candidates))
            best[s, j] = candidates[i]
            arg[s, j] = i + s - 1
    bounds = []
    j = n
    for s in range(k, 0, -1):
        i = arg[s, j]
        bounds.append(i)
        j = i
    return sorted(b for b in bounds if b > 0)


def phases_from_boundaries(boundaries: list[int], n: int) -> list[dict]:
    """[{'phase': 1, 'start': 0, 'end': b1 - 1}, …] with inclusive layer ranges."""
    edges = [0, *boundaries, n]
    return [{"phase": i + 1, "start": edges[i], "end": edges[i + 1] - 1} for i in range(len(edges) - 1)]
