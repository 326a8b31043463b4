"""Z separation: how paired Chinese and English problems sit in Z, in Z⊥ and in a random subspace.

For every Z-mask (layer ℓ, k) and the mean-pooled problem-text states at ``resid.ℓ``
(zh_i, en_i for pair i; see :mod:`layerscope.data.paired_states`), in each subspace S ∈ {Z, Z⊥,
random (same k), full space}:

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
from layerscope.experiments.registry import Experiment, Figure, Job, Result
from layerscope.data.paired_states import POOLING, PairedStates
from layerscope.experiments.z_subspace.z_mask import ZMask

log = logging.getLogger(__name__)

SUBSPACES = ("z", "z_perp", "random", "full")
SUBSPACE_LABELS = {"z": "Z", "z_perp": "Z⊥", "random": "random", "full": "full space"}


def project(x: torch.Tensor, basis: torch.Tensor | None, which: str) -> torch.Tensor:
    """Rows of x projected onto the subspace: 'in' = P x, 'out' = (I − P) x, basis None = identity."""
    if basis is None:
        return x
    inside = (x @ basis.T) @ basis
    return inside if which == "in" else x - inside


def subspace_projection(x: torch.Tensor, subspace: str, z: torch.Tensor, rand: torch.Tensor) -> torch.Tensor:
    if subspace == "z":
        return project(x, z, "in")
    if subspace == "z_perp":
        return project(x, z, "out")
    if subspace == "random":
        return project(x, rand, "in")
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


def energy_share(x: torch.Tensor, projected: torch.Tensor) -> float:
    total = float((x**2).sum())
    return float((projected**2).sum()) / total if total > 0 else float("nan")


def chance_share(subspace: str, k: int, d: int) -> float:
    return {"z": k / d, "random": k / d, "z_perp": (d - k) / d, "full": 1.0}[subspace]


@dataclass
class SeparationResult:
    metrics: pd.DataFrame
    summary: dict


def z_separation(states: PairedStates, mask: ZMask, *, model: str, prompt_set: str) -> SeparationResult:
    cache = states.cache
    mask.check_fits(cache.n_layers, cache.d_model, f"the activation cache {cache.directory}")
    d = mask.d_model
    records, combos = [], []
    for layer in mask.layers:
        zh, en = states.pooled(layer)
        delta = zh - en
        offset = delta.mean(dim=0, keepdim=True)
        both = torch.cat([zh, en])
        centred = both - both.mean(dim=0, keepdim=True)
        for k in mask.ks:
            z = mask.basis(layer, k).to(torch.float64)
            rand = mask.random(layer, k).to(torch.float64)
            row = {"layer": layer, "k": k, "chance": k / d}
            for sub in SUBSPACES:
                proj = lambda x: subspace_projection(x, sub, z, rand)  # noqa: E731
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
                    records.append((layer, k, sub, metric, value))
                    row[f"{metric}_{sub}"] = value
            combos.append(row)
    frame = pd.DataFrame(records, columns=["layer", "k", "subspace", "metric", "value"])
    frame.insert(0, "prompt_set", prompt_set)
    frame.insert(0, "model", model)
    labels = [f"L{c['layer']}/k{c['k']}" for c in combos]
    pick = lambda key: [c[key] for c in combos]  # noqa: E731
    summary = {
        "model": model,
        "prompt_set": prompt_set,
        "n_pairs": states.n_pairs,
        "pooling": POOLING,
        "layers": mask.layers,
        "k": mask.ks,
        "d_model": d,
        "combos": labels,
        "separation_ratio_z": pick("separation_ratio_z"),
        "separation_ratio_z_perp": pick("separation_ratio_z_perp"),
        "separation_ratio_random": pick("separation_ratio_random"),
        "separation_ratio_full": pick("separation_ratio_full"),
        "language_energy_z_over_chance": pick("language_energy_over_chance_z"),
        "language_energy_random_over_chance": pick("language_energy_over_chance_random"),
        "n_combos_z_separates_better": int(sum(c["separation_ratio_z"] < c["separation_ratio_z_perp"] for c in combos)),
        "n_combos_language_energy_z_below_chance": int(sum(c["language_energy_over_chance_z"] < 1 for c in combos)),
        "by_combo": combos,
    }
    return SeparationResult(frame, summary)


def plot_separation(result: SeparationResult, path: str | Path) -> None:
    from layerscope.report.plotting import PALETTE, figure, save

    s = result.summary
    combos = s["by_combo"]
    labels = s["combos"]
    x = np.arange(len(combos))
    width = 0.2
    with figure(1, 2, width=10.0, height=3.8) as (fig, axes):
        for i, sub in enumerate(SUBSPACES):
            axes[0].bar(x + (i - 1.5) * width, [c[f"separation_ratio_{sub}"] for c in combos], width,
                        color=PALETTE[i], label=SUBSPACE_LABELS[sub])
        axes[0].axhline(1.0, color="0.4", linewidth=0.8)
        axes[0].set_ylabel("translation distance / other-problem distance")
        axes[0].set_title("separation ratio (lower: grouped by problem)")
        axes[0].legend(loc="lower right", ncol=2)
        for i, sub in enumerate(("z", "z_perp", "random")):
            axes[1].bar(x + (i - 1) * width, [c[f"language_energy_over_chance_{sub}"] for c in combos], width,
                        color=PALETTE[i], label=SUBSPACE_LABELS[sub])
        axes[1].axhline(1.0, color="0.4", linestyle="--", linewidth=0.8, label="chance (k/d, (d−k)/d)")
        axes[1].set_ylabel("share of zh−en difference / chance")
        axes[1].set_title("language energy relative to chance")
        axes[1].legend(loc="best")
        for ax in axes:
            ax.set_xticks(x, labels, rotation=30 if len(labels) > 4 else 0)
            ax.set_xlabel("Z-mask layer / k")
        fig.suptitle(f"zh/en separation in Z — {s['model']} on {s['prompt_set']} ({s['n_pairs']} pairs, "
                     "mean-pooled problem-text states)")
        save(fig, path)


def run(job: Job) -> Result:
    """zh/en separation in Z, Z⊥ and a random subspace, from the activation cache (CPU)."""
    states = PairedStates.open(Path(job.input("resid")).parent, job.input("prompts"))
    result = z_separation(states, ZMask.load(job.input("mask")), model=job.model, prompt_set=job.prompt_set)
    return Result(
        summary=result.summary,
        tables={"metrics": result.metrics},
        figures={"separation": partial(plot_separation, result)},
    )


EXPERIMENT = Experiment(
    name="z_separation",
    family="z_subspace",
    description="zh/en separation and energy in Z, Z⊥, random",
    description_long="z_subspace: separation ratio and energy fractions of mean-pooled zh/en problem states in Z, "
                     "Z-perp and the random control, against the k/d chance level.",
    needs="decoder",
    data="paired",
    gpu=False,
    inputs=("mask", "resid", "tokens", "prompts"),
    run=run,
    tables=("metrics",),
    figures=(Figure("separation", "separation and energy"),),
    params={},
    threads=1,
    runtime=30,
    section="z_subspace",
)
