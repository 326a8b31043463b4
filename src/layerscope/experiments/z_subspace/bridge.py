"""Bridge: is the map from English to Chinese coordinates in Z a linear map, a rotation?

For each Z-mask (layer ℓ, k), the coordinates of the mean-pooled problem-text states in Z
are X = en · V_Zᵀ and Y = zh · V_Zᵀ (N pairs × k). The bridge is the ridge regression

    W = argmin ‖Y_c − X_c W‖²_F + α ‖W‖²_F,      b = ȳ − x̄ W   (intercept: centred fit)

(``intercept: false`` fits Y = X W without centring, the seed's formula). α = α_rel · tr(X_cᵀX_c)/k
with X_c the centred coordinates of the pairs the fit sees, so a relative strength α_rel means
the same at every layer and k; α_rel = 0 is the minimum-norm least-squares solution.

* ``loo_r2`` (nested cross-validation) = 1 − Σ_i ‖y_i − ŷ_i‖² / Σ_i ‖y_i − ȳ‖², where ŷ_i is
  predicted by the bridge fitted on the other N − 1 pairs with the α_rel that an inner
  leave-one-out over those N − 1 pairs chose from the grid: pair i is never used to choose
  the strength that predicts it. (Choosing α_rel by the leave-one-out score of all N pairs
  and reporting that score — ``loo_r2_best_of_grid`` — is optimistic: it is the maximum over
  the grid of the numbers it was chosen on, and it is positive on pure noise more often
  than the nested score.)
* ``loo_r2_by_alpha``: the plain leave-one-out R² of each grid value; ``alpha_rel`` is the
  grid value the leave-one-out of all N pairs prefers (first on ties), used for the fit
  that describes the map:
* ``r2`` = 1 − Σ_i ‖y_i − ŷ_i‖² / Σ_i ‖y_i − ȳ‖² in sample with ``alpha_rel`` (meaningless when
  N ≤ k, where any targets are fitted exactly);
* ``orthogonality_error`` = ‖WᵀW − I‖_F / k (0 for a rotation) and the singular values of W;
* null: the same nested procedure after pairing each English problem with another problem's
  Chinese version, over ``n_shuffles`` seeded derangements: its mean, 95th percentile, the
  percentile of ``loo_r2`` in it and the empirical p-value (1 + #null ≥ loo_r2) / (1 + n).

Every fit is linear in Y for a given X, fold and α, so the prediction of every held-out pair
is a fixed weighting of the training pairs' targets. These weights are computed once (one
batched SVD per fold); the nested score of any pairing — the real one or a derangement —
is then a few tensor products. Intervals are over pairs: the bootstrap resamples the
per-pair squared errors of the nested predictions (``loo_r2_ci``) and refits the bridge on
resampled pairs (``orthogonality_error_ci``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from layerscope import LayerscopeError
from layerscope.engines import statistics as st
from layerscope.experiments.registry import Experiment, Figure, Job, Result
from layerscope.data.paired_states import POOLING, PairedStates
from layerscope.experiments.z_subspace.z_mask import ZMask

log = logging.getLogger(__name__)

N_SHUFFLES = 1000


@dataclass
class Bridge:
    w: np.ndarray  # [k, k]
    b: np.ndarray  # [k]
    alpha: float


def fit_bridge(x: np.ndarray, y: np.ndarray, alpha_rel: float, *, intercept: bool = True) -> Bridge:
    """Ridge least squares from rows of x to rows of y (see module docstring)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if intercept:
        mx, my = x.mean(axis=0), y.mean(axis=0)
    else:
        mx, my = np.zeros(x.shape[1]), np.zeros(y.shape[1])
    xc, yc = x - mx, y - my
    k = x.shape[1]
    scale = float((xc**2).sum()) / k
    alpha = float(alpha_rel) * scale
    if alpha > 0:
        w = np.linalg.solve(xc.T @ xc + alpha * np.eye(k), xc.T @ yc)
    else:
        w = np.linalg.lstsq(xc, yc, rcond=None)[0]  # minimum-norm solution when underdetermined
    return Bridge(w, my - mx @ w, alpha)


def predict(bridge: Bridge, x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64) @ bridge.w + bridge.b


