"""Layer repeat: which blocks tolerate being applied again, beside the cost of skipping them.

Every variant is a sequence of the model's own blocks run through the surgery engine:

* **repeat** — block i applied r times in place, ``[0, …, i, i, …, i, i+1, …]`` (:func:`repeat`),
  for r = 2 … ``max_repeats``;
* **skip** — block i left out (:func:`layerscope.engines.surgery.skip`), computed in the same
  sweep on the same prompts, so the comparison with knockout needs no other job;
* **pair repeat** — blocks i and i+1 applied, then applied again, ``[0, …, i+1, i, i+1, i+2, …]``
  (:func:`repeat_pair`), for every contiguous pair (``pairs``).

Each loss is the mean next-token loss on the completion tokens, as a ratio to the
unmodified model's. A repeat of block i starts from the cached ``resid.{i+1}`` (its head is
the original model's), the r = 2 … R repeats of one block share their common head
``[0 … i, i]`` within the sweep, a skip starts from ``resid.i`` and a pair repeat from
``resid.{i+2}``. The sweep costs about (R + 1)·L²/2 block calls on the sample's tokens;
re-running every variant from the embeddings would cost about (R + 1)·L².

Derived per block: the *iteration cost*, the geometric mean over r of ratio(i, r) (ratios
multiply; with R = 2 it is the r = 2 ratio); a block *tolerates iteration* when the upper end
of the interval of ratio(i, r) is at most ``tolerance_ratio`` for every r. Across blocks:
Spearman's rank correlation of the iteration cost with the skip ratio (do the blocks that
can be skipped also bear repeating?), and per r.

Uncertainty: a bootstrap over the prompts (per-prompt loss sums and token counts of every
variant, resampled together; each ratio, cost, Spearman and argmin recomputed on the
resample). No forward pass is added for it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from layerscope import LayerscopeError
from layerscope.engines.statistics import N_BOOT, Bootstrap, weighted_mean
from layerscope.engines.surgery import SURGERY_PARAMS, LossEvaluator, skip, surgery_evaluator
from layerscope.experiments.registry import Experiment, Figure, Job, Result
from layerscope.experiments.surgery.common import (
    MAX_PROMPTS_PARAM,
    interval,
    loss_ratios,
    prompt_sums,
    sample_fragment,
)

log = logging.getLogger(__name__)


def repeat(n_layers: int, block: int, times: int) -> list[int]:
    """The identity sequence with ``block`` applied ``times`` times in place (0: skipped, 1: identity)."""
    if not 0 <= block < n_layers or times < 0:
        raise ValueError(f"repeat: block {block} of {n_layers}, {times} times")
    return list(range(block)) + [block] * int(times) + list(range(block + 1, n_layers))


def repeat_pair(n_layers: int, block: int) -> list[int]:
    """The identity sequence with the contiguous pair (block, block+1) applied twice: … block, block+1, block, block+1 …"""
    if not 0 <= block < n_layers - 1:
        raise ValueError(f"repeat_pair: no pair ({block}, {block + 1}) among {n_layers} blocks")
    return list(range(block + 2)) + [block, block + 1] + list(range(block + 2, n_layers))


def pair_label(block: int) -> str:
    return f"{block},{block + 1}"


def layer_repeat_sweep(evaluator: LossEvaluator, *, repeats: Sequence[int] = (2, 3), pairs: bool = True) -> dict:
    """Losses of the baseline, every skip, every repeat (block i, r ∈ ``repeats``) and every pair repeat.

    Pooled losses: ``baseline`` (float), ``skip`` [L], ``repeat`` [len(repeats), L], ``pair`` [L−1]
    (empty without ``pairs``). ``per_prompt`` holds what the bootstrap resamples: per-prompt loss
    sums of the baseline [P], skips [P, L], repeats [P, len(repeats), L], pairs [P, L−1], and the
    token counts [P]. Identical sequences (r = 1 is the identity) are evaluated once.
    """
    n = evaluator.n_layers
    repeats = [int(r) for r in repeats]
    if n < 2:
        raise LayerscopeError("layer_repeat needs a model with at least 2 blocks")
    if not repeats or min(repeats) < 1:
        raise LayerscopeError(f"layer_repeat: repeat counts must be ≥ 1 (got {repeats})")
    groups = {
        "skip": [list(range(n))] + [skip(n, i) for i in range(n)],
        "repeat": [repeat(n, i, r) for r in repeats for i in range(n)],
        "pair": [repeat_pair(n, i) for i in range(n - 1)] if pairs else [],
    }
    found: dict[tuple[int, ...], np.ndarray] = {}
    for name, sequences in groups.items():
        todo = list(dict.fromkeys(tuple(s) for s in sequences if tuple(s) not in found))
        if not todo:
            continue
        started, calls = time.perf_counter(), evaluator.blocks_run
        found.update(zip(todo, evaluator.losses(todo, per_token=True)))
        log.info("layer_repeat: %d %s variants in %.1fs (%d block calls)", len(todo), name,
                 time.perf_counter() - started, evaluator.blocks_run - calls)
    tokens = {name: [found[tuple(s)] for s in sequences] for name, sequences in groups.items()}
    base_tokens, skip_tokens = tokens["skip"][0], tokens["skip"][1:]
    baseline = float(base_tokens.mean())
    loss = {name: np.array([float(x.mean()) for x in values]) for name, values in tokens.items()}
    base_sums, counts = prompt_sums(evaluator, [base_tokens])
    skip_sums, _ = prompt_sums(evaluator, skip_tokens)
    repeat_sums, _ = prompt_sums(evaluator, tokens["repeat"])
    pair_sums, _ = prompt_sums(evaluator, tokens["pair"])
    return {
        "baseline": baseline,
        "skip": loss["skip"][1:],
        "repeat": loss["repeat"].reshape(len(repeats), n),
        "pair": loss["pair"],
        "repeats": repeats,
        "per_prompt": {"baseline": base_sums[:, 0], "skip": skip_sums,
                       "repeat": repeat_sums.reshape(len(counts), len(repeats), n), "pair": pair_sums,
                       "counts": counts},
    }


# ---------------------------------------------------------------------------- statistics


def iteration_cost(ratio: np.ndarray) -> np.ndarray:
    """Geometric mean over the repeat counts (axis −2) of the loss ratios [..., R, L] -> [..., L]."""
    return np.exp(np.log(np.maximum(np.asarray(ratio, dtype=float), 1e-300)).mean(axis=-2))


def spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's rank correlation of x and y along the last axis, row by row (average ranks for ties,
    as ``scipy.stats.spearmanr``); NaN for a row whose ranks do not vary."""
    rx = stats.rankdata(np.asarray(x, dtype=float), axis=-1)
    ry = stats.rankdata(np.asarray(y, dtype=float), axis=-1)
    rx = rx - rx.mean(axis=-1, keepdims=True)
    ry = ry - ry.mean(axis=-1, keepdims=True)
    denom = np.sqrt((rx * rx).sum(-1) * (ry * ry).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (rx * ry).sum(-1) / np.where(denom > 0, denom, 1.0), np.nan)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """scipy's Spearman of two per-block arrays (NaN when either is constant)."""
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(stats.spearmanr(a, b).statistic)


