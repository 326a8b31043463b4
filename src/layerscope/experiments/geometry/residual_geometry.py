"""Residual-stream geometry across depth, read from the activation cache.

For every residual boundary ``resid.l`` (l = 0 … L) and the selected tokens of a prompt
set (``roles``; optionally without the first token of each sequence):

* norms of the token vectors: mean, std, median, min, max, 99th percentile;
* the eigenvalues λ of the token covariance: participation ratio (Σλ)²/Σλ², entropy
  effective rank, dims for 90 % of the variance;
* isotropy: mean pairwise cosine of the raw vectors and after removing the mean direction
  (centred), and 1 − λ_max/Σλ;
* category clustering: each prompt's selected tokens with role ``prompt`` or ``completion``
  are mean-pooled (positions before the prompt — system message, template — are the same for
  every prompt of a decoder and carry no category information), and the ratio of the mean
  Euclidean distance between prompts of different categories to that within a category
  (1: no clustering);
* massive activations: an entry h[t, j] is *massive* when |h[t, j]| ≥ ``massive_ratio`` ×
  the median |h| of that layer; per layer the dimensions that carry any, how many tokens
  carry them, and the tokens with the largest values.

The cache is read one layer at a time (:class:`~layerscope.data.activations.ActivationCache`) and
float64 work runs on blocks of rows, so peak memory is about two copies of one layer's
activations (the layer and its absolute values, for the median) plus per-token norms,
whatever the number of layers.
By default (``roles: [prompt, completion]``, ``drop_first_token: true``) the statistics leave
out the system message and chat-template tokens — the same tokens with the same residuals in
every prompt of a decoder, which would otherwise be pooled as ~50 identical copies — and
position 0, the attention sink. Massive activations are searched over every token of the
cache (``massive_tokens: all``), since that is where they sit.

Uncertainty: a bootstrap over prompts. The mean token norms (first, last, growth) come from
per-prompt sums; the category separation from the distances between mean-pooled prompts,
recomputed on each resample over the pairs of distinct prompts (two copies of one prompt
never pair). The separation is also compared with a null of ``n_perm`` seeded permutations
of the category labels among prompts (at the last layer, and for its maximum over layers
with the same permutations applied to every layer). PR, isotropy and cosines pool the tokens
of all prompts and carry no interval.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from layerscope import LayerscopeError
from layerscope.data.activations import ActivationCache
from layerscope.model.generate import ROLES
from scipy.spatial.distance import pdist, squareform

from layerscope.engines.geometry import (
    between_within_ratio, eigen_isotropy, mean_pairwise_cosine, permuted_between_within, resample_counts,
    resampled_pair_means,
)
from layerscope.engines.sampling import sample_summary
from layerscope.engines.statistics import Bootstrap, empirical_p, null_summary, permutation_null, weighted_mean
from layerscope.experiments.registry import Experiment, Figure, Job, Result
from layerscope.progress import track
from layerscope.engines.spectra import (
    column_mean, dims_for_variance, eigh_descending, entropy_effective_rank, gram_matrix, participation_ratio, row_chunks,
)

log = logging.getLogger(__name__)

CLUSTER_ROLES = ("prompt", "completion")
# system and template tokens are the same tokens, with the same residuals, in every prompt of a chat template
DEFAULT_ROLES = ("prompt", "completion")
MASSIVE_TOKENS = ("all", "selected")
LAYER_METRICS = (
    "norm_mean", "norm_std", "norm_median", "norm_min", "norm_max", "norm_p99",
    "participation_ratio", "effective_rank", "dims_90", "top_eigen_fraction",
    "mean_cosine", "mean_cosine_centered", "isotropy",
    "category_separation", "category_between", "category_within",
    "massive_max_ratio", "n_massive_dims", "n_massive_activations",
)


def select_rows(tokens: pd.DataFrame, roles=ROLES, drop_first_token: bool = False) -> np.ndarray:
    """Cache rows of the tokens whose role is in ``roles`` (without position 0 when asked), sorted."""
    unknown = sorted(set(roles) - set(ROLES))
    if unknown:
        raise LayerscopeError(f"unknown token role(s) {unknown}; roles are {list(ROLES)}")
    keep = tokens["role"].isin(list(roles))
    if drop_first_token:
        keep &= tokens["position"] != 0
    return np.sort(tokens.loc[keep, "row"].to_numpy())


def read_rows(cache: ActivationCache, layer: int, rows: np.ndarray) -> torch.Tensor:
    """resid.{layer} at ``rows`` (sorted): a lazy slice when the rows are contiguous."""
    if len(rows) and rows[-1] - rows[0] + 1 == len(rows):
        return cache.resid(layer, slice(int(rows[0]), int(rows[-1]) + 1))
    return cache.resid(layer, rows)


@dataclass
class ResidualGeometryResult:
    metrics: pd.DataFrame  # tidy: model, prompt_set, layer, metric, value
    massive: pd.DataFrame  # one row per (layer, massive dim, carrier token)
    summary: dict
    curves: dict  # metric -> array over layers 0 … L
    norms: np.ndarray  # [L+1, n_tokens] per-token norms of the selected rows
    rows: np.ndarray  # the selected cache rows
    dim_max_ratio: np.ndarray  # [L+1, d]: max over tokens of |h| / median |h|, per dimension
    separation_ci: list  # [L+1] bootstrap interval of the category separation per layer (pairs or None)
    separation_null: np.ndarray  # [n_perm, L+1] category separation with permuted category labels


def _units(tokens: pd.DataFrame, rows: np.ndarray):
    """Prompt code of every selected row (0 … n − 1 in order of appearance), the prompt ids, their categories,
    and which selected rows are mean-pooled for the category clustering."""
    info = tokens.set_index("row").loc[rows]
    ids = info["prompt_id"].astype(str).to_numpy()
    order = list(dict.fromkeys(ids))
    code_of = {p: i for i, p in enumerate(order)}
    codes = np.array([code_of[p] for p in ids], dtype=np.int64)
    category_of = dict(zip(ids, info["category"].astype(str)))
    pooled = info["role"].isin(CLUSTER_ROLES).to_numpy()
    return codes, order, np.array([category_of[p] for p in order]), pooled


def _massive(abs_h: torch.Tensor, median: float, ratio: float, top_tokens: int):
    """Per dimension: number of massive entries, and the top carriers (local row, value) of flagged dims."""
    threshold = ratio * median
    counts = (abs_h >= threshold).sum(dim=0)
    flagged = torch.nonzero(counts > 0).flatten().tolist()
    carriers = {}
    for dim in flagged:
        k = min(top_tokens, int(counts[dim]))
        values, local = torch.topk(abs_h[:, dim], k)
        carriers[dim] = (local.tolist(), values.tolist())
    return counts.numpy(), carriers


def separation_from_distances(distances: np.ndarray, labels: np.ndarray, counts: np.ndarray,
                              usable: np.ndarray | None = None) -> np.ndarray:
    """Between / within mean distance of prompts [..., B] from prompt distances [..., n, n], labels [n] and
    resample counts [B, n]; pairs of copies of one prompt are left out (:func:`resampled_pair_means`)."""
    labels = np.asarray(labels)
    usable = np.ones(len(labels), dtype=bool) if usable is None else usable
    ok = usable[:, None] & usable[None, :]
    same = (labels[:, None] == labels[None, :]) & ok
    different = (labels[:, None] != labels[None, :]) & ok
    out = []
    for dist in np.asarray(distances).reshape(-1, len(labels), len(labels)):
        means = resampled_pair_means(np.nan_to_num(dist), {"within": same, "between": different}, counts)
        with np.errstate(invalid="ignore", divide="ignore"):
            out.append(np.where(means["within"] > 0, means["between"] / means["within"], np.nan))
    return np.stack(out, axis=-1).reshape(counts.shape[0], *np.asarray(distances).shape[:-2])


def residual_geometry(
    cache: ActivationCache,
    *,
    model: str,
    prompt_set: str,
    roles=DEFAULT_ROLES,
    drop_first_token: bool = True,
    massive_ratio: float = 100.0,
    massive_top_tokens: int = 5,
    massive_tokens: str = "all",
    n_perm: int = 1000,
    seed: int = 0,
    n_boot: int | None = None,
) -> ResidualGeometryResult:
    tokens = cache.tokens
    rows = select_rows(tokens, roles, drop_first_token)
    if len(rows) < 2:
        raise LayerscopeError(f"{cache.directory}: fewer than 2 tokens with roles {list(roles)}; nothing to measure")
    if massive_ratio <= 1:
        raise LayerscopeError(f"massive_ratio must be > 1 (a multiple of the median |activation|), got {massive_ratio}")
    if massive_tokens not in MASSIVE_TOKENS:
        raise LayerscopeError(f"massive_tokens must be one of {list(MASSIVE_TOKENS)}, got {massive_tokens!r}")
    if n_perm < 1:
        raise LayerscopeError(f"n_perm must be at least 1, got {n_perm}")
    # massive activations are searched over every token by default: they sit on the attention sink and the
    # template tokens that the geometry statistics leave out
    massive_rows = np.sort(tokens["row"].to_numpy()) if massive_tokens == "all" else rows
    info = tokens.set_index("row").loc[massive_rows]
    codes, prompt_ids, prompt_categories, pooled_mask = _units(tokens, rows)
    n_units = len(prompt_ids)
    pooled_units = np.zeros(n_units, dtype=bool)
    pooled_units[np.unique(codes[pooled_mask])] = True
    n_prompts = int(pooled_units.sum())
    n_sites, d = cache.n_layers + 1, cache.d_model
    curves = {m: np.full(n_sites, np.nan) for m in LAYER_METRICS}
    norms = np.zeros((n_sites, len(rows)), dtype=np.float32)
    dim_max_ratio = np.zeros((n_sites, d))
    massive_records = []
    codes_t = torch.from_numpy(codes)
    pool_idx = torch.from_numpy(np.nonzero(pooled_mask)[0])
    pool_codes = codes_t[pool_idx]
    counts_per_prompt = torch.bincount(pool_codes, minlength=n_units).to(torch.float64).clamp_min(1)[:, None]
    tokens_per_prompt = np.bincount(codes, minlength=n_units).astype(np.float64)
    norm_sums = np.zeros((n_sites, n_units))
    distances = np.full((n_sites, n_units, n_units), np.nan)
    same_rows = massive_rows is rows
    local_in_all = None if same_rows else np.searchsorted(massive_rows, rows)

    for layer in track(range(n_sites), "residual geometry", unit="layers"):
        everything = read_rows(cache, layer, massive_rows)
        h = everything if same_rows else everything[torch.from_numpy(local_in_all)]  # [n, d] float32
        norm = torch.cat([h[c].to(torch.float64).norm(dim=1) for c in row_chunks(len(rows))])
        norms[layer] = norm.float().numpy()
        n_np = norm.numpy()
        norm_sums[layer] = np.bincount(codes, weights=n_np, minlength=n_units)
        curves["norm_mean"][layer] = n_np.mean()
        curves["norm_std"][layer] = n_np.std()
        curves["norm_median"][layer] = np.median(n_np)
        curves["norm_min"][layer] = n_np.min()
        curves["norm_max"][layer] = n_np.max()
        curves["norm_p99"][layer] = np.percentile(n_np, 99)

        mean = column_mean(h)
        lam = eigh_descending(gram_matrix(h, center=True), n_vectors=0)[0] / (len(rows) - 1)
        curves["participation_ratio"][layer] = participation_ratio(energies=lam)
        curves["effective_rank"][layer] = entropy_effective_rank(energies=lam)
        curves["dims_90"][layer] = dims_for_variance(lam, (0.9,))[0.9] if lam.sum() > 0 else np.nan
        curves["top_eigen_fraction"][layer] = lam[0] / lam.sum() if lam.sum() > 0 else np.nan
        curves["isotropy"][layer] = eigen_isotropy(lam)
        curves["mean_cosine"][layer] = mean_pairwise_cosine(h)
        curves["mean_cosine_centered"][layer] = mean_pairwise_cosine(h, center=mean)

        if n_prompts >= 2:
            pooled = torch.zeros((n_units, d), dtype=torch.float64)
            for c in row_chunks(len(pool_idx)):
                pooled.index_add_(0, pool_codes[c], h[pool_idx[c]].to(torch.float64))
            pooled /= counts_per_prompt
            keep = np.nonzero(pooled_units)[0]
            distances[layer][np.ix_(keep, keep)] = squareform(pdist(pooled.numpy()[keep]))
            sep = between_within_ratio(pooled.numpy()[keep], prompt_categories[keep])
            curves["category_separation"][layer] = sep["ratio"]
            curves["category_between"][layer] = sep["between"]
            curves["category_within"][layer] = sep["within"]

        abs_h = everything.abs()
        median = float(np.median(abs_h.numpy()))
        median = median if median > 0 else float(abs_h[abs_h > 0].min()) if (abs_h > 0).any() else 1.0
        dim_max = abs_h.max(dim=0).values.double().numpy()
        dim_max_ratio[layer] = dim_max / median
        counts, carriers = _massive(abs_h, median, massive_ratio, massive_top_tokens)
        curves["massive_max_ratio"][layer] = dim_max_ratio[layer].max()
        curves["n_massive_dims"][layer] = len(carriers)
        curves["n_massive_activations"][layer] = counts.sum()
        for dim, (local, values) in carriers.items():
            for rank, (i, value) in enumerate(zip(local, values)):
                row = int(massive_rows[i])
                tok = info.loc[row]
                signed = float(everything[i, dim])
                massive_records.append((layer, dim, int(counts[dim]), rank, row, tok["prompt_id"], int(tok["position"]),
                                        int(tok["token_id"]), tok["token"], tok["role"], signed, value / median))
        del h, abs_h, everything

    # ---- uncertainty: bootstrap over prompts, label-permutation null of the category separation
    boot = Bootstrap(n_units, unit="prompt", seed=seed, **({"n_boot": n_boot} if n_boot else {}))
    units = np.arange(n_units)
    intervals: dict = {}
    _, intervals["norm_first_ci"] = boot.interval(norm_sums[0], tokens_per_prompt, statistic=weighted_mean)
    _, intervals["norm_last_ci"] = boot.interval(norm_sums[-1], tokens_per_prompt, statistic=weighted_mean)
    _, intervals["norm_growth_ci"] = boot.interval(
        norm_sums[0], norm_sums[-1], statistic=lambda first, last: last.sum(1) / first.sum(1))
    separation_ci: list = [None] * n_sites
    separation_null = np.zeros((0, n_sites))
    sep_keys: dict = {"final_category_separation_ci": None, "final_category_separation_null_mean": None,
                      "final_category_separation_null_q95": None, "final_category_separation_p_value": None,
                      "category_separation_max_layer_stability": None, "category_separation_max_p_value": None,
                      "n_perm": 0}
    if np.isfinite(curves["category_separation"]).any():
        keep = np.nonzero(pooled_units)[0]
        sub = distances[:, keep][:, :, keep]

        def resampled(index):  # [B, n_sites] separation of every resample
            full = resample_counts(np.asarray(index, dtype=np.int64), n_units)[:, keep]
            return separation_from_distances(sub, prompt_categories[keep], full)

        memo = MemoStatistic(resampled)
        _, pairs = boot.interval(units, statistic=memo)
        separation_ci = [pair if np.isfinite(curves["category_separation"][layer]) else None
                         for layer, pair in enumerate(pairs)]
        separation_null = permuted_between_within(sub, permutation_labels(prompt_categories[keep], n_perm, seed))
        final = curves["category_separation"][-1]
        if np.isfinite(final):
            ns = null_summary(float(final), separation_null[:, -1])
            sep_keys.update(final_category_separation_ci=separation_ci[-1],
                            final_category_separation_null_mean=ns["null_mean"],
                            final_category_separation_null_q95=ns["null_q"],
                            final_category_separation_p_value=ns["p_value"])
        _, stability = boot.stability(units, statistic=memo, pick=_nanargmax)
        boot.check_stability("category_separation_max_layer", stability)
        max_null = np.nanmax(np.where(np.isfinite(separation_null), separation_null, -np.inf), axis=1)
        sep_keys.update(category_separation_max_layer_stability=stability,
                        category_separation_max_p_value=empirical_p(float(np.nanmax(curves["category_separation"])),
                                                                    max_null),
                        n_perm=int(n_perm))
        if sep_keys["final_category_separation_p_value"] is not None \
                and sep_keys["final_category_separation_p_value"] > 0.05:
            boot.flag("final_category_separation is not above its label-permutation null (p > 0.05)")

    records = [(layer, metric, float(values[layer])) for metric, values in curves.items() for layer in range(n_sites)]
    records += [(layer, f"category_separation_ci_{side}", float(pair[i]) if pair else float("nan"))
                for layer, pair in enumerate(separation_ci) for i, side in enumerate(("low", "high"))]
    if len(separation_null):
        q95 = [float(np.quantile(col[np.isfinite(col)], 0.95)) if np.isfinite(col).any() else float("nan")
               for col in separation_null.T]
        records += [(layer, "category_separation_null_q95", q95[layer]) for layer in range(n_sites)]
    metrics = pd.DataFrame(records, columns=["layer", "metric", "value"])
    metrics.insert(0, "prompt_set", prompt_set)
    metrics.insert(0, "model", model)
    massive = pd.DataFrame(massive_records, columns=[
        "layer", "dim", "n_massive_tokens", "rank", "row", "prompt_id", "position", "token_id", "token", "role",
        "value", "ratio_to_median",
    ])
    massive.insert(0, "prompt_set", prompt_set)
    massive.insert(0, "model", model)
    summary = _summary(curves, massive, model=model, prompt_set=prompt_set, n_layers=cache.n_layers, d=d,
                       n_tokens=len(rows), n_prompts=n_prompts, n_categories=len(set(prompt_categories[pooled_units])),
                       roles=list(roles), drop_first_token=drop_first_token, massive_ratio=massive_ratio)
    summary.update(massive_tokens=massive_tokens, n_massive_tokens_searched=int(len(massive_rows)))
    summary.update(sample_summary(prompt_ids, prompt_categories, prompt_ids))
    for key in ("norm_first", "norm_last", "norm_growth"):
        summary[f"{key}_ci"] = intervals[f"{key}_ci"] if summary[key] is not None else None
    summary.update(sep_keys)
    summary.update(boot.summary())
    return ResidualGeometryResult(metrics, massive, summary, curves, norms, rows, dim_max_ratio, separation_ci,
                                  separation_null)


def permutation_labels(labels: np.ndarray, n_perm: int, seed: int) -> list[np.ndarray]:
    """The label permutations of :func:`~layerscope.engines.statistics.permutation_null` (same seeded stream)."""
    out: list[np.ndarray] = []
    permutation_null(lambda perm: out.append(np.asarray(perm)) or 0.0, labels, n_perm=n_perm, seed=seed)
    return out


def _nanargmax(values: np.ndarray):
    values = np.asarray(values, dtype=float)
    return int(np.nanargmax(values)) if np.isfinite(values).any() else None


class MemoStatistic:
    """A bootstrap statistic of the resample index, computed once per index array (several intervals and a
    stability read one costly computation)."""

    def __init__(self, fn):
        self.fn, self.cache = fn, {}

    def __call__(self, index):
        index = np.ascontiguousarray(np.asarray(index, dtype=np.int64))
        key = (index.shape, hash(index.tobytes()))
        if key not in self.cache:
            self.cache[key] = self.fn(index)
        return self.cache[key]


def _argbest(values: np.ndarray, fn) -> tuple[float | None, int | None]:
    finite = np.isfinite(values)
    if not finite.any():
        return None, None
    index = int(fn(np.where(finite, values, np.inf if fn is np.argmin else -np.inf)))
    return float(values[index]), index


def _summary(curves, massive, *, model, prompt_set, n_layers, d, n_tokens, n_prompts, n_categories, roles,
             drop_first_token, massive_ratio) -> dict:
    pr = curves["participation_ratio"]
    pr_min, pr_min_layer = _argbest(pr, np.argmin)
    pr_max, pr_max_layer = _argbest(pr, np.argmax)
    sep_max, sep_max_layer = _argbest(curves["category_separation"], np.argmax)
    iso_min, iso_min_layer = _argbest(curves["isotropy"], np.argmin)
    norm = curves["norm_mean"]
    by_dim = {}
    for dim, group in massive.groupby("dim", sort=True):
        top = group.sort_values("ratio_to_median", ascending=False)
        by_dim[int(dim)] = {
            "layers": sorted(int(x) for x in group["layer"].unique()),
            "max_ratio_to_median": float(top["ratio_to_median"].iloc[0]),
            "max_abs_value": float(top["value"].abs().iloc[0]),
            "top_tokens": list(dict.fromkeys(top["token"].astype(str)))[:5],
        }
    massive_dims = sorted(by_dim, key=lambda k: (-len(by_dim[k]["layers"]), -by_dim[k]["max_ratio_to_median"], k))
    massive_layers = sorted(int(x) for x in massive["layer"].unique())
    return {
        "model": model,
        "prompt_set": prompt_set,
        "n_layers": n_layers,
        "d_model": d,
        "n_tokens": n_tokens,
        "n_prompts": n_prompts,
        "n_categories": n_categories,
        "roles": roles,
        "drop_first_token": drop_first_token,
        "pr_min": pr_min,
        "pr_min_layer": pr_min_layer,
        "pr_max": pr_max,
        "pr_max_layer": pr_max_layer,
        "pr_last": float(pr[-1]),
        "norm_first": float(norm[0]),
        "norm_last": float(norm[-1]),
        "norm_growth": float(norm[-1] / norm[0]) if norm[0] > 0 else None,
        "norm_peak_layer": int(np.argmax(norm)),
        "mean_cosine_last": float(curves["mean_cosine"][-1]),
        "mean_cosine_centered_abs_max": float(np.nanmax(np.abs(curves["mean_cosine_centered"]))),
        "isotropy_min": iso_min,
        "isotropy_min_layer": iso_min_layer,
        "final_category_separation": (float(curves["category_separation"][-1])
                                      if np.isfinite(curves["category_separation"][-1]) else None),
        "category_separation_max": sep_max,
        "category_separation_max_layer": sep_max_layer,
        "massive_ratio": massive_ratio,
        "massive_dims": massive_dims,
        "n_massive_layers": len(massive_layers),
        "massive_first_layer": massive_layers[0] if massive_layers else None,
        "massive": {str(k): by_dim[k] for k in massive_dims},
    }


# ---------------------------------------------------------------------------- outputs


def plot_curves(result: ResidualGeometryResult, path: str | Path) -> None:
    from layerscope.report.plotting import figure, layer_axis, save

    s = result.summary
    n_layers = s["n_layers"]
    x = np.arange(n_layers + 1)
    c = result.curves
    with figure(2, 3, width=11.0, height=5.8) as (fig, axes):
        ax = axes[0, 0]
        ax.plot(x, c["norm_mean"], marker="o", markersize=2.5, label="mean")
        ax.plot(x, c["norm_median"], linestyle="--", label="median")
        ax.fill_between(x, np.percentile(result.norms, 5, axis=1), np.percentile(result.norms, 95, axis=1),
                        alpha=0.2, label="5–95 %")
        ax.plot(x, c["norm_max"], linestyle=":", label="max")
        ax.set_yscale("log")
        ax.set_ylabel("token norm ‖h‖")
        ax.legend(loc="upper left")
        ax = axes[0, 1]
        ax.plot(x, c["participation_ratio"], marker="o", markersize=2.5, label="participation ratio")
        ax.plot(x, c["effective_rank"], linestyle="--", label="entropy effective rank")
        ax.set_yscale("log")
        ax.set_ylabel("dimensions")
        ax.legend(loc="upper left")
        ax = axes[0, 2]
        ax.plot(x, c["mean_cosine"], marker="o", markersize=2.5, label="mean cosine (raw)")
        ax.plot(x, c["mean_cosine_centered"], linestyle="--", label="mean cosine (mean removed)")
        ax.plot(x, c["isotropy"], linestyle=":", label="1 − λmax/Σλ")
        ax.set_ylabel("isotropy")
        ax.legend(loc="best")
        ax = axes[1, 0]
        ax.plot(x, c["category_separation"], marker="o", markersize=2.5, label="observed")
        lo = np.array([pair[0] if pair else np.nan for pair in result.separation_ci], dtype=float)
        hi = np.array([pair[1] if pair else np.nan for pair in result.separation_ci], dtype=float)
        ax.fill_between(x, lo, hi, alpha=0.25, label="95 % interval (prompts)")
        if len(result.separation_null):
            null = result.separation_null
            q95 = [np.quantile(col[np.isfinite(col)], 0.95) if np.isfinite(col).any() else np.nan for col in null.T]
            ax.plot(x, q95, color="0.4", linestyle=":", label="permuted labels: 95th percentile")
        ax.axhline(1.0, color="0.5", linewidth=0.8)
        ax.legend(loc="best")
        ax.set_ylabel("between / within category distance")
        ax = axes[1, 1]
        ax.plot(x, c["massive_max_ratio"], marker="o", markersize=2.5)
        ax.axhline(s["massive_ratio"], color="0.5", linestyle="--", linewidth=0.8, label="massive threshold")
        ax.set_yscale("log")
        ax.set_ylabel("max |h| / median |h|")
        ax.legend(loc="upper left")
        ax = axes[1, 2]
        ax.plot(x, c["top_eigen_fraction"], marker="o", markersize=2.5)
        ax.set_ylabel("λmax / Σλ")
        for a in axes.flat:
            layer_axis(a, n_layers)
        fig.suptitle(f"residual-stream geometry — {s['model']} on {s['prompt_set']} ({s['n_tokens']} tokens, "
                     f"{s['n_prompts']} prompts, roles {', '.join(s['roles'])})")
        save(fig, path)


def plot_massive(result: ResidualGeometryResult, path: str | Path, max_dims: int = 12) -> None:
    from layerscope.report.plotting import figure, save

    s = result.summary
    ratios = result.dim_max_ratio
    dims = [int(k) for k in s["massive_dims"]][:max_dims]
    if len(dims) < max_dims:  # fill up with the largest remaining dimensions
        order = np.argsort(-ratios.max(axis=0))
        dims += [int(j) for j in order if int(j) not in dims][: max_dims - len(dims)]
    with figure(width=8.0, height=0.35 * len(dims) + 1.6) as (fig, ax):
        image = ax.imshow(np.log10(np.maximum(ratios[:, dims].T, 1e-3)), aspect="auto", cmap="magma",
                          interpolation="nearest")
        ax.set_yticks(range(len(dims)))
        ax.set_yticklabels([f"dim {j}" for j in dims])
        ax.set_xlabel("layer (residual boundary: 0 = embeddings)")
        ax.grid(False)
        bar = fig.colorbar(image, ax=ax)
        bar.set_label("log10 max |h| / median |h|")
        ax.set_title(f"largest activation dimensions (massive: ≥ {s['massive_ratio']:g}× median; "
                     f"{len(s['massive_dims'])} dims massive somewhere)")
        save(fig, path)


def run(job: Job) -> Result:
    """Residual-stream geometry of one model on one prompt set, from its activation cache (CPU)."""
    params = job.params
    cache = ActivationCache(Path(job.input("resid")).parent)
    result = residual_geometry(
        cache, model=job.model, prompt_set=job.prompt_set, roles=params["roles"],
        drop_first_token=params["drop_first_token"], massive_ratio=params["massive_ratio"],
        massive_top_tokens=params["massive_top_tokens"], massive_tokens=params["massive_tokens"],
        n_perm=params["n_perm"], seed=params["seed"],
    )
    return Result(
        summary=result.summary,
        tables={"metrics": result.metrics, "massive": result.massive},
        figures={"curves": partial(plot_curves, result), "massive": partial(plot_massive, result)},
    )


EXPERIMENT = Experiment(
    name="residual_geometry",
    dashboard=('final_category_separation', 'final_category_separation_p_value', 'pr_min', 'pr_min_layer', 'n_massive_layers'),
    headlines=("final_category_separation",),
    family="geometry",
    description="norms, dimensionality, isotropy, clustering and massive activations of the residual stream",
    description_long="Residual-stream geometry per layer over the activation cache (decoders and encoders).",
    needs="any",
    data="prompts",
    gpu=False,
    inputs=("resid", "tokens"),
    run=run,
    tables=("metrics", "massive"),
    figures=(Figure("curves", "per-layer geometry"), Figure("massive", "massive activations")),
    params={'roles': {'description': 'Token roles measured (system, template, prompt, completion). A chat '
                                     "template's system and template tokens are the same tokens with the same "
                                     'residuals in every prompt: including them pools as many identical copies.',
                      'type': 'array',
                      'items': {'enum': ['system', 'template', 'prompt', 'completion']},
                      'minItems': 1,
                      'uniqueItems': True,
                      'default': list(DEFAULT_ROLES)},
            'drop_first_token': {'description': 'Leave out position 0 of every sequence (the attention sink, which '
                                                'carries massive activations) from every statistic but the search '
                                                'for massive activations.',
                                 'type': 'boolean',
                                 'default': True},
            'massive_ratio': {'description': 'An activation |h[t, j]| is massive when it is at least this many times '
                                             "the layer's median |h|.",
                              'type': 'number',
                              'exclusiveMinimum': 1,
                              'default': 100},
            'massive_top_tokens': {'description': 'Tokens listed per massive dimension and layer (those with the '
                                                  'largest |h|).',
                                   'type': 'integer',
                                   'minimum': 1,
                                   'default': 5},
            'massive_tokens': {'description': 'Tokens searched for massive activations: every token of the cache '
                                              '(all: the attention sink and template tokens, where they sit, '
                                              'included), or only those selected by roles and drop_first_token.',
                               'enum': list(MASSIVE_TOKENS),
                               'default': 'all'},
            'n_perm': {'description': 'Permutations of the category labels among prompts for the null of the '
                                      'category separation.',
                       'type': 'integer',
                       'minimum': 1,
                       'default': 1000}},
    threads=1,
    runtime=60,
)
