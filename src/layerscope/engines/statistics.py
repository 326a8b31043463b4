"""Uncertainty for headline numbers: a seeded bootstrap over the independent unit, exact
binomial intervals, permutation and random-subspace nulls, multiple-testing correction,
partial rank correlation.

The unit of resampling is the prompt (the pair for paired prompt sets): tokens of one
prompt are not independent, so they are never resampled on their own. Every statistic is
computed from per-unit quantities an experiment already has, so an interval costs no
forward pass.

A statistic is a function of one or more per-unit arrays whose *second* axis is the unit
axis: it receives arrays of shape ``[n_boot, n_units, ...]`` (the resamples) and returns
``[n_boot, ...]``. The point value is the same function on the original sample (a batch of
one), so point and interval can never disagree on a definition. For example the
token-weighted mean loss of a set of prompts, from per-prompt loss sums and token counts::

    boot.interval(lambda s, n: s.sum(1) / n.sum(1), loss_sum, n_tokens)

Intervals are percentile intervals at ``level``; when the bootstrap distribution is so
skewed that it misses the point value (a ratio or a minimum over few units), the interval
is widened to include it: an interval never excludes the number it is reported with.

:class:`Bootstrap` also collects the reasons a claim cannot be carried by the sample
(``underpowered``), and writes the ``uncertainty`` object every summary.json carries.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy import stats

from layerscope import LayerscopeError

N_BOOT = 1000
LEVEL = 0.95
MIN_UNITS = 5  # fewer units than this: an interval is reported but flagged underpowered
MIN_STABILITY = 0.8  # an argmax-type finding the bootstrap reproduces less often is flagged


def mean(x: np.ndarray) -> np.ndarray:
    """The plain mean over units (axis 1), the default statistic."""
    return x.mean(axis=1)


def weighted_mean(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Σ sums / Σ counts over units: a token-weighted mean from per-unit sums and token counts."""
    return sums.sum(axis=1) / counts.sum(axis=1)


class Bootstrap:
    """A seeded bootstrap over ``n_units`` independent units (see the module docstring)."""

    def __init__(self, n_units: int, *, unit: str = "prompt", n_boot: int = N_BOOT, level: float = LEVEL,
                 seed: int = 0):
        if n_units < 1:
            raise LayerscopeError(f"a bootstrap needs at least one {unit} (got {n_units})")
        if n_boot < 1 or not 0 < level < 1:
            raise LayerscopeError(f"bootstrap needs n_boot ≥ 1 and 0 < level < 1 (got {n_boot}, {level})")
        self.n_units = int(n_units)
        self.unit = unit
        self.n_boot = int(n_boot)
        self.level = float(level)
        self.seed = int(seed)
        self.index = np.random.default_rng([self.seed, 0xB00]).integers(0, self.n_units,
                                                                        size=(self.n_boot, self.n_units))
        self.reasons: list[str] = []
        if self.n_units < MIN_UNITS:
            self.flag(f"only {self.n_units} {unit}s (intervals need at least {MIN_UNITS})")

    # -- resampling ---------------------------------------------------------------------------
    def _arrays(self, arrays: Sequence) -> list[np.ndarray]:
        out = [np.asarray(a, dtype=float) for a in arrays]
        for a in out:
            if a.ndim == 0 or a.shape[0] != self.n_units:
                raise LayerscopeError(f"bootstrap: per-unit arrays need {self.n_units} rows (got shape {a.shape})")
        return out

    def distribution(self, statistic: Callable[..., np.ndarray], *arrays) -> tuple[np.ndarray, np.ndarray]:
        """(point value, bootstrap values [n_boot, ...]) of ``statistic`` on the per-unit ``arrays``."""
        arrays = self._arrays(arrays)
        point = np.asarray(statistic(*[a[None] for a in arrays]))[0]
        boot = np.asarray(statistic(*[a[self.index] for a in arrays]))
        return point, boot

    def interval(self, *arrays, statistic: Callable[..., np.ndarray] = mean):
        """(point, [lo, hi]) of ``statistic``; per-element pairs when the statistic is a vector.

        Non-finite resamples (a statistic undefined on a resample) are left out; if none is
        finite the interval is the point value itself and the claim is flagged.
        """
        point, boot = self.distribution(statistic, *arrays)
        return _plain(point), _intervals(point, boot, self.level)

    def stability(self, *arrays, statistic: Callable[..., np.ndarray] = mean,
                  pick: Callable[[np.ndarray], Any] = lambda v: int(np.nanargmax(v))) -> tuple[Any, float]:
        """(answer, fraction of resamples whose ``pick`` of the statistic equals the answer)."""
        point, boot = self.distribution(statistic, *arrays)
        answer = pick(point)
        same = np.mean([_same(pick(b), answer) for b in boot])
        return answer, float(same)

    # -- claims --------------------------------------------------------------------------------
    def flag(self, reason: str) -> None:
        """Record why a claim of this summary cannot be carried by the sample."""
        if reason not in self.reasons:
            self.reasons.append(reason)

    def check_stability(self, name: str, stability: float, threshold: float = MIN_STABILITY) -> None:
        if stability < threshold:
            self.flag(f"{name} is reproduced by {stability:.0%} of bootstrap resamples (< {threshold:.0%})")

    def summary(self) -> dict[str, Any]:
        """The ``uncertainty`` object and the ``underpowered`` flag with its reasons."""
        return {
            "uncertainty": uncertainty(self.unit, self.n_units, n_boot=self.n_boot, level=self.level),
            "underpowered": bool(self.reasons),
            "underpowered_reasons": list(self.reasons),
        }