def _pairs_of(cis) -> list:
    return [[float(lo), float(hi)] for lo, hi in cis]


# ---------------------------------------------------------------------------- the experiment


@dataclass
class LayerRepeatResult:
    metrics: pd.DataFrame  # tidy: model, prompt_set, layer, metric, repeats, value, lo, hi
    summary: dict
    ratio_ci: list  # [R][L] pairs, for the figures
    pair_ci: list
    skip_ci: list


def layer_repeat(evaluator: LossEvaluator, *, model: str, prompt_set: str, max_repeats: int = 3, pairs: bool = True,
                 tolerance_ratio: float = 1.05, seed: int = 0, n_boot: int = N_BOOT) -> LayerRepeatResult:
    """The sweep, its summary with bootstrap intervals over the prompts, and its table."""
    if max_repeats < 2:
        raise LayerscopeError(f"layer_repeat: max_repeats must be ≥ 2 (got {max_repeats})")
    repeats = list(range(2, int(max_repeats) + 1))
    sweep = layer_repeat_sweep(evaluator, repeats=repeats, pairs=pairs)
    n = evaluator.n_layers
    baseline = sweep["baseline"]
    ratio = sweep["repeat"] / baseline  # [R, L]
    skip_ratio = sweep["skip"] / baseline  # [L]
    pair_ratio = sweep["pair"] / baseline  # [L-1] or []
    cost = iteration_cost(ratio)
    pp = sweep["per_prompt"]
    b, s, q, w, c = pp["baseline"], pp["skip"], pp["repeat"], pp["pair"], pp["counts"]
    boot = Bootstrap(len(c), unit="prompt", n_boot=n_boot, seed=seed)

    def cost_stat(q, b):
        return iteration_cost(loss_ratios(q, b))

    def correlation(q, s, b):
        return spearman_rows(cost_stat(q, b), loss_ratios(s, b))

    baseline_ci = interval(boot, baseline, b, c, statistic=weighted_mean)
    ratio_ci = interval(boot, ratio, q, b, statistic=loss_ratios)
    skip_ci = interval(boot, skip_ratio, s, b, statistic=loss_ratios)
    cost_ci = interval(boot, cost, q, b, statistic=cost_stat)
    loss_ci = interval(boot, sweep["repeat"], q, c, statistic=lambda q, c: q.sum(1) / c.sum(1)[:, None, None])
    skip_loss_ci = interval(boot, sweep["skip"], s, c, statistic=lambda s, c: s.sum(1) / c.sum(1)[:, None])

    # which blocks bear iteration: the interval's upper end at or below the threshold, at every r
    upper = np.array([[hi for _, hi in row] for row in ratio_ci])  # [R, L]
    tolerant_by_r = [[int(i) for i in np.flatnonzero(upper[k] <= tolerance_ratio)] for k in range(len(repeats))]
    tolerant = [int(i) for i in np.flatnonzero((upper <= tolerance_ratio).all(axis=0))]
    tolerant_point = [int(i) for i in np.flatnonzero((ratio <= tolerance_ratio).all(axis=0))]

    most, least = int(np.argmin(cost)), int(np.argmax(cost))
    _, most_stability = boot.stability(q, b, statistic=cost_stat, pick=lambda v: int(np.argmin(v)))
    _, least_stability = boot.stability(q, b, statistic=cost_stat, pick=lambda v: int(np.argmax(v)))
    boot.check_stability("most_tolerant_layer", most_stability)
    boot.check_stability("least_tolerant_layer", least_stability)

    rho = _spearman(cost, skip_ratio)
    rho_ci = interval(boot, rho, q, s, b, statistic=correlation) if np.isfinite(rho) else None
    rho_by_r = [_spearman(ratio[k], skip_ratio) for k in range(len(repeats))]
    rho_by_r_ci = [interval(boot, value, q, s, b, statistic=lambda q, s, b, k=k: spearman_rows(
        loss_ratios(q, b)[:, k], loss_ratios(s, b))) if np.isfinite(value) else [None, None]
        for k, value in enumerate(rho_by_r)]
    if rho_ci is not None and rho_ci[0] <= 0 <= rho_ci[1]:
        boot.flag("the interval of repeat_vs_skip_spearman contains 0")

    # repeating once (r = 2) against skipping, block by block
    cheaper = ratio[0] < skip_ratio
    cheaper_ci = interval(boot, float(cheaper.mean()), q, s, b,
                          statistic=lambda q, s, b: (loss_ratios(q, b)[:, 0] < loss_ratios(s, b)).mean(axis=1))

    records = []
    for k, r in enumerate(repeats):
        records += [(i, "ratio", r, float(ratio[k, i]), *ratio_ci[k][i]) for i in range(n)]
        records += [(i, "loss", r, float(sweep["repeat"][k, i]), *loss_ci[k][i]) for i in range(n)]
    records += [(i, "skip_ratio", 0, float(skip_ratio[i]), *skip_ci[i]) for i in range(n)]
    records += [(i, "skip_loss", 0, float(sweep["skip"][i]), *skip_loss_ci[i]) for i in range(n)]
    records += [(i, "iteration_cost", pd.NA, float(cost[i]), *cost_ci[i]) for i in range(n)]

    pair_summary: dict = {"pairs": bool(pairs)}
    pair_ci: list = []
    if pairs:
        pair_ci = interval(boot, pair_ratio, w, b, statistic=loss_ratios)
        pair_loss_ci = interval(boot, sweep["pair"], w, c, statistic=lambda w, c: w.sum(1) / c.sum(1)[:, None])
        records += [(i, "pair_ratio", 2, float(pair_ratio[i]), *pair_ci[i]) for i in range(n - 1)]
        records += [(i, "pair_loss", 2, float(sweep["pair"][i]), *pair_loss_ci[i]) for i in range(n - 1)]
        best = int(np.argmin(pair_ratio))
        _, best_stability = boot.stability(w, b, statistic=loss_ratios, pick=lambda v: int(np.argmin(v)))
        boot.check_stability("most_tolerant_pair", best_stability)
        pair_upper = np.array([hi for _, hi in pair_ci])
        pair_summary.update({
            "pair_ratio_by_layer": [float(v) for v in pair_ratio],
            "pair_ratio_by_layer_ci": _pairs_of(pair_ci),
            "most_tolerant_pair": [best, best + 1],
            "most_tolerant_pair_ratio": float(pair_ratio[best]),
            "most_tolerant_pair_ratio_ci": pair_ci[best],
            "most_tolerant_pair_stability": float(best_stability),
            "tolerant_pairs": [pair_label(int(i)) for i in np.flatnonzero(pair_upper <= tolerance_ratio)],
        })
    metrics = pd.DataFrame(records, columns=["layer", "metric", "repeats", "value", "lo", "hi"])
    metrics["repeats"] = metrics["repeats"].astype("Int64")
    metrics.insert(0, "prompt_set", prompt_set)
    metrics.insert(0, "model", model)

    summary = {
        "model": model,
        "prompt_set": prompt_set,
        "n_layers": n,
        **evaluator.provenance(),
        **sample_fragment(evaluator),
        "baseline_loss": float(baseline),
        "baseline_loss_ci": baseline_ci,
        "max_repeats": int(max_repeats),
        "repeats": repeats,
        "ratio_by_layer": [[float(v) for v in row] for row in ratio],
        "ratio_by_layer_ci": [_pairs_of(row) for row in ratio_ci],
        "skip_ratio_by_layer": [float(v) for v in skip_ratio],
        "skip_ratio_by_layer_ci": _pairs_of(skip_ci),
        "iteration_cost_by_layer": [float(v) for v in cost],
        "iteration_cost_by_layer_ci": _pairs_of(cost_ci),
        "most_tolerant_layer": most,
        "most_tolerant_layer_stability": float(most_stability),
        "min_iteration_cost": float(cost[most]),
        "min_iteration_cost_ci": interval(boot, cost.min(), q, b, statistic=lambda q, b: cost_stat(q, b).min(axis=1)),
        "least_tolerant_layer": least,
        "least_tolerant_layer_stability": float(least_stability),
        "max_iteration_cost": float(cost[least]),
        "max_iteration_cost_ci": interval(boot, cost.max(), q, b, statistic=lambda q, b: cost_stat(q, b).max(axis=1)),
        "tolerance_ratio": float(tolerance_ratio),
        "tolerant_layers": tolerant,
        "n_tolerant": len(tolerant),
        "tolerant_layers_by_r": tolerant_by_r,
        "tolerant_layers_point": tolerant_point,
        "repeat_vs_skip_spearman": rho if np.isfinite(rho) else None,
        "repeat_vs_skip_spearman_ci": rho_ci,
        "repeat_vs_skip_spearman_by_r": [v if np.isfinite(v) else None for v in rho_by_r],
        "repeat_vs_skip_spearman_by_r_ci": rho_by_r_ci,
        "repeat_cheaper_than_skip_fraction": float(cheaper.mean()),
        "repeat_cheaper_than_skip_fraction_ci": cheaper_ci,
        "repeat_cheaper_than_skip_layers": [int(i) for i in np.flatnonzero(cheaper)],
        **pair_summary,
        **boot.summary(),
    }
    return LayerRepeatResult(metrics, summary, ratio_ci, pair_ci, skip_ci)


