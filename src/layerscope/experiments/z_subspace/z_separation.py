"""Z separation: how paired Chinese and English problems sit in Z, in Z⊥ and in random subspaces.

For every Z-mask (layer ℓ, k) and the mean-pooled problem-text states at ``resid.ℓ``
(zh_i, en_i for pair i; see :mod:`layerscope.data.paired_states`), in each subspace S ∈ {Z, Z⊥,
full space}:

* ``separation_ratio`` = mean_i ‖P_S(zh_i − en_i)‖ / mean_{i≠j} ‖P_S(zh_i − en_j)‖ — how far a
  problem is from its own translation, relative to other problems in the other language
  (both terms cross the language boundary, so a constant language offset enters both).
  Below 1: translations are nearer to each other than to other problems; lower = S groups
  by problem rather than by language.
* ``language_energy`` = Σ_i ‖P_S Δ_i‖² / Σ_i ‖Δ_i‖² with Δ_i = zh_i − en_i: the share of the
  per-problem language difference that lies in S. Chance for a k-dimensional subspace
  with no preference is k/d (Z⊥: (d − k)/d); ``language_energy_over_chance`` divides by it.
* ``mean_offset_energy``: the same share for the mean language offset mean_i Δ_i.
* ``content_energy``: the share of the variance of all 2N pooled states (centred) in S.

Null: the same four numbers in ``n_random_subspaces`` Haar-random subspaces of the same k
(and their complements, for Z⊥), drawn in chunks so memory stays bounded (see
:mod:`layerscope.experiments.z_subspace.subspace_null`). Z (Z⊥) is placed
in that distribution by its percentile (share of random subspaces with a smaller value) and
a two-sided empirical p-value 2·min(p_below, p_above), each one-sided p being
(1 + #null on that side) / (1 + n).

Intervals over pairs: a seeded bootstrap of the pairs (a pair is the unit: its zh and en
states go together). The separation ratio of a resample is computed from the distance
matrix of the sampled pairs, leaving out the off-diagonal entries where a pair meets a copy
of itself; energies are ratios of sums over the sampled pairs.
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
from layerscope.experiments.z_subspace.subspace_null import random_projections
from layerscope.experiments.z_subspace.z_mask import ZMask

log = logging.getLogger(__name__)

SUBSPACES = ("z", "z_perp", "full")
SUBSPACE_LABELS = {"z": "Z", "z_perp": "Z⊥", "random": "random (null)", "full": "full space"}
METRICS = ("separation_ratio", "language_energy", "mean_offset_energy", "content_energy")
N_RANDOM_SUBSPACES = 1000
NULL_CHUNK_BYTES = 64 * 2**20  # bootstrap distance matrices held at once (float64)


def project(x: torch.Tensor, basis: torch.Tensor | None, which: str) -> torch.Tensor:
    """Rows of x projected onto the subspace: 'in' = P x, 'out' = (I − P) x, basis None = identity."""
    if basis is None:
        return x
    inside = (x @ basis.T) @ basis
    return inside if which == "in" else x - inside


def subspace_projection(x: torch.Tensor, subspace: str, z: torch.Tensor) -> torch.Tensor:
    if subspace == "z":
        return project(x, z, "in")
    if subspace == "z_perp":
        return project(x, z, "out")
    if subspace == "full":
        return x
    raise ValueError(subspace)


def separation_ratio(zh: torch.Tensor, en: torch.Tensor) -> float:
    """mean_i ‖zh_i − en_i‖ / mean_{i≠j} ‖zh_i − en_j‖ (rows already projected)."""
    n = zh.shape[0]
    if n < 2:
        raise LayerscopeError("the separation ratio needs at least two pairs")
    dist = torch.cdist(zh, en)
    paired = dist.diagonal().mean()
    off = (dist.sum() - dist.diagonal().sum()) / (n * (n - 1))
    return float(paired / off) if off > 0 else float("nan")


def resampled_separation_ratio(dist: np.ndarray, index: np.ndarray) -> np.ndarray:
    """The separation ratio of resampled pairs from the zh × en distance matrix [N, N].

    ``index`` [B, N] lists the pairs of each resample (float or int); entries where a pair
    meets a copy of itself are left out of the off-diagonal mean. On the sample itself (no
    repeats) this is :func:`separation_ratio`.
    """
    idx = np.asarray(index).astype(np.int64)
    n = idx.shape[1]
    step = max(1, int(NULL_CHUNK_BYTES // (16 * n * n)))  # bounded memory for large N
    out = np.empty(idx.shape[0])
    for start in range(0, idx.shape[0], step):
        part = idx[start : start + step]
        paired = dist[part, part].mean(axis=1)
        cross = dist[part[:, :, None], part[:, None, :]]
        other = part[:, :, None] != part[:, None, :]
        off = (cross * other).sum(axis=(1, 2)) / np.maximum(other.sum(axis=(1, 2)), 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[start : start + step] = np.where(off > 0, paired / np.where(off > 0, off, 1.0), np.nan)
    return out


def energy_share(x: torch.Tensor, projected: torch.Tensor) -> float:
    total = float((x**2).sum())
    return float((projected**2).sum()) / total if total > 0 else float("nan")


def chance_share(subspace: str, k: int, d: int) -> float:
    return {"z": k / d, "random": k / d, "z_perp": (d - k) / d, "full": 1.0}[subspace]


# ---------------------------------------------------------------------------- random-subspace null


def null_position(observed: float, null: np.ndarray) -> dict[str, float]:
    """Where ``observed`` sits in a null sample: mean, central 95 % range, percentile, two-sided p."""
    null = np.asarray(null, dtype=float)
    null = null[np.isfinite(null)]
    if not np.isfinite(observed) or null.size == 0:
        nan = float("nan")
        return {"null_mean": nan, "null_lo": nan, "null_hi": nan, "percentile": nan, "p_value": nan,
                "n_null": int(null.size)}
    above = st.null_summary(observed, null, greater=True)
    below = st.null_summary(observed, null, greater=False)
    lo, hi = np.quantile(null, [0.025, 0.975])
    return {"null_mean": above["null_mean"], "null_lo": float(lo), "null_hi": float(hi),
            "percentile": above["percentile"], "p_value": float(min(1.0, 2 * min(above["p_value"], below["p_value"]))),
            "n_null": above["n_null"]}


@dataclass
class PooledSet:
    """The pooled states of one layer, as float64 numpy arrays, and what every metric needs."""

    zh: np.ndarray  # [N, d]
    en: np.ndarray
    delta: np.ndarray  # zh − en
    offset: np.ndarray  # [1, d] mean of delta
    centred: np.ndarray  # [2N, d]
    cross_sq: np.ndarray  # [N, N] ‖zh_i − en_j‖²

    @classmethod
    def build(cls, zh: torch.Tensor, en: torch.Tensor) -> "PooledSet":
        zh, en = zh.double().numpy(), en.double().numpy()
        delta = zh - en
        both = np.concatenate([zh, en])
        cross = zh[:, None, :] - en[None, :, :]
        return cls(zh, en, delta, delta.mean(axis=0, keepdims=True), both - both.mean(axis=0, keepdims=True),
                   (cross**2).sum(-1))


def null_metrics(pooled: PooledSet, pz: np.ndarray, pe: np.ndarray) -> dict[str, np.ndarray]:
    """The four metrics in each random subspace and in its complement, from the projections Qᵀzh, Qᵀen [c, N, k].

    Keys ``{metric}`` (the subspace) and ``{metric}_perp`` (its complement), each [c].
    """
    out = {}
    in_sq = np.clip((pz**2).sum(-1)[:, :, None] + (pe**2).sum(-1)[:, None, :]
                    - 2 * np.matmul(pz, pe.transpose(0, 2, 1)), 0, None)  # [c, N, N] ‖Qᵀ(zh_i − en_j)‖²
    out_sq = np.clip(pooled.cross_sq[None] - in_sq, 0, None)
    n = in_sq.shape[1]
    eye = np.eye(n, dtype=bool)
    for key, sq in (("separation_ratio", in_sq), ("separation_ratio_perp", out_sq)):
        dist = np.sqrt(sq)
        paired = dist[:, eye].mean(axis=1)
        off = dist[:, ~eye].mean(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[key] = np.where(off > 0, paired / np.where(off > 0, off, 1.0), np.nan)
    pd_ = pz - pe
    both = np.concatenate([pz, pe], axis=1)
    projected = {"language_energy": pd_, "mean_offset_energy": pd_.mean(axis=1, keepdims=True),
                 "content_energy": both - both.mean(axis=1, keepdims=True)}
    for metric, x in (("language_energy", pooled.delta), ("mean_offset_energy", pooled.offset),
                      ("content_energy", pooled.centred)):
        total = float((x**2).sum())
        inside = (projected[metric] ** 2).sum(axis=(1, 2))
        if total > 0:
            out[metric], out[f"{metric}_perp"] = inside / total, np.clip(total - inside, 0, None) / total
        else:
            out[metric] = out[f"{metric}_perp"] = np.full(pz.shape[0], np.nan)
    return out


def random_null(pooled: PooledSet, d: int, k: int, n: int, *, seed: int, layer: int) -> dict[str, np.ndarray]:
    """:func:`null_metrics` over ``n`` Haar-random k-subspaces (seeded by seed, layer, k)."""
    rows = np.concatenate([pooled.zh, pooled.en])
    n_pairs = pooled.zh.shape[0]
    parts: dict[str, list[np.ndarray]] = {}
    for proj in random_projections(rows, d, k, n, seed=seed, key=(layer, k)):
        for key, values in null_metrics(pooled, proj[:, :n_pairs], proj[:, n_pairs:]).items():
            parts.setdefault(key, []).append(values)
    return {key: np.concatenate(v) for key, v in parts.items()}


# ---------------------------------------------------------------------------- intervals over pairs


def pair_intervals(pooled: PooledSet, z: np.ndarray, boot: st.Bootstrap) -> dict[str, tuple]:
    """(point, [lo, hi]) over pairs of the separation ratios (Z, Z⊥, full, Z − Z⊥) and Z's language energy.

    ``z`` is the basis as rows [k, d].
    """
    n = pooled.zh.shape[0]
    units = np.arange(n, dtype=float)
    dz = ((pooled.zh @ z.T)[:, None, :] - (pooled.en @ z.T)[None, :, :])
    in_sq = (dz**2).sum(-1)
    dist = {"z": np.sqrt(in_sq), "z_perp": np.sqrt(np.clip(pooled.cross_sq - in_sq, 0, None)),
            "full": np.sqrt(pooled.cross_sq)}
    out = {}
    for sub, matrix in dist.items():
        out[f"separation_ratio_{sub}"] = boot.interval(units, statistic=partial(resampled_separation_ratio, matrix))
    out["separation_ratio_z_minus_z_perp"] = boot.interval(
        units, statistic=lambda idx: resampled_separation_ratio(dist["z"], idx)
        - resampled_separation_ratio(dist["z_perp"], idx))
    energy_in = ((pooled.delta @ z.T) ** 2).sum(-1)
    energy_all = (pooled.delta**2).sum(-1)
    out["language_energy_z"] = boot.interval(energy_in, energy_all, statistic=st.weighted_mean)
    return out


def _below(ci, value: float) -> bool:
    """Whether an interval lies entirely below ``value`` (False for an undefined interval)."""
    return ci is not None and ci[1] is not None and ci[1] < value


@dataclass
class SeparationResult:
    metrics: pd.DataFrame
    summary: dict


def z_separation(states: PairedStates, mask: ZMask, *, model: str, prompt_set: str,
                 n_random_subspaces: int = N_RANDOM_SUBSPACES, seed: int = 0,
                 pooling: str = "mean", ks: Sequence[int] | None = None) -> SeparationResult:
    cache = states.cache
    mask.check_fits(cache.n_layers, cache.d_model, f"the activation cache {cache.directory}")
    if n_random_subspaces < 1:
        raise LayerscopeError("z_separation.n_random_subspaces must be at least 1")
    d = mask.d_model
    ks = sweep_ks(mask, ks)
    boot = st.Bootstrap(states.n_pairs, unit="pair", seed=seed)
    records, combos = [], []
    for layer in mask.layers:
        zh, en = states.pooled(layer, pooling)
        pooled = PooledSet.build(zh, en)
        delta = zh - en
        offset = delta.mean(dim=0, keepdim=True)
        both = torch.cat([zh, en])
        centred = both - both.mean(dim=0, keepdim=True)
        for k in ks:
            z = mask.basis(layer, k).to(torch.float64)
            row = {"layer": layer, "k": k, "chance": k / d}
            cis = pair_intervals(pooled, z.numpy(), boot)
            for sub in SUBSPACES:
                proj = lambda x: subspace_projection(x, sub, z)  # noqa: E731
                values = {
                    "separation_ratio": separation_ratio(proj(zh), proj(en)),
                    "language_energy": energy_share(delta, proj(delta)),
                    "mean_offset_energy": energy_share(offset, proj(offset)),
                    "content_energy": energy_share(centred, proj(centred)),
                }
                chance = chance_share(sub, k, d)  # 0 for Z⊥ when k = d: no ratio
                values["language_energy_over_chance"] = values["language_energy"] / chance if chance else float("nan")
                values["content_energy_over_chance"] = values["content_energy"] / chance if chance else float("nan")
                for metric, value in values.items():
                    ci = cis.get(f"{metric}_{sub}", (None, [np.nan, np.nan]))[1]
                    records.append((layer, k, sub, metric, value, ci[0], ci[1]))
                    row[f"{metric}_{sub}"] = value
            for key, (_, ci) in cis.items():
                row[f"{key}_ci"] = ci
            row["separation_ratio_z_minus_z_perp"] = cis["separation_ratio_z_minus_z_perp"][0]
            chance_z = k / d
            row["language_energy_over_chance_z_ci"] = [None if v is None else v / chance_z
                                                       for v in row["language_energy_z_ci"]]
            null = random_null(pooled, d, k, n_random_subspaces, seed=seed, layer=layer)
            for metric in METRICS:
                for sub, key in (("z", metric), ("z_perp", f"{metric}_perp")):
                    pos = null_position(row[f"{metric}_{sub}"], null[key])
                    tag = "" if sub == "z" else "_perp"
                    row[f"{metric}_null{tag}_mean"] = pos["null_mean"]
                    row[f"{metric}_null{tag}_range"] = [pos["null_lo"], pos["null_hi"]]
                    row[f"{metric}_{sub}_percentile"] = pos["percentile"]
                    row[f"{metric}_{sub}_p_value"] = pos["p_value"]
                    records.append((layer, k, f"random{tag}", metric, pos["null_mean"], pos["null_lo"], pos["null_hi"]))
                    records.append((layer, k, sub, f"{metric}_percentile", pos["percentile"], np.nan, np.nan))
                    records.append((layer, k, sub, f"{metric}_p_value", pos["p_value"], np.nan, np.nan))
            row["language_energy_null_mean_over_chance"] = row["language_energy_null_mean"] / chance_z
            combos.append(row)
    frame = pd.DataFrame(records, columns=["layer", "k", "subspace", "metric", "value", "ci_lo", "ci_hi"])
    frame.insert(0, "pooling", pooling)
    frame.insert(0, "prompt_set", prompt_set)
    frame.insert(0, "model", model)
    labels = [f"L{c['layer']}/k{c['k']}" for c in combos]
    pick = lambda key: [c[key] for c in combos]  # noqa: E731
    holm_language = st.holm(pick("language_energy_z_p_value")) if combos else []
    holm_separation = st.holm(pick("separation_ratio_z_p_value")) if combos else []
    for c, p_lang, p_sep in zip(combos, holm_language, holm_separation):
        c["language_energy_z_p_holm"] = p_lang
        c["separation_ratio_z_p_holm"] = p_sep
    summary = {
        "model": model,
        "prompt_set": prompt_set,
        "n_pairs": states.n_pairs,
        **states.sample,
        "pooling": pooling if pooling != "mean" else POOLING,
        "layers": mask.layers,
        "k": ks,
        "d_model": d,
        "n_random_subspaces": int(n_random_subspaces),
        "combos": labels,
        "separation_ratio_z": pick("separation_ratio_z"),
        "separation_ratio_z_ci": pick("separation_ratio_z_ci"),
        "separation_ratio_z_perp": pick("separation_ratio_z_perp"),
        "separation_ratio_z_perp_ci": pick("separation_ratio_z_perp_ci"),
        "separation_ratio_full": pick("separation_ratio_full"),
        "separation_ratio_full_ci": pick("separation_ratio_full_ci"),
        "separation_ratio_z_minus_z_perp": pick("separation_ratio_z_minus_z_perp"),
        "separation_ratio_z_minus_z_perp_ci": pick("separation_ratio_z_minus_z_perp_ci"),
        "separation_ratio_null_mean": pick("separation_ratio_null_mean"),
        "separation_ratio_z_percentile": pick("separation_ratio_z_percentile"),
        "separation_ratio_z_p_value": pick("separation_ratio_z_p_value"),
        "separation_ratio_z_perp_percentile": pick("separation_ratio_z_perp_percentile"),
        "separation_ratio_z_perp_p_value": pick("separation_ratio_z_perp_p_value"),
        "language_energy_z_over_chance": pick("language_energy_over_chance_z"),
        "language_energy_z_over_chance_ci": pick("language_energy_over_chance_z_ci"),
        "language_energy_null_mean_over_chance": pick("language_energy_null_mean_over_chance"),
        "language_energy_z_percentile": pick("language_energy_z_percentile"),
        "language_energy_z_p_value": pick("language_energy_z_p_value"),
        "n_combos_z_separates_better": int(sum(_below(c["separation_ratio_z_minus_z_perp_ci"], 0.0) for c in combos)),
        "n_combos_z_separates_better_than_null": int(sum(
            c["separation_ratio_z_p_holm"] < 0.05 and c["separation_ratio_z_percentile"] < 50 for c in combos)),
        "n_combos_language_energy_z_below_null": int(sum(
            c["language_energy_z_p_holm"] < 0.05 and c["language_energy_z_percentile"] < 50 for c in combos)),
        "n_combos_language_energy_z_above_null": int(sum(
            c["language_energy_z_p_holm"] < 0.05 and c["language_energy_z_percentile"] > 50 for c in combos)),
        **boot.summary(),
        "by_combo": combos,
    }
    return SeparationResult(frame, summary)


def plot_separation(result: SeparationResult, path: str | Path) -> None:
    from layerscope.report.plotting import PALETTE, figure, save

    s = result.summary
    combos = s["by_combo"]
    labels = s["combos"]
    x = np.arange(len(combos))
    width = 0.18

    def bars(ax, offset, values, cis, color, label):
        values = np.asarray(values, dtype=float)
        err = None
        if cis is not None:
            lo = np.array([np.nan if c is None or c[0] is None else c[0] for c in cis], dtype=float)
            hi = np.array([np.nan if c is None or c[1] is None else c[1] for c in cis], dtype=float)
            err = np.nan_to_num(np.vstack([values - lo, hi - values]), nan=0.0).clip(min=0)
        ax.errorbar(x + offset, values, yerr=err, fmt="o", color=color, label=label, capsize=3, markersize=5)

    def null_band(ax, offset, means, ranges, color, label):
        for i, (m, (lo, hi)) in enumerate(zip(means, ranges)):
            ax.fill_between([i + offset - width / 2, i + offset + width / 2], [lo, lo], [hi, hi], color=color,
                            alpha=0.35, linewidth=0, label=label if i == 0 else None)
            ax.plot([i + offset - width / 2, i + offset + width / 2], [m, m], color=color, linewidth=1.2)

    with figure(1, 2, width=10.0, height=3.8) as (fig, axes):
        ax = axes[0]
        for i, sub in enumerate(("z", "z_perp", "full")):
            bars(ax, (i - 1.5) * width, [c[f"separation_ratio_{sub}"] for c in combos],
                 [c[f"separation_ratio_{sub}_ci"] for c in combos], PALETTE[i], SUBSPACE_LABELS[sub])
        null_band(ax, 1.5 * width, [c["separation_ratio_null_mean"] for c in combos],
                  [c["separation_ratio_null_range"] for c in combos], PALETTE[3],
                  f"random k-subspaces (mean, 95 % of {s['n_random_subspaces']})")
        ax.set_ylabel("translation distance / other-problem distance")
        ax.set_title("separation ratio (lower: grouped by problem)")
        ax.legend(loc="lower right", ncol=2, fontsize=7)
        ax = axes[1]
        chance = np.array([c["chance"] for c in combos])
        bars(ax, -width, [c["language_energy_over_chance_z"] for c in combos],
             [c["language_energy_over_chance_z_ci"] for c in combos], PALETTE[0], SUBSPACE_LABELS["z"])
        bars(ax, 0.0, [c["language_energy_over_chance_z_perp"] for c in combos], None, PALETTE[1],
             SUBSPACE_LABELS["z_perp"])
        null_band(ax, width, np.array([c["language_energy_null_mean"] for c in combos]) / chance,
                  [[lo / ch, hi / ch] for (lo, hi), ch in zip((c["language_energy_null_range"] for c in combos), chance)],
                  PALETTE[3], "random k-subspaces (95 %)")
        ax.axhline(1.0, color="0.4", linestyle="--", linewidth=0.8, label="chance (k/d, (d−k)/d)")
        ax.set_ylabel("share of zh−en difference / chance")
        ax.set_title("language energy relative to chance")
        ax.legend(loc="best", fontsize=7)
        for ax in axes:
            ax.set_xticks(x, labels, rotation=30 if len(labels) > 4 else 0)
            ax.set_xlabel("Z-mask layer / k")
        pooled = "last-token" if s["pooling"] == "last" else "mean-pooled"
        fig.suptitle(f"zh/en separation in Z — {s['model']} on {s['prompt_set']} ({s['n_pairs']} pairs, "
                     f"{pooled} problem-text states; error bars: 95 % over pairs)")
        save(fig, path)


# keys repeated with a ``_{pooling}`` suffix for every pooling after the first
POOLED_KEYS = ("separation_ratio_z", "separation_ratio_z_perp", "separation_ratio_full",
               "separation_ratio_z_minus_z_perp", "separation_ratio_z_p_value", "language_energy_z_over_chance",
               "language_energy_z_p_value", "n_combos_z_separates_better", "n_combos_z_separates_better_than_null",
               "n_combos_language_energy_z_below_null", "n_combos_language_energy_z_above_null")


def sweep_ks(mask: ZMask, ks: Sequence[int] | None) -> list[int]:
    """The subspace sizes to evaluate: the mask's own k (null), or a sweep of sizes the mask built at every
    block (z_mask's k and k_sweep)."""
    if not ks:
        return list(mask.ks)
    available = sorted(set(mask.ks) | set(mask.every_layer_ks))
    capped = list(dict.fromkeys(min(int(k), mask.d_model) for k in ks))
    missing = [k for k in capped if not all((layer, k) in mask.bases for layer in mask.layers)]
    if missing:
        raise LayerscopeError(f"z_separation.k: the Z-mask has no basis of size {missing} at blocks {mask.layers}; "
                              f"it has {available} (add them to z_mask.k_sweep)")
    return capped


def with_poolings(results: dict[str, SeparationResult]) -> SeparationResult:
    """One result from the runs of several poolings: the first pooling's summary as is, the others' key
    numbers beside it with a ``_{pooling}`` suffix (their intervals too), one table with a pooling column."""
    first, *rest = results
    summary = dict(results[first].summary)
    summary["poolings"] = list(results)
    for pooling in rest:
        other = results[pooling].summary
        for key in POOLED_KEYS:
            summary[f"{key}_{pooling}"] = other[key]
            if f"{key}_ci" in other:
                summary[f"{key}_{pooling}_ci"] = other[f"{key}_ci"]
        summary[f"by_combo_{pooling}"] = other["by_combo"]
    frame = pd.concat([r.metrics for r in results.values()], ignore_index=True)
    return SeparationResult(frame, summary)


def run(job: Job) -> Result:
    """zh/en separation in Z, Z⊥ and random subspaces, from the activation cache (CPU)."""
    params = job.params
    states = PairedStates.open(Path(job.input("resid")).parent, job.input("prompts"))
    mask = ZMask.load(job.input("mask"))
    results = {pooling: z_separation(states, mask, model=job.model, prompt_set=job.prompt_set,
                                     n_random_subspaces=params["n_random_subspaces"], seed=params["seed"],
                                     pooling=pooling, ks=params["k"])
               for pooling in params["pooling"]}
    result = with_poolings(results)
    return Result(
        summary=result.summary,
        tables={"metrics": result.metrics},
        figures={"separation": partial(plot_separation, results[params["pooling"][0]])},
    )


EXPERIMENT = Experiment(
    name="z_separation",
    headlines=("separation_ratio_z", "separation_ratio_z_perp"),
    family="z_subspace",
    description="zh/en separation and energy in Z, Z⊥, random",
    description_long="z_subspace: separation ratio and energy fractions of mean-pooled zh/en problem states in Z "
                     "and Z-perp, with intervals over pairs, placed in a null of random subspaces of the same k.",
    needs="decoder",
    data="paired",
    gpu=False,
    inputs=("mask", "resid", "tokens", "prompts"),
    run=run,
    tables=("metrics",),
    figures=(Figure("separation", "separation and energy"),),
    params={
        "k": {
            "description": "Subspace sizes k to evaluate at the Z-mask's blocks: null = the mask's own k; a list = a "
                           "k sweep (each size must be one z_mask builds at every block: its k or k_sweep).",
            "type": ["array", "null"],
            "items": {"type": "integer", "minimum": 1},
            "uniqueItems": True,
            "default": None,
        },
        "pooling": {
            "description": "How each prompt's problem-text states are pooled into one vector: 'mean' over its tokens, "
                           "'last' token. The first listed gives the summary's keys and the figure; every other "
                           "pooling adds the key numbers with a _{pooling} suffix.",
            "type": "array",
            "items": {"enum": ["mean", "last"]},
            "minItems": 1,
            "uniqueItems": True,
            "default": ["mean", "last"],
        },
        "n_random_subspaces": {
            "description": "Haar-random subspaces of the same k that make the null distribution of every metric.",
            "type": "integer",
            "minimum": 1,
            "default": N_RANDOM_SUBSPACES,
        },
    },
    threads=1,
    runtime=30,
    section="z_subspace",
)