def uncertainty(unit: str, n_units: int, *, n_boot: int = N_BOOT, level: float = LEVEL,
                method: str = "percentile bootstrap over units") -> dict[str, Any]:
    return {"unit": unit, "n_units": int(n_units), "n_boot": int(n_boot), "level": float(level), "method": method}


def deterministic(reason: str) -> dict[str, Any]:
    """The summary fragment of an experiment whose numbers are exact given the weights."""
    return {
        "uncertainty": {"unit": None, "n_units": None, "n_boot": 0, "level": None,
                        "method": f"none: deterministic given {reason}"},
        "underpowered": False,
        "underpowered_reasons": [],
    }


def _plain(x):
    x = np.asarray(x)
    return float(x) if x.ndim == 0 else x.astype(float).tolist()


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return bool(np.array_equal(np.asarray(a), np.asarray(b)))
    return a == b


def _intervals(point: np.ndarray, boot: np.ndarray, level: float):
    point = np.asarray(point, dtype=float)
    boot = np.asarray(boot, dtype=float).reshape(boot.shape[0], -1)
    alpha = (1 - level) / 2
    flat_point = point.reshape(-1)
    pairs = []
    for j in range(boot.shape[1]):
        b = boot[:, j][np.isfinite(boot[:, j])]
        p = flat_point[j]
        if not np.isfinite(p):
            pairs.append([None, None])
            continue
        if b.size == 0:
            pairs.append([float(p), float(p)])
            continue
        lo, hi = np.quantile(b, [alpha, 1 - alpha])
        pairs.append([float(min(lo, p)), float(max(hi, p))])
    if point.ndim == 0:
        return pairs[0]
    return np.asarray(pairs, dtype=object).reshape(*point.shape, 2).tolist()


def contain(ci, point):
    """``ci`` widened to contain ``point`` (element by element for per-layer lists of pairs).

    For a value reported from a computation other than the bootstrap statistic (a loss pooled
    over per-token arrays, a curve computed over the whole table): the two agree up to the
    order of summation, so the widening is a rounding step at most. Pairs without a finite
    point or without an interval are returned as they are.
    """
    point = np.asarray(point, dtype=float)
    if point.ndim == 0:
        lo, hi = ci
        if lo is None or hi is None or not np.isfinite(point):
            return ci
        return [float(min(lo, point)), float(max(hi, point))]
    return [contain(c, p) for c, p in zip(ci, point)]