# ---------------------------------------------------------------------------- outputs


def _band(ax, x, values, cis, color, label, **style):
    lo = np.array([c[0] for c in cis], dtype=float)
    hi = np.array([c[1] for c in cis], dtype=float)
    ax.fill_between(x, lo, hi, color=color, alpha=0.18, linewidth=0)
    ax.plot(x, values, color=color, marker=".", label=label, **style)


def plot_ratio(result: LayerRepeatResult, path: str | Path) -> None:
    """Top: ratio per block for each r, and the skip ratio, with bands; bottom: pair repeats."""
    from layerscope.report.plotting import PALETTE, figure, save

    s = result.summary
    n = s["n_layers"]
    x = np.arange(n)
    with figure(2, 1, width=7.2, height=6.0) as (fig, axes):
        top, bottom = axes
        _band(top, x, s["skip_ratio_by_layer"], result.skip_ci, "0.35", "skipped (knockout)", linestyle="--")
        for k, r in enumerate(s["repeats"]):
            _band(top, x, s["ratio_by_layer"][k], result.ratio_ci[k], PALETTE[k % len(PALETTE)], f"applied {r}×")
        for i in s["tolerant_layers"]:
            top.axvspan(i - 0.5, i + 0.5, color="tab:green", alpha=0.12, linewidth=0)
        for ax in axes:
            ax.axhline(1.0, color="0.3", linewidth=0.8)
            ax.axhline(s["tolerance_ratio"], color="0.5", linestyle=":", linewidth=0.8)
            ax.set_yscale("log")
            ax.set_ylabel("loss ratio (variant / baseline)")
            ax.set_xticks(range(0, n, max(1, round(n / 15))))
        top.set_xlabel("block (green: tolerates iteration at every r)")
        top.legend(loc="upper right", ncol=2)
        lo, hi = s["baseline_loss_ci"]
        rho = s["repeat_vs_skip_spearman"]
        rho_text = "n/a" if rho is None else (f"{rho:.2f} [{s['repeat_vs_skip_spearman_ci'][0]:.2f}, "
                                              f"{s['repeat_vs_skip_spearman_ci'][1]:.2f}]")
        top.set_title(f"layer repeat — {s['model']} on {s['prompt_set']}: baseline {s['baseline_loss']:.3f} "
                      f"[{lo:.3f}, {hi:.3f}] nats, {s['n_prompts']} prompts, {s['n_tokens']} tokens\n"
                      f"most tolerant block {s['most_tolerant_layer']} (in {s['most_tolerant_layer_stability']:.0%} "
                      f"of resamples); Spearman(iteration cost, skip ratio) {rho_text}; bands: 95% intervals",
                      fontsize=8)
        if s["pairs"]:
            xp = np.arange(n - 1) + 0.5
            _band(bottom, xp, s["pair_ratio_by_layer"], result.pair_ci, "tab:purple", "pair (i, i+1) applied twice")
            bottom.plot(x, s["ratio_by_layer"][0], color=PALETTE[0], linewidth=0.8, alpha=0.6,
                        label="single block applied 2×")
            bottom.legend(loc="upper right")
            bottom.set_xlabel("pair (i, i+1), drawn between its blocks")
        else:
            bottom.text(0.5, 0.5, "pair repeats not run (pairs: false)", ha="center", va="center",
                        transform=bottom.transAxes)
            bottom.set_xlabel("block")
        save(fig, path)