def r2(y: np.ndarray, pred: np.ndarray) -> float:
    tss = float(((y - y.mean(axis=0)) ** 2).sum())
    return 1.0 - float(((y - pred) ** 2).sum()) / tss if tss > 0 else float("nan")


def loo_predictions(x: np.ndarray, y: np.ndarray, alpha_rel: float, *, intercept: bool = True) -> np.ndarray:
    """Each row of y predicted by the bridge fitted on all other rows."""
    n = x.shape[0]
    if n < 3:
        raise LayerscopeError(f"leave-one-out needs at least 3 pairs, got {n}")
    out = np.zeros_like(y, dtype=np.float64)
    for i in range(n):
        keep = np.arange(n) != i
        out[i] = predict(fit_bridge(x[keep], y[keep], alpha_rel, intercept=intercept), x[i : i + 1])[0]
    return out


def loo_r2(x: np.ndarray, y: np.ndarray, alpha_rel: float, *, intercept: bool = True) -> float:
    return r2(np.asarray(y, dtype=np.float64), loo_predictions(x, y, alpha_rel, intercept=intercept))


def select_alpha(x, y, grid: Sequence[float], *, intercept: bool = True) -> tuple[float, list[float]]:
    """The grid value with the highest LOO R² (first on ties) and every grid value's LOO R²."""
    scores = [loo_r2(x, y, a, intercept=intercept) for a in grid]
    finite = [s if np.isfinite(s) else -np.inf for s in scores]
    return float(grid[int(np.argmax(finite))]), scores


def nested_loo_predictions(x: np.ndarray, y: np.ndarray, grid: Sequence[float], *,
                           intercept: bool = True) -> tuple[np.ndarray, list[float]]:
    """Nested leave-one-out, by explicit refits (the reference for :class:`NestedLoo`).

    Pair i is predicted by the bridge fitted on the other pairs with the α_rel that
    :func:`select_alpha` picks on those pairs alone. Returns the predictions and the α_rel of each fold.
    """
    n = x.shape[0]
    if n < 4:
        raise LayerscopeError(f"nested leave-one-out needs at least 4 pairs, got {n}")
    out = np.zeros_like(y, dtype=np.float64)
    chosen = []
    for i in range(n):
        keep = np.arange(n) != i
        alpha, _ = select_alpha(x[keep], y[keep], grid, intercept=intercept)
        out[i] = predict(fit_bridge(x[keep], y[keep], alpha, intercept=intercept), x[i : i + 1])[0]
        chosen.append(alpha)
    return out, chosen