def binomial_interval(k: int, n: int, level: float = LEVEL) -> list[float]:
    """Exact (Clopper–Pearson) interval of a rate k/n; [0, 1] when n = 0."""
    if n <= 0:
        return [0.0, 1.0]
    ci = stats.binomtest(int(k), int(n)).proportion_ci(confidence_level=level, method="exact")
    return [float(ci.low), float(ci.high)]


def empirical_p(observed: float, null: np.ndarray, *, greater: bool = True) -> float:
    """One-sided permutation p-value with the +1 correction: (1 + #null ≥ observed) / (1 + n)."""
    null = np.asarray(null, dtype=float)
    null = null[np.isfinite(null)]
    hits = (null >= observed).sum() if greater else (null <= observed).sum()
    return float((1 + hits) / (1 + null.size))


def null_summary(observed: float, null: np.ndarray, *, greater: bool = True) -> dict[str, float]:
    """Where ``observed`` falls in a null distribution: mean, 95th (5th) percentile, percentile, p."""
    null = np.asarray(null, dtype=float)
    null = null[np.isfinite(null)]
    if null.size == 0:
        raise LayerscopeError("null distribution is empty")
    return {
        "null_mean": float(null.mean()),
        "null_q": float(np.quantile(null, 0.95 if greater else 0.05)),
        "percentile": float((null < observed).mean() * 100),
        "p_value": empirical_p(observed, null, greater=greater),
        "n_null": int(null.size),
    }


def permutation_null(statistic: Callable[[np.ndarray], float], labels: Sequence, *, n_perm: int = 1000,
                     seed: int = 0) -> np.ndarray:
    """``statistic(permuted labels)`` over ``n_perm`` seeded label permutations."""
    labels = np.asarray(labels)
    rng = np.random.default_rng([int(seed), 0x9E3])
    return np.array([statistic(rng.permutation(labels)) for _ in range(int(n_perm))], dtype=float)


def random_subspaces(d: int, k: int, n: int, *, seed: int = 0, dtype=np.float64) -> np.ndarray:
    """``n`` Haar-random orthonormal bases of k-dimensional subspaces of R^d: [n, d, k]."""
    if not 1 <= k <= d:
        raise LayerscopeError(f"random subspace of dimension {k} in R^{d}")
    g = np.random.default_rng([int(seed), 0x5B5]).standard_normal((int(n), d, k)).astype(dtype)
    q, r = np.linalg.qr(g)
    return q * np.sign(np.diagonal(r, axis1=1, axis2=2))[:, None, :]


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values (family-wise error), in the input order."""
    p = np.asarray(pvalues, dtype=float)
    m = p.size
    order = np.argsort(p)
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


def partial_spearman(x: Sequence[float], y: Sequence[float], z: Sequence[float]) -> tuple[float, float]:
    """Spearman correlation of x and y with z partialled out, and its two-sided p-value.

    Ranks are regressed on z's ranks and the residuals correlated (Pearson); the p-value uses
    the t distribution with n − 3 degrees of freedom.
    """
    rx, ry, rz = (stats.rankdata(np.asarray(v, dtype=float)) for v in (x, y, z))
    n = rx.size
    if n < 4:
        return float("nan"), float("nan")
    design = np.column_stack([np.ones(n), rz])

    def resid(v):
        coef, *_ = np.linalg.lstsq(design, v, rcond=None)
        return v - design @ coef

    ex, ey = resid(rx), resid(ry)
    denom = np.sqrt((ex @ ex) * (ey @ ey))
    if denom == 0:
        return float("nan"), float("nan")
    r = float(np.clip(ex @ ey / denom, -1, 1))
    df = n - 3
    t = r * np.sqrt(df / max(1e-300, 1 - r * r))
    return r, float(2 * stats.t.sf(abs(t), df))