def plot_scatter(result: LayerRepeatResult, path: str | Path) -> None:
    """Iteration cost against skip ratio, one labelled point per block, with both intervals."""
    from layerscope.report.plotting import figure, save

    s = result.summary
    skip_ratio = np.array(s["skip_ratio_by_layer"])
    cost = np.array(s["iteration_cost_by_layer"])
    xerr = np.vstack([skip_ratio - [c[0] for c in s["skip_ratio_by_layer_ci"]],
                      [c[1] for c in s["skip_ratio_by_layer_ci"]] - skip_ratio]).clip(min=0)
    yerr = np.vstack([cost - [c[0] for c in s["iteration_cost_by_layer_ci"]],
                      [c[1] for c in s["iteration_cost_by_layer_ci"]] - cost]).clip(min=0)
    with figure(width=5.6, height=5.0) as (fig, ax):
        depth = np.arange(len(cost))
        ax.errorbar(skip_ratio, cost, xerr=xerr, yerr=yerr, fmt="none", ecolor="0.6", elinewidth=0.7, zorder=1)
        points = ax.scatter(skip_ratio, cost, c=depth, cmap="viridis", s=22, zorder=2)
        for i, (a, v) in enumerate(zip(skip_ratio, cost)):
            ax.annotate(str(i), (a, v), textcoords="offset points", xytext=(3, 3), fontsize=6)
        fig.colorbar(points, ax=ax, label="block")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.axhline(s["tolerance_ratio"], color="0.5", linestyle=":", linewidth=0.8)
        ax.set_xlabel("loss ratio with the block skipped")
        ax.set_ylabel(f"iteration cost (geometric mean ratio, r = {s['repeats'][0]}…{s['repeats'][-1]})")
        rho = s["repeat_vs_skip_spearman"]
        if rho is not None:
            lo, hi = s["repeat_vs_skip_spearman_ci"]
            ax.set_title(f"repeat vs skip — Spearman {rho:.2f} [{lo:.2f}, {hi:.2f}] over {s['n_layers']} blocks\n"
                         f"(interval: 95% bootstrap over {s['n_prompts']} prompts)", fontsize=8)
        save(fig, path)