def _svd(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Batched thin SVD in torch (float64; torch's thread count is the job's)."""
    u, sv, vt = torch.linalg.svd(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)), full_matrices=False)
    return u.numpy(), sv.numpy(), vt.numpy()


def ridge_filter(sv: np.ndarray, alpha: np.ndarray, cutoff: np.ndarray) -> np.ndarray:
    """Spectral filter of the fit, per batch row: s/(s² + α) where α > 0, else the pseudo-inverse's 1/s
    (singular values at or below ``cutoff`` dropped, as ``lstsq(rcond=None)`` does) — as :func:`fit_bridge`."""
    alpha = np.asarray(alpha, dtype=np.float64).reshape(-1, 1)
    keep = sv > cutoff
    pinv = np.where(keep, 1.0 / np.where(keep, sv, 1.0), 0.0)
    ridge = sv / np.where(alpha > 0, sv**2 + alpha, 1.0)
    return np.where(alpha > 0, ridge, pinv)


def fold_weights(x: np.ndarray, train: np.ndarray, target: np.ndarray, grid: Sequence[float], *,
                 intercept: bool = True) -> np.ndarray:
    """Prediction weights of ridge fits: [F, G, N].

    For fold f (training rows ``train[f]`` [F, m], held-out row ``target[f]``) and grid value g,
    the prediction of y[target[f]] by :func:`fit_bridge` on the training rows is
    Σ_n weights[f, g, n] · y[n] (zero weight outside the training rows), for any y.
    """
    x = np.asarray(x, dtype=np.float64)
    n, k = x.shape
    xt = x[train]  # [F, m, k]
    xs = x[target]  # [F, k]
    m = xt.shape[1]
    if intercept:
        mean = xt.mean(axis=1, keepdims=True)
        xt = xt - mean
        xs = xs - mean[:, 0]
    u, sv, vt = _svd(xt)  # xt = u diag(sv) vt
    scale = (xt**2).sum(axis=(1, 2)) / k  # [F]
    proj = np.einsum("fk,frk->fr", xs, vt)  # (x* − x̄) V
    cutoff = np.finfo(np.float64).eps * max(m, k) * sv[:, :1]  # lstsq(rcond=None)
    out = np.zeros((len(train), len(grid), n))
    for g, alpha_rel in enumerate(grid):
        filt = ridge_filter(sv, float(alpha_rel) * scale, cutoff)
        w = np.einsum("fr,fmr->fm", proj * filt, u)  # weights over the training rows
        if intercept:
            w = w + 1.0 / m
        np.put_along_axis(out[:, g, :], train, w, axis=1)
    return out


@dataclass
class NestedLoo:
    """Nested and plain leave-one-out predictions of the bridge as fixed weights on the targets.

    ``outer`` [N, G, N]: pair i predicted by the fit on the other N − 1 pairs with grid value g.
    ``inner`` [N, N, G, N]: inside outer fold i, pair j (≠ i) predicted by the fit on the
    pairs other than i and j (row j = i is unused).
    """

    outer: np.ndarray
    inner: np.ndarray
    grid: list[float]
    _forms: np.ndarray | None = None

    @classmethod
    def build(cls, x: np.ndarray, grid: Sequence[float], *, intercept: bool = True) -> "NestedLoo":
        n = x.shape[0]
        if n < 4:
            raise LayerscopeError(f"nested leave-one-out needs at least 4 pairs, got {n}")
        everyone = np.arange(n)
        outer = fold_weights(x, np.stack([everyone[everyone != i] for i in range(n)]), everyone, grid,
                             intercept=intercept)
        folds = [(i, j) for i in range(n) for j in range(n) if j != i]
        train = np.stack([everyone[(everyone != i) & (everyone != j)] for i, j in folds])
        inner_w = fold_weights(x, train, np.array([j for _, j in folds]), grid, intercept=intercept)
        inner = np.zeros((n, n, len(grid), n))
        idx = np.array(folds)
        inner[idx[:, 0], idx[:, 1]] = inner_w
        return cls(outer, inner, list(map(float, grid)))

    def plain_predictions(self, y: np.ndarray) -> np.ndarray:
        """[G, N, k]: leave-one-out predictions with each grid value."""
        return np.einsum("ign,nk->gik", self.outer, y)

    def choose(self, y: np.ndarray) -> np.ndarray:
        """Index of the grid value each outer fold's inner leave-one-out prefers, for targets y [S, N, k]: [S, N]."""
        n, g = y.shape[1], len(self.grid)
        flat = self.inner.reshape(n * n * g, n)
        pred = np.matmul(flat[None], y).reshape(y.shape[0], n, n, g, -1)  # [S, i, j, G, k]
        err = ((y[:, None, :, None, :] - pred) ** 2).sum(-1)  # [S, i, j, G]
        err[:, np.arange(n), np.arange(n)] = 0.0  # the held-out outer pair takes no part
        sse = err.sum(axis=2)  # [S, N, G]
        # the highest inner R² = the lowest inner SSE (same targets in every grid value); first on ties
        return np.argmin(sse, axis=-1)

    def inner_quadratic_forms(self) -> np.ndarray:
        """M [N, G, N, N] with inner SSE of outer fold i and grid value g = ⟨M[i, g], Y Yᵀ⟩ for any targets Y."""
        if getattr(self, "_forms", None) is None:
            n = self.outer.shape[0]
            resid = np.eye(n)[None, :, None, :] - self.inner  # e_j − a_ijg: [i, j, G, n]
            resid[np.arange(n), np.arange(n)] = 0.0  # the held-out outer pair takes no part
            self._forms = np.einsum("ijgn,ijgm->ignm", resid, resid)
        return self._forms

    def nested_r2_from_gram(self, gram: np.ndarray) -> np.ndarray:
        """Nested R² [S] from target Gram matrices Y Yᵀ [S, N, N] (the same choice and score as
        :meth:`nested_predictions`, without forming any prediction): every squared error is a
        quadratic form in the targets."""
        n, g = self.outer.shape[0], len(self.grid)
        forms = self.inner_quadratic_forms().reshape(n * g, n * n)
        sse_inner = (gram.reshape(gram.shape[0], n * n) @ forms.T).reshape(-1, n, g)
        chosen = np.argmin(sse_inner, axis=-1)  # [S, N]
        resid = np.eye(n)[None] - self.outer[np.arange(n)[None, :], chosen]  # e_i − b_i: [S, i, n]
        sse = np.einsum("sin,snm,sim->s", resid, gram, resid)
        tss = np.trace(gram, axis1=1, axis2=2) - gram.sum(axis=(1, 2)) / n
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(tss > 0, 1.0 - sse / np.where(tss > 0, tss, 1.0), np.nan)

    def nested_predictions(self, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Nested predictions [S, N, k] and the chosen grid indices [S, N] for targets y [S, N, k]."""
        chosen = self.choose(y)
        n = y.shape[1]
        weights = self.outer[np.arange(n)[None, :], chosen]  # [S, N, N]
        return np.matmul(weights, y), chosen


def nested_r2(y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """R² per batch row of targets / predictions [S, N, k]: [S]."""
    tss = ((y - y.mean(axis=1, keepdims=True)) ** 2).sum(axis=(1, 2))
    sse = ((y - pred) ** 2).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tss > 0, 1.0 - sse / np.where(tss > 0, tss, 1.0), np.nan)


def derangements(n: int, count: int, seed: int) -> np.ndarray:
    """``count`` seeded permutations of range(n) with no fixed point: [count, n]."""
    if n < 2:
        raise LayerscopeError(f"a derangement needs at least 2 pairs, got {n}")
    rng = np.random.default_rng([int(seed) % 2**32, 0xB21D])
    out = np.empty((count, n), dtype=np.int64)
    filled = 0
    while filled < count:
        perm = rng.permutation(n)
        if not (perm == np.arange(n)).any():
            out[filled] = perm
            filled += 1
    return out


def derangement(n: int, seed: int) -> np.ndarray:
    """A seeded permutation with no fixed point."""
    return derangements(n, 1, seed)[0]


def orthogonality_errors(x: np.ndarray, y: np.ndarray, index: np.ndarray, alpha_rel: float, *,
                         intercept: bool = True) -> np.ndarray:
    """‖WᵀW − I‖_F / k of the bridge fitted on each resample of the pairs (``index`` [B, N]): [B]."""
    idx = np.asarray(index).astype(np.int64)
    xb, yb = x[idx], y[idx]  # [B, N, k]
    if intercept:
        xb = xb - xb.mean(axis=1, keepdims=True)
        yb = yb - yb.mean(axis=1, keepdims=True)
    k = x.shape[1]
    u, sv, vt = _svd(xb)
    cutoff = np.finfo(np.float64).eps * max(x.shape) * sv[:, :1]
    filt = ridge_filter(sv, float(alpha_rel) * (xb**2).sum(axis=(1, 2)) / k, cutoff)
    w = np.matmul(vt.transpose(0, 2, 1), filt[:, :, None] * np.matmul(u.transpose(0, 2, 1), yb))  # V diag(filt) Uᵀ Y_c
    gram = np.matmul(w.transpose(0, 2, 1), w) - np.eye(k)
    return np.sqrt((gram**2).sum(axis=(1, 2))) / k


@dataclass
class BridgeFit:
    alpha_rel: float  # chosen by the leave-one-out of all pairs (for the descriptive fit)
    alpha: float
    r2: float
    loo_r2: float  # nested
    loo_r2_ci: list
    loo_r2_best_of_grid: float
    loo_by_alpha: list[float]
    nested_alpha_rel: list[float]  # the α_rel each outer fold chose
    orthogonality_error: float
    orthogonality_error_ci: list
    singular_values: np.ndarray
    null: np.ndarray  # nested loo_r2 of each derangement
    null_summary: dict


def bridge_fit(x: np.ndarray, y: np.ndarray, grid: Sequence[float], *, intercept: bool = True, seed: int = 0,
               n_shuffles: int = N_SHUFFLES, boot: st.Bootstrap | None = None,
               chunk: int = 256) -> BridgeFit:
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n, k = x.shape
    boot = boot or st.Bootstrap(n, unit="pair", seed=seed)
    loo = NestedLoo.build(x, grid, intercept=intercept)
    plain = loo.plain_predictions(y)
    scores = [r2(y, p) for p in plain]
    finite = [v if np.isfinite(v) else -np.inf for v in scores]
    best = int(np.argmax(finite))
    alpha_rel = float(grid[best])
    pred, chosen = loo.nested_predictions(y[None])
    pred, chosen = pred[0], chosen[0]
    sse = ((y - pred) ** 2).sum(axis=1)
    sst = ((y - y.mean(axis=0)) ** 2).sum(axis=1)
    nested, nested_ci = boot.interval(sse, sst, statistic=lambda a, b: 1.0 - a.sum(1) / b.sum(1))
    perms = derangements(n, int(n_shuffles), seed)
    gram = y @ y.T
    null = np.concatenate([loo.nested_r2_from_gram(gram[part[:, :, None], part[:, None, :]])
                           for part in np.array_split(perms, max(1, -(-len(perms) // chunk)))])
    fit = fit_bridge(x, y, alpha_rel, intercept=intercept)
    ortho, ortho_ci = boot.interval(np.arange(n, dtype=float),
                                    statistic=partial(orthogonality_errors, x, y, alpha_rel=alpha_rel,
                                                      intercept=intercept))
    return BridgeFit(
        alpha_rel, fit.alpha, r2(y, predict(fit, x)), float(nested), nested_ci, float(scores[best]), scores,
        [float(grid[c]) for c in chosen], float(ortho), ortho_ci, np.linalg.svd(fit.w, compute_uv=False), null,
        st.null_summary(float(nested), null, greater=True),
    )


@dataclass
class BridgeResult:
    metrics: pd.DataFrame
    summary: dict
    fits: dict  # (layer, k) -> BridgeFit


def bridge(states: PairedStates, mask: ZMask, *, model: str, prompt_set: str, ridge: Sequence[float],
           intercept: bool = True, seed: int = 0, n_shuffles: int = N_SHUFFLES) -> BridgeResult:
    cache = states.cache
    mask.check_fits(cache.n_layers, cache.d_model, f"the activation cache {cache.directory}")
    if not ridge:
        raise LayerscopeError("bridge.ridge is empty: give at least one relative ridge strength")
    if n_shuffles < 1:
        raise LayerscopeError("bridge.n_shuffles must be at least 1")
    boot = st.Bootstrap(states.n_pairs, unit="pair", seed=seed)
    records, fits, combos = [], {}, []
    for layer in mask.layers:
        zh, en = states.pooled(layer)
        for k in mask.ks:
            v = mask.basis(layer, k).to(torch.float64)
            x, y = (en @ v.T).numpy(), (zh @ v.T).numpy()
            fit = bridge_fit(x, y, ridge, intercept=intercept, seed=seed, n_shuffles=n_shuffles, boot=boot)
            fits[(layer, k)] = fit
            for a, score in zip(ridge, fit.loo_by_alpha):
                records.append((layer, k, float(a), "loo_r2_plain", score, np.nan, np.nan))
            records += [
                (layer, k, np.nan, "loo_r2", fit.loo_r2, *fit.loo_r2_ci),
                (layer, k, np.nan, "loo_r2_best_of_grid", fit.loo_r2_best_of_grid, np.nan, np.nan),
                (layer, k, np.nan, "loo_r2_null_mean", fit.null_summary["null_mean"], np.nan, np.nan),
                (layer, k, np.nan, "loo_r2_p_value", fit.null_summary["p_value"], np.nan, np.nan),
                (layer, k, fit.alpha_rel, "r2", fit.r2, np.nan, np.nan),
                (layer, k, fit.alpha_rel, "orthogonality_error", fit.orthogonality_error, *fit.orthogonality_error_ci),
            ]
            for i, sv in enumerate(fit.singular_values):
                records.append((layer, k, fit.alpha_rel, f"singular_value_{i}", float(sv), np.nan, np.nan))
            sv = fit.singular_values
            agreement = float(np.mean([a == fit.alpha_rel for a in fit.nested_alpha_rel]))
            combos.append({
                "layer": layer, "k": k, "n_pairs": int(x.shape[0]), "underdetermined": bool(x.shape[0] - intercept <= k),
                "alpha_rel": fit.alpha_rel, "alpha": fit.alpha, "r2": fit.r2,
                "loo_r2": fit.loo_r2, "loo_r2_ci": fit.loo_r2_ci, "loo_r2_best_of_grid": fit.loo_r2_best_of_grid,
                "loo_r2_null_mean": fit.null_summary["null_mean"], "loo_r2_null_q95": fit.null_summary["null_q"],
                "loo_r2_percentile": fit.null_summary["percentile"], "loo_r2_p_value": fit.null_summary["p_value"],
                "nested_alpha_rel": fit.nested_alpha_rel, "nested_alpha_agreement": agreement,
                "orthogonality_error": fit.orthogonality_error, "orthogonality_error_ci": fit.orthogonality_error_ci,
                "singular_value_max": float(sv.max()), "singular_value_min": float(sv.min()),
                "singular_value_spread": float(sv.min() / sv.max()) if sv.max() > 0 else float("nan"),
                "loo_r2_by_alpha": dict(zip(map(str, ridge), fit.loo_by_alpha)),
            })
    frame = pd.DataFrame(records, columns=["layer", "k", "alpha_rel", "metric", "value", "ci_lo", "ci_hi"])
    frame.insert(0, "prompt_set", prompt_set)
    frame.insert(0, "model", model)
    pick = lambda key: [c[key] for c in combos]  # noqa: E731
    summary = {
        "model": model,
        "prompt_set": prompt_set,
        "n_pairs": states.n_pairs,
        **states.sample,
        "pooling": POOLING,
        "intercept": intercept,
        "ridge_grid": list(ridge),
        "n_shuffles": int(n_shuffles),
        "combos": [f"L{c['layer']}/k{c['k']}" for c in combos],
        "loo_r2": pick("loo_r2"),
        "loo_r2_ci": pick("loo_r2_ci"),
        "loo_r2_null_mean": pick("loo_r2_null_mean"),
        "loo_r2_null_q95": pick("loo_r2_null_q95"),
        "loo_r2_percentile": pick("loo_r2_percentile"),
        "loo_r2_p_value": pick("loo_r2_p_value"),
        "loo_r2_best_of_grid": pick("loo_r2_best_of_grid"),
        "r2": pick("r2"),
        "alpha_rel": pick("alpha_rel"),
        "nested_alpha_agreement": pick("nested_alpha_agreement"),
        "orthogonality_error": pick("orthogonality_error"),
        "orthogonality_error_ci": pick("orthogonality_error_ci"),
        "singular_value_spread": pick("singular_value_spread"),
        **boot.summary(),
        "by_combo": combos,
    }
    return BridgeResult(frame, summary, fits)


def plot_bridge(result: BridgeResult, path: str | Path) -> None:
    from layerscope.report.plotting import PALETTE, figure, save

    s = result.summary
    grid = s["ridge_grid"]
    fits = list(result.fits.items())
    with figure(1, 3, width=14.0, height=3.8) as (fig, axes):
        pos = np.arange(len(fits))
        for i, ((layer, k), fit) in enumerate(fits):
            color = PALETTE[i % 10]
            lo, hi = np.quantile(fit.null, [0.025, 0.975])
            axes[0].fill_between([i - 0.3, i + 0.3], [lo, lo], [hi, hi], color="0.6", alpha=0.4, linewidth=0,
                                 label="shuffled pairs (95 %)" if i == 0 else None)
            axes[0].plot([i - 0.3, i + 0.3], [fit.null.mean()] * 2, color="0.3", linewidth=1)
            axes[0].errorbar([i], [fit.loo_r2], yerr=[[fit.loo_r2 - fit.loo_r2_ci[0]], [fit.loo_r2_ci[1] - fit.loo_r2]],
                             fmt="o", color=color, capsize=3, label="nested LOO R² (95 % over pairs)" if i == 0 else None)
            axes[1].plot(np.arange(len(grid)), fit.loo_by_alpha, marker="o", markersize=3, color=color,
                         label=f"L{layer}/k{k}")
            sv = fit.singular_values
            axes[2].plot(np.arange(1, len(sv) + 1), sv, marker="o", markersize=2, color=color, label=f"L{layer}/k{k}")
        axes[0].axhline(0.0, color="0.4", linewidth=0.8)
        axes[0].set_xticks(pos, [f"L{layer}/k{k}" for (layer, k), _ in fits])
        axes[0].set_ylabel("R² of held-out pairs")
        axes[0].set_title(f"nested LOO R² vs {s['n_shuffles']} deranged pairings")
        axes[0].legend(loc="best", fontsize=7)
        axes[1].set_xticks(np.arange(len(grid)), [f"{a:g}" for a in grid])
        axes[1].set_xlabel("relative ridge strength α_rel")
        axes[1].set_ylabel("leave-one-out R² (not nested)")
        axes[1].set_title("LOO R² by α (the grid the strength is chosen on)")
        lows = [min(f.loo_by_alpha) for _, f in fits]
        axes[1].set_ylim(max(-1.0, min(lows) - 0.05), 1.02)
        axes[1].legend(loc="best", fontsize=7)
        axes[2].axhline(1.0, color="0.4", linestyle="--", linewidth=0.8)
        axes[2].set_xlabel("index")
        axes[2].set_ylabel("singular value of W (1 = rotation)")
        axes[2].set_title("singular values of the bridge at the chosen α")
        fig.suptitle(f"bridge en → zh in Z — {s['model']} on {s['prompt_set']} ({s['n_pairs']} pairs)")
        save(fig, path)


def run(job: Job) -> Result:
    """Ridge regression from English to Chinese coordinates in Z, with nested leave-one-out R² (CPU)."""
    params = job.params
    states = PairedStates.open(Path(job.input("resid")).parent, job.input("prompts"))
    result = bridge(states, ZMask.load(job.input("mask")), model=job.model, prompt_set=job.prompt_set,
                    ridge=params["ridge"], intercept=params["intercept"], seed=params["seed"],
                    n_shuffles=params["n_shuffles"])
    return Result(
        summary=result.summary,
        tables={"metrics": result.metrics},
        figures={"bridge": partial(plot_bridge, result)},
    )


EXPERIMENT = Experiment(
    name="bridge",
    headlines=("loo_r2",),
    family="z_subspace",
    description="linear map from en to zh coordinates in Z",
    description_long="z_subspace: ridge-regularised linear map W from English to Chinese Z coordinates of mean-pooled"
                     " problem states; nested leave-one-out R^2 against deranged pairings, in-sample R^2, "
                     "orthogonality error |W^T W - I|/k, singular values.",
    needs="decoder",
    data="paired",
    gpu=False,
    inputs=("mask", "resid", "tokens", "prompts"),
    run=run,
    tables=("metrics",),
    figures=(Figure("bridge", "nested LOO R², LOO R² by α and singular values"),),
    params={
        "ridge": {
            "description": "Relative ridge strengths (alpha = alpha_rel * tr(X^T X)/k; 0 = minimum-norm least "
                           "squares); the held-out R^2 chooses among them by an inner leave-one-out.",
            "type": "array",
            "minItems": 1,
            "uniqueItems": True,
            "items": {
                "type": "number",
                "minimum": 0,
            },
            "default": [0, 0.001, 0.01, 0.1, 1, 10],
        },
        "intercept": {
            "description": "Fit with an intercept (centred coordinates); false fits Y = X W as in the seed.",
            "type": "boolean",
            "default": True,
        },
        "n_shuffles": {
            "description": "Seeded derangements of the pairs that make the null distribution of the nested "
                           "leave-one-out R^2.",
            "type": "integer",
            "minimum": 1,
            "default": N_SHUFFLES,
        },
    },
    threads=1,
    runtime=30,
    section="z_subspace",
)
