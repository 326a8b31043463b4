"""Update decomposition: how much of each block's update lands in Z and how much in Z⊥.

For block j (the transition resid.j → resid.(j+1), j = 0 … L−1) and each prompt, the
mean-pooled update is Δh̄_j = mean_t (resid.(j+1)[t] − resid.j[t]) over the problem-text
tokens. With a fixed basis — the Z-mask of layer ℓ and size k, used at every transition —

    R(j) = mean_i ‖P_Z Δh̄_j,i‖ / mean_i ‖P_Z⊥ Δh̄_j,i‖

over the prompts of one language (zh and en separately). A subspace with no preference
gets E‖P v‖² = (k/d)‖v‖², hence the chance level R₀ = √(k / (d − k)).

Null: R(j) of the same updates in ``n_random_subspaces`` Haar-random k-subspaces (see
:mod:`layerscope.experiments.z_subspace.subspace_null`). Z is placed in it per transition and
for the mean over transitions, by its percentile and a two-sided empirical p-value; the
transitions where Z departs from the null are counted after a Holm correction over the
transitions of one mask. Intervals are over pairs: a seeded bootstrap resamples pairs (the zh
and en prompt of a pair together) and recomputes R from the per-prompt norms.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from layerscope import LayerscopeError
from layerscope.engines import statistics as st
from layerscope.experiments.registry import Experiment, Figure, Job, Result
from layerscope.data.paired_states import POOLING, PairedStates
from layerscope.experiments.z_subspace.subspace_null import random_projections
from layerscope.experiments.z_subspace.z_mask import ZMask
from layerscope.progress import track
from layerscope.experiments.z_subspace.z_separation import N_RANDOM_SUBSPACES, null_position

log = logging.getLogger(__name__)

LANGS = ("zh", "en")
ALPHA = 0.05  # family-wise level of the per-transition comparisons with the null


def split_norms(updates: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """‖P v‖ and ‖(I − P) v‖ for each row v (basis rows orthonormal)."""
    inside = updates @ basis.T
    norm_in = inside.norm(dim=-1)
    norm_out = (updates.pow(2).sum(dim=-1) - inside.pow(2).sum(dim=-1)).clamp_min(0).sqrt()
    return norm_in, norm_out


def ratio_curve(updates: torch.Tensor, basis: torch.Tensor) -> np.ndarray:
    """R(j) for updates [L, N, d]: mean over prompts of ‖P Δ‖ over mean of ‖P⊥ Δ‖, per transition."""
    norm_in, norm_out = split_norms(updates, basis)
    return (norm_in.mean(dim=1) / norm_out.mean(dim=1)).cpu().numpy()


def chance_ratio(k: int, d: int) -> float:
    return math.sqrt(k / (d - k)) if k < d else float("inf")


def mean_curve_statistic(in_zh, out_zh, in_en, out_en) -> np.ndarray:
    """(R_zh(j) + R_en(j)) / 2 from per-pair norms [B, N, L] (pairs on axis 1): [B, L]."""
    return (in_zh.mean(1) / out_zh.mean(1) + in_en.mean(1) / out_en.mean(1)) / 2


def null_curves(updates: dict[str, np.ndarray], d: int, k: int, n: int, *, seed: int, layer: int) -> np.ndarray:
    """(R_zh + R_en)/2 per transition in ``n`` random k-subspaces: [n, L]."""
    rows = np.concatenate([updates[lang].reshape(-1, d) for lang in LANGS])
    sq = (rows**2).sum(-1)
    n_layers, n_pairs = updates[LANGS[0]].shape[:2]
    out = []
    for proj in random_projections(rows, d, k, n, seed=seed, key=(layer, k)):
        in_sq = (proj**2).sum(-1)  # [c, rows]
        norm_in = np.sqrt(in_sq)
        norm_out = np.sqrt(np.clip(sq[None] - in_sq, 0, None))
        shape = (proj.shape[0], len(LANGS), n_layers, n_pairs)
        ratio = norm_in.reshape(shape).mean(-1) / norm_out.reshape(shape).mean(-1)  # [c, 2, L]
        out.append(ratio.mean(axis=1))
    return np.concatenate(out)


@dataclass
class DecompositionResult:
    metrics: pd.DataFrame
    summary: dict
    curves: dict  # (layer, k) -> {"zh", "en", "mean", "mean_ci", "null_mean", "null_lo", "null_hi", "chance"}


def update_decomposition(states: PairedStates, mask: ZMask, *, model: str, prompt_set: str,
                         n_random_subspaces: int = N_RANDOM_SUBSPACES, seed: int = 0) -> DecompositionResult:
    cache = states.cache
    mask.check_fits(cache.n_layers, cache.d_model, f"the activation cache {cache.directory}")
    if n_random_subspaces < 1:
        raise LayerscopeError("update_decomposition.n_random_subspaces must be at least 1")
    d, n_layers = mask.d_model, cache.n_layers
    pooled_zh, pooled_en = states.pooled_all_layers()
    updates = {"zh": pooled_zh[1:] - pooled_zh[:-1], "en": pooled_en[1:] - pooled_en[:-1]}  # [L, N, d]
    updates_np = {lang: u.numpy() for lang, u in updates.items()}
    boot = st.Bootstrap(states.n_pairs, unit="pair", seed=seed)
    records, curves, combos = [], {}, []
    skipped = [f"L{layer}/k{k}" for layer, k in mask.combos() if k >= d]
    if skipped:
        log.warning("update_decomposition: R is undefined when Z is the whole space (k = d); skipping %s", skipped)
    for layer, k in track(mask.combos(), "update_decomposition", unit="(layer, k)"):
        if k >= d:
            continue
        z = mask.basis(layer, k).to(torch.float64)
        r0 = chance_ratio(k, d)
        curve = {"chance": r0}
        norms = {}
        for lang in LANGS:
            norm_in, norm_out = split_norms(updates[lang], z)  # [L, N]
            norms[lang] = (norm_in.T.numpy(), norm_out.T.numpy())  # [N, L]: pairs first
            curve[lang] = ratio_curve(updates[lang], z)
        per_pair = (*norms["zh"], *norms["en"])
        mean_curve, mean_ci = boot.interval(*per_pair, statistic=mean_curve_statistic)
        mean_curve = np.asarray(mean_curve)
        _, lang_ci = boot.interval(*per_pair, statistic=lambda a, b, c, e: np.stack([a.mean(1) / b.mean(1),
                                                                                    c.mean(1) / e.mean(1)], -1))
        overall, overall_ci = boot.interval(*per_pair, statistic=lambda *x: mean_curve_statistic(*x).mean(-1))
        peak, peak_stability = boot.stability(*per_pair, statistic=mean_curve_statistic)
        peak_value, peak_ci = boot.interval(*per_pair, statistic=lambda *x: mean_curve_statistic(*x)[:, peak])
        low = int(np.argmin(mean_curve))
        gap = lambda a, b, c, e: np.abs(np.log((a.mean(1) / b.mean(1)) / (c.mean(1) / e.mean(1))))  # noqa: E731
        gap_transition, gap_stability = boot.stability(*per_pair, statistic=gap)
        log_gap = np.abs(np.log(curve["zh"] / curve["en"]))
        null = null_curves(updates_np, d, k, n_random_subspaces, seed=seed, layer=layer)  # [n, L]
        per_transition = [null_position(float(mean_curve[j]), null[:, j]) for j in range(n_layers)]
        p_holm = st.holm([p["p_value"] for p in per_transition])
        overall_null = null_position(float(overall), null.mean(axis=1))
        label = f"L{layer}/k{k}"
        boot.check_stability(f"peak_transition of {label}", peak_stability)
        boot.check_stability(f"largest_zh_en_gap_transition of {label}", gap_stability)
        curve.update({"mean": mean_curve, "mean_ci": np.asarray(mean_ci, dtype=float),
                      "null_mean": np.array([p["null_mean"] for p in per_transition]),
                      "null_lo": np.array([p["null_lo"] for p in per_transition]),
                      "null_hi": np.array([p["null_hi"] for p in per_transition])})
        curves[(layer, k)] = curve
        for j in range(n_layers):
            for li, lang in enumerate(LANGS):
                lo, hi = lang_ci[j][li]
                records += [
                    (layer, k, j, lang, "ratio", float(curve[lang][j]), lo, hi),
                    (layer, k, j, lang, "ratio_over_chance", float(curve[lang][j] / r0), lo / r0, hi / r0),
                ]
            pos = per_transition[j]
            records += [
                (layer, k, j, "mean", "ratio", float(mean_curve[j]), mean_ci[j][0], mean_ci[j][1]),
                (layer, k, j, "mean", "ratio_null_mean", pos["null_mean"], pos["null_lo"], pos["null_hi"]),
                (layer, k, j, "mean", "ratio_percentile", pos["percentile"], np.nan, np.nan),
                (layer, k, j, "mean", "ratio_p_value", pos["p_value"], np.nan, np.nan),
                (layer, k, j, "mean", "ratio_p_holm", p_holm[j], np.nan, np.nan),
            ]
        above = [j for j in range(n_layers) if p_holm[j] < ALPHA and per_transition[j]["percentile"] > 50]
        below = [j for j in range(n_layers) if p_holm[j] < ALPHA and per_transition[j]["percentile"] < 50]
        combos.append({
            "layer": layer, "k": k, "chance_ratio": r0,
            "peak_transition": int(peak), "peak_transition_stability": peak_stability,
            "peak_ratio_over_chance": float(peak_value / r0), "peak_ratio_over_chance_ci": [v / r0 for v in peak_ci],
            "lowest_transition": low, "lowest_ratio_over_chance": float(mean_curve[low] / r0),
            "mean_ratio_over_chance": float(overall / r0), "mean_ratio_over_chance_ci": [v / r0 for v in overall_ci],
            "mean_ratio_null_mean_over_chance": overall_null["null_mean"] / r0,
            "mean_ratio_percentile": overall_null["percentile"], "mean_ratio_p_value": overall_null["p_value"],
            "n_transitions_z_dominated": int(sum(ci[0] > 1 for ci in mean_ci)),
            "transitions_above_null": above, "transitions_below_null": below,
            "n_transitions_above_null": len(above), "n_transitions_below_null": len(below),
            "ratio_over_chance_by_transition": (mean_curve / r0).tolist(),
            "ratio_over_chance_by_transition_ci": [[lo / r0, hi / r0] for lo, hi in mean_ci],
            "ratio_percentile_by_transition": [p["percentile"] for p in per_transition],
            "ratio_p_holm_by_transition": p_holm,
            "largest_zh_en_gap_transition": int(gap_transition),
            "largest_zh_en_gap_transition_stability": gap_stability,
            "largest_zh_en_log_gap": float(log_gap.max()),
        })
    smallest = min(1.0, n_layers * 2 / (n_random_subspaces + 1))  # the smallest Holm-adjusted two-sided p
    if combos and smallest >= ALPHA:
        boot.flag(f"per-transition comparisons with the null: with {n_random_subspaces} random subspaces and "
                  f"{n_layers} transitions no Holm-adjusted p can fall below {ALPHA} (smallest {smallest:.3f}); "
                  f"n_random_subspaces ≥ {math.ceil(2 * n_layers / ALPHA)} can")
    frame = pd.DataFrame(records, columns=["mask_layer", "k", "transition", "lang", "metric", "value", "ci_lo", "ci_hi"])
    frame.insert(0, "prompt_set", prompt_set)
    frame.insert(0, "model", model)
    pick = lambda key: [c[key] for c in combos]  # noqa: E731
    summary = {
        "model": model,
        "prompt_set": prompt_set,
        "n_pairs": states.n_pairs,
        **states.sample,
        "pooling": POOLING,
        "definition": "R(j) = mean_i |P_Z dh_j,i| / mean_i |P_Zperp dh_j,i|, dh_j = pooled resid.(j+1) - resid.j",
        "n_layers": n_layers,
        "d_model": d,
        "n_random_subspaces": int(n_random_subspaces),
        "combos": [f"L{c['layer']}/k{c['k']}" for c in combos],
        "skipped_combos": skipped,
        "peak_transition": pick("peak_transition"),
        "peak_transition_stability": pick("peak_transition_stability"),
        "peak_ratio_over_chance": pick("peak_ratio_over_chance"),
        "peak_ratio_over_chance_ci": pick("peak_ratio_over_chance_ci"),
        "mean_ratio_over_chance": pick("mean_ratio_over_chance"),
        "mean_ratio_over_chance_ci": pick("mean_ratio_over_chance_ci"),
        "mean_ratio_null_mean_over_chance": pick("mean_ratio_null_mean_over_chance"),
        "mean_ratio_percentile": pick("mean_ratio_percentile"),
        "mean_ratio_p_value": pick("mean_ratio_p_value"),
        "n_transitions_z_dominated": pick("n_transitions_z_dominated"),
        "n_transitions_above_null": pick("n_transitions_above_null"),
        "n_transitions_below_null": pick("n_transitions_below_null"),
        "largest_zh_en_gap_transition": pick("largest_zh_en_gap_transition"),
        "largest_zh_en_gap_transition_stability": pick("largest_zh_en_gap_transition_stability"),
        **boot.summary(),
        "by_combo": combos,
    }
    return DecompositionResult(frame, summary, curves)


def plot_ratios(result: DecompositionResult, path: str | Path) -> None:
    from layerscope.report.plotting import PALETTE, figure, layer_axis, save

    s = result.summary
    layers = sorted({layer for layer, _ in result.curves})
    ks = sorted({k for _, k in result.curves})
    n_layers = s["n_layers"]
    with figure(len(layers), 1, width=8.0, height=2.9 * len(layers)) as (fig, axes):
        axes = np.atleast_1d(axes)
        for ax, layer in zip(axes, layers):
            x = np.arange(n_layers)
            for i, k in enumerate(ks):
                c = result.curves[(layer, k)]
                ax.plot(x, c["zh"], color=PALETTE[i], linewidth=0.8, alpha=0.7, label=f"k={k} zh")
                ax.plot(x, c["en"], color=PALETTE[i], linestyle="--", linewidth=0.8, alpha=0.7, label=f"k={k} en")
                ax.fill_between(x, c["mean_ci"][:, 0], c["mean_ci"][:, 1], color=PALETTE[i], alpha=0.25, linewidth=0,
                                label=f"k={k} (zh+en)/2, 95 % over pairs")
                ax.fill_between(x, c["null_lo"], c["null_hi"], color="0.5", alpha=0.25, linewidth=0,
                                label=f"k={k} random k-subspaces (95 %)" if i == 0 else None)
                ax.plot(x, c["null_mean"], color=PALETTE[i], linestyle=":", linewidth=0.9)
                ax.axhline(c["chance"], color=PALETTE[i], linewidth=0.6, alpha=0.6)
            ax.axvline(layer - 0.5, color="0.3", linestyle="--", linewidth=0.8)
            ax.set_yscale("log")
            ax.set_ylabel("R = |P_Z Δh| / |P_Z⊥ Δh|")
            ax.set_title(f"Z of layer {layer} (dashed vertical: resid.{layer}); thin lines: chance √(k/(d−k))")
            layer_axis(ax, n_layers - 1, label="block j (update resid.j → resid.j+1)")
            ax.legend(loc="best", ncol=len(ks), fontsize=7)
        fig.suptitle(f"update decomposition — {s['model']} on {s['prompt_set']} ({s['n_pairs']} pairs, "
                     f"null of {s['n_random_subspaces']} random subspaces)")
        save(fig, path)


def run(job: Job) -> Result:
    """Every block's pooled update split into Z and Z⊥, from the activation cache (CPU)."""
    params = job.params
    states = PairedStates.open(Path(job.input("resid")).parent, job.input("prompts"))
    result = update_decomposition(states, ZMask.load(job.input("mask")), model=job.model, prompt_set=job.prompt_set,
                                  n_random_subspaces=params["n_random_subspaces"], seed=params["seed"])
    return Result(
        summary=result.summary,
        tables={"metrics": result.metrics},
        figures={"ratios": partial(plot_ratios, result)},
    )


EXPERIMENT = Experiment(
    name="update_decomposition",
    headlines=("mean_ratio_over_chance",),
    family="z_subspace",
    description="block updates split into Z and Z⊥",
    description_long="z_subspace: R(j) = |P_Z dh_j| / |P_Zperp dh_j| of every block's mean-pooled update, zh and en "
                     "separately, with intervals over pairs, against a null of random subspaces of the same k.",
    needs="decoder",
    data="paired",
    gpu=False,
    inputs=("mask", "resid", "tokens", "prompts"),
    run=run,
    tables=("metrics",),
    figures=(Figure("ratios", "R per block"),),
    params={
        "n_random_subspaces": {
            "description": "Haar-random subspaces of the same k that make the null distribution of R(j).",
            "type": "integer",
            "minimum": 1,
            "default": N_RANDOM_SUBSPACES,
        },
    },
    threads=1,
    runtime=30,
    section="z_subspace",
)
