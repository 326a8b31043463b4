"""Update decomposition: how much of each block's update lands in Z and how much in Z⊥.

For block j (the transition resid.j → resid.(j+1), j = 0 … L−1) and each prompt, the
mean-pooled update is Δh̄_j = mean_t (resid.(j+1)[t] − resid.j[t]) over the problem-text
tokens. With a fixed basis — the Z-mask of layer ℓ and size k, used at every transition —

    R(j) = mean_i ‖P_Z Δh̄_j,i‖ / mean_i ‖P_Z⊥ Δh̄_j,i‖

over the prompts of one language (zh and en separately). A subspace with no preference
gets E‖P v‖² = (k/d)‖v‖², hence the chance level R₀ = √(k / (d − k)); the seeded random
basis of the same size gives the empirical control. R(j)/R₀ > 1: block j writes more into
Z than a random k-dimensional subspace would receive.
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

from layerscope.experiments.registry import Experiment, Figure, Job, Result
from layerscope.data.paired_states import POOLING, PairedStates
from layerscope.experiments.z_subspace.z_mask import ZMask

log = logging.getLogger(__name__)

LANGS = ("zh", "en")


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


@dataclass
class DecompositionResult:
    metrics: pd.DataFrame
    summary: dict
    curves: dict  # (layer, k) -> {"zh": R, "en": R, "random_zh": …, "random_en": …, "chance": R0}


def update_decomposition(states: PairedStates, mask: ZMask, *, model: str, prompt_set: str) -> DecompositionResult:
    cache = states.cache
    mask.check_fits(cache.n_layers, cache.d_model, f"the activation cache {cache.directory}")
    d, n_layers = mask.d_model, cache.n_layers
    pooled_zh, pooled_en = states.pooled_all_layers()
    updates = {"zh": pooled_zh[1:] - pooled_zh[:-1], "en": pooled_en[1:] - pooled_en[:-1]}  # [L, N, d]
    records, curves, combos = [], {}, []
    skipped = [f"L{layer}/k{k}" for layer, k in mask.combos() if k >= d]
    if skipped:
        log.warning("update_decomposition: R is undefined when Z is the whole space (k = d); skipping %s", skipped)
    for layer, k in mask.combos():
        if k >= d:
            continue
        z = mask.basis(layer, k).to(torch.float64)
        rand = mask.random(layer, k).to(torch.float64)
        r0 = chance_ratio(k, d)
        curve = {"chance": r0}
        for lang in LANGS:
            curve[lang] = ratio_curve(updates[lang], z)
            curve[f"random_{lang}"] = ratio_curve(updates[lang], rand)
        curves[(layer, k)] = curve
        for j in range(n_layers):
            for lang in LANGS:
                records += [
                    (layer, k, j, lang, "ratio", float(curve[lang][j])),
                    (layer, k, j, lang, "ratio_over_chance", float(curve[lang][j] / r0)),
                    (layer, k, j, lang, "random_ratio", float(curve[f"random_{lang}"][j])),
                ]
        mean_curve = (curve["zh"] + curve["en"]) / 2
        peak = int(np.argmax(mean_curve))
        low = int(np.argmin(mean_curve))
        log_gap = np.abs(np.log(curve["zh"] / curve["en"]))
        combos.append({
            "layer": layer, "k": k, "chance_ratio": r0,
            "peak_transition": peak, "peak_ratio_over_chance": float(mean_curve[peak] / r0),
            "lowest_transition": low, "lowest_ratio_over_chance": float(mean_curve[low] / r0),
            "mean_ratio_over_chance": float(mean_curve.mean() / r0),
            "random_mean_ratio_over_chance": float(((curve["random_zh"] + curve["random_en"]) / 2).mean() / r0),
            "n_transitions_z_dominated": int((mean_curve > 1).sum()),
            "largest_zh_en_gap_transition": int(np.argmax(log_gap)),
            "largest_zh_en_log_gap": float(log_gap.max()),
        })
    frame = pd.DataFrame(records, columns=["mask_layer", "k", "transition", "lang", "metric", "value"])
    frame.insert(0, "prompt_set", prompt_set)
    frame.insert(0, "model", model)
    pick = lambda key: [c[key] for c in combos]  # noqa: E731
    summary = {
        "model": model,
        "prompt_set": prompt_set,
        "n_pairs": states.n_pairs,
        "pooling": POOLING,
        "definition": "R(j) = mean_i |P_Z dh_j,i| / mean_i |P_Zperp dh_j,i|, dh_j = pooled resid.(j+1) - resid.j",
        "n_layers": n_layers,
        "d_model": d,
        "combos": [f"L{c['layer']}/k{c['k']}" for c in combos],
        "skipped_combos": skipped,
        "peak_transition": pick("peak_transition"),
        "peak_ratio_over_chance": pick("peak_ratio_over_chance"),
        "mean_ratio_over_chance": pick("mean_ratio_over_chance"),
        "random_mean_ratio_over_chance": pick("random_mean_ratio_over_chance"),
        "n_transitions_z_dominated": pick("n_transitions_z_dominated"),
        "largest_zh_en_gap_transition": pick("largest_zh_en_gap_transition"),
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
                ax.plot(x, c["zh"], color=PALETTE[i], marker="o", markersize=2.5, label=f"k={k} zh")
                ax.plot(x, c["en"], color=PALETTE[i], linestyle="--", label=f"k={k} en")
                ax.plot(x, (c["random_zh"] + c["random_en"]) / 2, color=PALETTE[i], linestyle=":", linewidth=0.9,
                        label=f"k={k} random basis")
                ax.axhline(c["chance"], color=PALETTE[i], linewidth=0.6, alpha=0.6)
            ax.axvline(layer - 0.5, color="0.3", linestyle="--", linewidth=0.8)
            ax.set_yscale("log")
            ax.set_ylabel("R = |P_Z Δh| / |P_Z⊥ Δh|")
            ax.set_title(f"Z of layer {layer} (dashed vertical: resid.{layer}); thin lines: chance √(k/(d−k))")
            layer_axis(ax, n_layers - 1, label="block j (update resid.j → resid.j+1)")
            ax.legend(loc="best", ncol=len(ks))
        fig.suptitle(f"update decomposition — {s['model']} on {s['prompt_set']} ({s['n_pairs']} pairs)")
        save(fig, path)


def run(job: Job) -> Result:
    """Every block's pooled update split into Z and Z⊥, from the activation cache (CPU)."""
    states = PairedStates.open(Path(job.input("resid")).parent, job.input("prompts"))
    result = update_decomposition(states, ZMask.load(job.input("mask")), model=job.model, prompt_set=job.prompt_set)
    return Result(
        summary=result.summary,
        tables={"metrics": result.metrics},
        figures={"ratios": partial(plot_ratios, result)},
    )


EXPERIMENT = Experiment(
    name="update_decomposition",
    family="z_subspace",
    description="block updates split into Z and Z⊥",
    description_long="z_subspace: R(j) = |P_Z dh_j| / |P_Zperp dh_j| of every block's mean-pooled update, zh and en "
                     "separately, against the random-subspace expectation.",
    needs="decoder",
    data="paired",
    gpu=False,
    inputs=("mask", "resid", "tokens", "prompts"),
    run=run,
    tables=("metrics",),
    figures=(Figure("ratios", "R per block"),),
    params={},
    threads=1,
    runtime=30,
    section="z_subspace",
)