def run(job: Job) -> Result:
    """Every block repeated r = 2 … R times, skipped, and every contiguous pair repeated (runs model blocks)."""
    params = job.params
    evaluator = surgery_evaluator(job.input("model"), job.input("resid"), params=params, device=job.device)
    result = layer_repeat(evaluator, model=job.model, prompt_set=job.prompt_set, max_repeats=params["max_repeats"],
                          pairs=params["pairs"], tolerance_ratio=params["tolerance_ratio"], seed=params["seed"])
    return Result(
        summary=result.summary,
        tables={"metrics": result.metrics},
        figures={"ratio": partial(plot_ratio, result), "scatter": partial(plot_scatter, result)},
    )


EXPERIMENT = Experiment(
    name="layer_repeat",
    headlines=("baseline_loss", "ratio_by_layer", "skip_ratio_by_layer", "iteration_cost_by_layer",
               "repeat_vs_skip_spearman"),
    family="surgery",
    description="loss with each block applied 2…R times (and each adjacent pair twice), beside skipping it",
    description_long="Each block applied r = 2…R times in place and each contiguous pair repeated once, as a loss "
                     "ratio to the baseline beside the block's knockout ratio: which blocks tolerate iteration, and "
                     "whether they are the ones that can be skipped; bootstrap intervals over the prompts.",
    needs="decoder",
    data="prompts",
    gpu=True,
    inputs=("model", "resid", "tokens"),
    run=run,
    tables=("metrics",),
    figures=(Figure("ratio", "loss ratio per repeated block and pair, beside skipping it"),
             Figure("scatter", "iteration cost against skip ratio")),
    params={
        "max_prompts": MAX_PROMPTS_PARAM,
        **SURGERY_PARAMS,
        "max_repeats": {
            "description": "Each block is applied r = 2 … max_repeats times in place (L variants per r).",
            "type": "integer",
            "minimum": 2,
            "default": 3
        },
        "pairs": {
            "description": "Also repeat every contiguous pair (i, i+1) once: … i, i+1, i, i+1 … (L−1 variants).",
            "type": "boolean",
            "default": True
        },
        "tolerance_ratio": {
            "description": "A block tolerates iteration when the upper end of the bootstrap interval of its loss "
                           "ratio (repeated / baseline) is at most this, at every r.",
            "type": "number",
            "exclusiveMinimum": 0,
            "default": 1.05
        },
    },
    threads=2,
    runtime=60,
)
