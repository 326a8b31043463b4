"""Bridge: is the map from English to Chinese coordinates in Z a linear map, a rotation?

For each Z-mask (layer ℓ, k), the coordinates of the mean-pooled problem-text states in Z
are X = en · V_Zᵀ and Y = zh · V_Zᵀ (N pairs × k). The bridge is the ridge regression

    W = argmin ‖Y_c − X_c W‖²_F + α ‖W‖²_F,      b = ȳ − x̄ W   (intercept: centred fit)

(``intercept: false`` fits Y = X W without centring, the seed's formula). α = α_rel · tr(X_cᵀX_c)/k,
so a relative strength α_rel means the same at every layer and k; α_rel = 0 is the
minimum-norm least-squares solution. α_rel is chosen from the grid by leave-one-out:

* ``loo_r2`` = 1 − Σ_i ‖y_i − ŷ_(−i)‖² / Σ_i ‖y_i − ȳ‖² — each pair predicted by the bridge
  fitted on the other N − 1 (in-sample R² alone is meaningless when N ≤ k, where any
  targets are fitted exactly);
* ``r2`` = 1 − Σ_i ‖y_i − ŷ_i‖² / Σ_i ‖y_i − ȳ‖² in sample, with the chosen α;
* ``orthogonality_error`` = ‖WᵀW − I‖_F / k (0 for a rotation) and the singular values of W;
* ``loo_r2_shuffled``: the same LOO procedure (α chosen the same way) after pairing each
  English problem with another problem's Chinese version (a seeded derangement) — how much
  of ``loo_r2`` is generic rather than pair-specific.
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
from layerscope.experiments.registry import Experiment, Figure, Job, Result
from layerscope.data.paired_states import POOLING, PairedStates
from layerscope.experiments.z_subspace.z_mask import ZMask

log = logging.getLogger(__name__)


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


def derangement(n: int, seed: int) -> np.ndarray:
    """A seeded permutation with no fixed point."""
    rng = np.random.default_rng(seed)
    while True:
        perm = rng.permutation(n)
        if not (perm == np.arange(n)).any():
            return perm


@dataclass
class BridgeFit:
    alpha_rel: float
    alpha: float
    r2: float
    loo_r2: float
    loo_by_alpha: list[float]
    orthogonality_error: float
    singular_values: np.ndarray
    loo_r2_shuffled: float


def bridge_fit(x: np.ndarray, y: np.ndarray, grid: Sequence[float], *, intercept: bool = True, seed: int = 0) -> BridgeFit:
    alpha_rel, scores = select_alpha(x, y, grid, intercept=intercept)
    fit = fit_bridge(x, y, alpha_rel, intercept=intercept)
    k = x.shape[1]
    ortho = float(np.linalg.norm(fit.w.T @ fit.w - np.eye(k)) / k)
    perm = derangement(x.shape[0], seed)
    _, shuffled = select_alpha(x, y[perm], grid, intercept=intercept)
    return BridgeFit(
        alpha_rel, fit.alpha, r2(y, predict(fit, x)), scores[list(grid).index(alpha_rel)], scores, ortho,
        np.linalg.svd(fit.w, compute_uv=False), float(np.nanmax(shuffled)),
    )


@dataclass
class BridgeResult:
    metrics: pd.DataFrame
    summary: dict
    fits: dict  # (layer, k) -> BridgeFit


def bridge(states: PairedStates, mask: ZMask, *, model: str, prompt_set: str, ridge: Sequence[float],
           intercept: bool = True, seed: int = 0) -> BridgeResult:
    cache = states.cache
    mask.check_fits(cache.n_layers, cache.d_model, f"the activation cache {cache.directory}")
    if not ridge:
        raise LayerscopeError("bridge.ridge is empty: give at least one relative ridge strength")
    records, fits, combos = [], {}, []
    for layer in mask.layers:
        zh, en = states.pooled(layer)
        for k in mask.ks:
            v = mask.basis(layer, k).to(torch.float64)
            x, y = (en @ v.T).numpy(), (zh @ v.T).numpy()
            fit = bridge_fit(x, y, ridge, intercept=intercept, seed=seed)
            fits[(layer, k)] = fit
            for a, score in zip(ridge, fit.loo_by_alpha):
                records.append((layer, k, float(a), "loo_r2", score))
            for metric in ("r2", "loo_r2", "orthogonality_error", "loo_r2_shuffled"):
                records.append((layer, k, fit.alpha_rel, metric, getattr(fit, metric)))
            for i, sv in enumerate(fit.singular_values):
                records.append((layer, k, fit.alpha_rel, f"singular_value_{i}", float(sv)))
            sv = fit.singular_values
            combos.append({
                "layer": layer, "k": k, "n_pairs": int(x.shape[0]), "underdetermined": bool(x.shape[0] - intercept <= k),
                "alpha_rel": fit.alpha_rel, "alpha": fit.alpha, "r2": fit.r2, "loo_r2": fit.loo_r2,
                "loo_r2_shuffled": fit.loo_r2_shuffled, "orthogonality_error": fit.orthogonality_error,
                "singular_value_max": float(sv.max()), "singular_value_min": float(sv.min()),
                "singular_value_spread": float(sv.min() / sv.max()) if sv.max() > 0 else float("nan"),
                "loo_r2_by_alpha": dict(zip(map(str, ridge), fit.loo_by_alpha)),
            })
    frame = pd.DataFrame(records, columns=["layer", "k", "alpha_rel", "metric", "value"])
    frame.insert(0, "prompt_set", prompt_set)
    frame.insert(0, "model", model)
    pick = lambda key: [c[key] for c in combos]  # noqa: E731
    summary = {
        "model": model,
        "prompt_set": prompt_set,
        "n_pairs": states.n_pairs,
        "pooling": POOLING,
        "intercept": intercept,
        "ridge_grid": list(ridge),
        "combos": [f"L{c['layer']}/k{c['k']}" for c in combos],
        "loo_r2": pick("loo_r2"),
        "loo_r2_shuffled": pick("loo_r2_shuffled"),
        "r2": pick("r2"),
        "alpha_rel": pick("alpha_rel"),
        "orthogonality_error": pick("orthogonality_error"),
        "singular_value_spread": pick("singular_value_spread"),
        "by_combo": combos,
    }
    return BridgeResult(frame, summary, fits)


def plot_bridge(result: BridgeResult, path: str | Path) -> None:
    from layerscope.report.plotting import PALETTE, figure, save

    s = result.summary
    grid = s["ridge_grid"]
    with figure(1, 2, width=10.0, height=3.8) as (fig, axes):
        xs = np.arange(len(grid))
        for i, ((layer, k), fit) in enumerate(result.fits.items()):
            color = PALETTE[i % 10]
            axes[0].plot(xs, fit.loo_by_alpha, marker="o", markersize=3, color=color, label=f"L{layer}/k{k}")
            axes[0].axhline(fit.loo_r2_shuffled, color=color, linestyle=":", linewidth=0.8)
            sv = fit.singular_values
            axes[1].plot(np.arange(1, len(sv) + 1), sv, marker="o", markersize=2, color=color, label=f"L{layer}/k{k}")
        axes[0].set_xticks(xs, [f"{a:g}" for a in grid])
        axes[0].set_xlabel("relative ridge strength α_rel")
        axes[0].set_ylabel("leave-one-out R²")
        axes[0].set_title("LOO R² (dotted: shuffled pairs, best α)")
        lows = [min(f.loo_by_alpha + [f.loo_r2_shuffled]) for f in result.fits.values()]
        axes[0].set_ylim(max(-1.0, min(lows) - 0.05), 1.02)
        axes[0].legend(loc="best")
        axes[1].axhline(1.0, color="0.4", linestyle="--", linewidth=0.8)
        axes[1].set_xlabel("index")
        axes[1].set_ylabel("singular value of W (1 = rotation)")
        axes[1].set_title("singular values of the bridge at the chosen α")
        fig.suptitle(f"bridge en → zh in Z — {s['model']} on {s['prompt_set']} ({s['n_pairs']} pairs)")
        save(fig, path)


def run(job: Job) -> Result:
    """Ridge regression from English to Chinese coordinates in Z, with leave-one-out R² (CPU)."""
    params = job.params
    states = PairedStates.open(Path(job.input("resid")).parent, job.input("prompts"))
    result = bridge(states, ZMask.load(job.input("mask")), model=job.model, prompt_set=job.prompt_set,
                    ridge=params["ridge"], intercept=params["intercept"], seed=params["seed"])
    return Result(
        summary=result.summary,
        tables={"metrics": result.metrics},
        figures={"bridge": partial(plot_bridge, result)},
    )


EXPERIMENT = Experiment(
    name="bridge",
    family="z_subspace",
    description="linear map from en to zh coordinates in Z",
    description_long="z_subspace: ridge-regularised linear map W from English to Chinese Z coordinates of mean-pooled"
                     " problem states; in-sample and leave-one-out R^2, orthogonality error |W^T W - I|/k, singular "
                     "values.",
    needs="decoder",
    data="paired",
    gpu=False,
    inputs=("mask", "resid", "tokens", "prompts"),
    run=run,
    tables=("metrics",),
    figures=(Figure("bridge", "LOO R² and singular values"),),
    params={
        "ridge": {
            "description": "Relative ridge strengths (alpha = alpha_rel * tr(X^T X)/k; 0 = minimum-norm least "
                           "squares), chosen by leave-one-out R^2.",
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
    },
    threads=1,
    runtime=30,
    section="z_subspace",
)
