"""Knockout: which blocks matter, which matter together, and where the answer is carried.

* **Single knockouts** — the completion-token loss with block i skipped
  (:func:`layerscope.engines.surgery.skip`), as a ratio to the baseline loss, and Δ(i) = loss − baseline.
* **Pairwise knockouts** — among the ``pairwise_top`` blocks with the largest Δ, every pair
  skipped together; synergy(i, j) = Δ(i, j) − Δ(i) − Δ(j) (> 0: the pair hurts more than the
  two knockouts add up to). The pairs share their computation with each other through the
  evaluator's prefix sharing (``skip(i, j)`` for all j share ``[0…i-1, i+1…j-1]``).

All losses come from one :class:`~layerscope.engines.surgery.LossEvaluator` over a seeded,
category-stratified sample of ``max_prompts`` prompts of the activation cache. Every loss is
pooled over the completion tokens; its uncertainty is a bootstrap over the prompts (the
per-prompt loss sums and token counts of each variant, resampled together, so a ratio or a
synergy is computed on the same resample as its parts). No forward pass is added for it.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from layerscope import LayerscopeError
from layerscope.engines.statistics import N_BOOT, Bootstrap
from layerscope.engines.surgery import SURGERY_PARAMS, LossEvaluator, skip, surgery_evaluator
from layerscope.experiments.registry import Experiment, Figure, Job, Result
from layerscope.experiments.surgery.common import MAX_PROMPTS_PARAM, interval, loss_ratios, prompt_sums, sample_fragment

log = logging.getLogger(__name__)


@dataclass
class KnockoutResult:
    metrics: pd.DataFrame  # tidy per-layer: model, prompt_set, layer, metric, value, lo, hi
    pairs: pd.DataFrame  # layer_i, layer_j, loss, ratio, delta, synergy (+ _lo/_hi of ratio, delta, synergy)
    summary: dict


def pair_label(i: int, j: int) -> str:
    return f"{i}+{j}"


def knockout_sweep(evaluator: LossEvaluator, *, pairwise_top: int = 6, top_synergy: int = 5) -> dict:
    """Baseline, single and pairwise knockout losses (see module docstring).

    The plain numbers (``baseline``, ``single``, ``delta``, the ``pairs`` table) are the pooled
    losses; ``per_prompt`` holds what the bootstrap resamples: per-prompt loss sums of the
    baseline [P], of every single knockout [P, L] and of every pair [P, n_pairs], and the
    token counts [P].
    """
    n = evaluator.n_layers
    if n < 2:
        raise LayerscopeError("knockout needs a model with at least 2 blocks")
    base_tokens = evaluator.losses([list(range(n))], per_token=True)[0]
    single_tokens = evaluator.losses([skip(n, i) for i in range(n)], per_token=True,
                                     progress="knockout: single blocks")
    baseline = float(base_tokens.mean())
    single = np.array([float(x.mean()) for x in single_tokens])
    delta = single - baseline
    k = max(0, min(int(pairwise_top), n))
    top = sorted(np.argsort(-delta, kind="stable")[:k].tolist())
    pairs = list(itertools.combinations(top, 2))
    pair_tokens = (evaluator.losses([skip(n, i, j) for i, j in pairs], per_token=True, progress="knockout: pairs")
                   if pairs else [])
    pair_losses = [float(x.mean()) for x in pair_tokens]
    rows = []
    for (i, j), loss in zip(pairs, pair_losses):
        d_ij = loss - baseline
        rows.append((i, j, loss, loss / baseline, d_ij, d_ij - delta[i] - delta[j]))
    table = pd.DataFrame(rows, columns=["layer_i", "layer_j", "loss", "ratio", "delta", "synergy"])
    ranked = table.sort_values(["synergy", "layer_i", "layer_j"], ascending=[False, True, True]).head(top_synergy)
    base_sums, counts = prompt_sums(evaluator, [base_tokens])
    single_sums, _ = prompt_sums(evaluator, single_tokens)
    pair_sums, _ = prompt_sums(evaluator, pair_tokens)
    per_prompt = {"baseline": base_sums[:, 0], "single": single_sums, "pairs": pair_sums, "counts": counts}
    return {"baseline": baseline, "single": single, "delta": delta, "top": top, "pairs": table, "ranked": ranked,
            "per_prompt": per_prompt}


# bootstrap statistics on resampled per-prompt sums (arrays [n_boot, P, ...]); see knockout()
def _loss(b, c):
    return b.sum(1) / c.sum(1)


def _delta(s, b, c):
    return (s.sum(1) - b.sum(1)[:, None]) / c.sum(1)[:, None]


def _pair_statistics(q, s, b, c, pairs):
    """(ratio, delta, synergy) of every pair, each [n_boot, n_pairs]."""
    i, j = np.array([p[0] for p in pairs], dtype=int), np.array([p[1] for p in pairs], dtype=int)
    total_b, total_c = b.sum(1)[:, None], c.sum(1)[:, None]
    total_q, total_s = q.sum(1), s.sum(1)
    synergy = (total_q - total_s[:, i] - total_s[:, j] + total_b) / total_c
    return total_q / total_b, (total_q - total_b) / total_c, synergy


def knockout(evaluator: LossEvaluator, *, model: str, prompt_set: str, pairwise_top: int = 6, top_synergy: int = 5,
             seed: int = 0, n_boot: int = N_BOOT) -> KnockoutResult:
    """Knockout sweep, its summary with bootstrap intervals over the prompts, and its tables."""
    sweep = knockout_sweep(evaluator, pairwise_top=pairwise_top, top_synergy=top_synergy)
    baseline, single, delta = sweep["baseline"], sweep["single"], sweep["delta"]
    ratio = single / baseline
    n = evaluator.n_layers
    pp = sweep["per_prompt"]
    b, s, q, c = pp["baseline"], pp["single"], pp["pairs"], pp["counts"]
    boot = Bootstrap(len(c), unit="prompt", n_boot=n_boot, seed=seed)
    baseline_ci = interval(boot, baseline, b, c, statistic=_loss)
    loss_ci = interval(boot, single, s, c, statistic=lambda s, c: s.sum(1) / c.sum(1)[:, None])
    ratio_ci = interval(boot, ratio, s, b, statistic=loss_ratios)
    delta_ci = interval(boot, delta, s, b, c, statistic=_delta)
    most, least = int(np.argmax(ratio)), int(np.argmin(ratio))
    _, most_stability = boot.stability(s, b, statistic=loss_ratios, pick=lambda r: int(np.argmax(r)))
    _, least_stability = boot.stability(s, b, statistic=loss_ratios, pick=lambda r: int(np.argmin(r)))
    boot.check_stability("most_critical_layer", most_stability)
    boot.check_stability("least_critical_layer", least_stability)

    records = []
    for metric, values, cis in (("loss", single, loss_ci), ("ratio", ratio, ratio_ci), ("delta", delta, delta_ci)):
        records += [(layer, metric, float(v), lo, hi) for layer, (v, (lo, hi)) in enumerate(zip(values, cis))]
    metrics = pd.DataFrame(records, columns=["layer", "metric", "value", "lo", "hi"])
    metrics.insert(0, "prompt_set", prompt_set)
    metrics.insert(0, "model", model)

    table = sweep["pairs"].copy()
    pairs = list(zip(table["layer_i"].astype(int), table["layer_j"].astype(int)))
    synergy_summary: dict = {}
    if pairs:
        for k, name in enumerate(("ratio", "delta", "synergy")):
            cis = interval(boot, table[name].to_numpy(), q, s, b, c,
                           statistic=lambda q, s, b, c, k=k: _pair_statistics(q, s, b, c, pairs)[k])
            table[f"{name}_lo"] = [lo for lo, _ in cis]
            table[f"{name}_hi"] = [hi for _, hi in cis]
        best = int(np.argmax(table["synergy"].to_numpy()))
        _, top_pair_stability = boot.stability(q, s, b, c, statistic=lambda q, s, b, c: _pair_statistics(
            q, s, b, c, pairs)[2], pick=lambda v: int(np.argmax(v)))
        boot.check_stability("top synergy pair", top_pair_stability)
        ranked = table.loc[sweep["ranked"].index]
        synergy_summary = {
            "top_synergy_pair_stability": float(top_pair_stability),
            "top_synergy_pair": pair_label(*pairs[best]),
        }
    else:
        for name in ("ratio", "delta", "synergy"):
            table[f"{name}_lo"] = table[f"{name}_hi"] = pd.Series(dtype=float)
        ranked = table
    summary = {
        "model": model,
        "prompt_set": prompt_set,
        "n_layers": n,
        **evaluator.provenance(),
        **sample_fragment(evaluator),
        "baseline_loss": float(baseline),
        "baseline_loss_ci": baseline_ci,
        "ratio_by_layer": [float(r) for r in ratio],
        "ratio_by_layer_ci": ratio_ci,
        "delta_by_layer": [float(d) for d in delta],
        "delta_by_layer_ci": delta_ci,
        "most_critical_layer": most,
        "most_critical_layer_stability": float(most_stability),
        "max_ratio": float(ratio.max()),
        "max_ratio_ci": interval(boot, ratio.max(), s, b, statistic=lambda s, b: loss_ratios(s, b).max(axis=1)),
        "max_delta": float(delta.max()),
        "max_delta_ci": interval(boot, delta.max(), s, b, c, statistic=lambda s, b, c: _delta(s, b, c).max(axis=1)),
        "least_critical_layer": least,
        "least_critical_layer_stability": float(least_stability),
        "min_ratio": float(ratio.min()),
        "min_ratio_ci": interval(boot, ratio.min(), s, b, statistic=lambda s, b: loss_ratios(s, b).min(axis=1)),
        "pairwise_layers": [int(i) for i in sweep["top"]],
        "top_synergy_pairs": [pair_label(int(r.layer_i), int(r.layer_j)) for r in ranked.itertuples()],
        "top_synergy": [float(r.synergy) for r in ranked.itertuples()],
        "top_synergy_ci": [[r.synergy_lo, r.synergy_hi] for r in ranked.itertuples()],
        **synergy_summary,
        "synergy_pairs": [
            {"pair": [int(r.layer_i), int(r.layer_j)], "loss": float(r.loss), "ratio": float(r.ratio),
             "ratio_ci": [r.ratio_lo, r.ratio_hi], "delta": float(r.delta), "delta_ci": [r.delta_lo, r.delta_hi],
             "synergy": float(r.synergy), "synergy_ci": [r.synergy_lo, r.synergy_hi]} for r in ranked.itertuples()
        ],
        **boot.summary(),
    }
    return KnockoutResult(metrics, table, summary)


# ---------------------------------------------------------------------------- outputs


def _error_bars(values: np.ndarray, cis) -> np.ndarray:
    """[2, n] distances below and above each value (matplotlib's yerr)."""
    lo = np.array([c[0] for c in cis], dtype=float)
    hi = np.array([c[1] for c in cis], dtype=float)
    return np.vstack([np.maximum(values - lo, 0.0), np.maximum(hi - values, 0.0)])


def plot_ratio(result: KnockoutResult, path: str | Path) -> None:
    """Two panels: the loss ratio (log scale) and Δ in nats per skipped block, with bootstrap intervals."""
    from layerscope.report.plotting import figure, save

    s = result.summary
    ratio, delta = np.array(s["ratio_by_layer"]), np.array(s["delta_by_layer"])
    n = len(ratio)
    x = np.arange(n)
    colors = ["tab:red" if i in s["pairwise_layers"] else "tab:blue" for i in range(n)]
    with figure(2, 1, width=7.2, height=5.6) as (fig, axes):
        top, bottom = axes
        top.bar(x, ratio, color=colors, yerr=_error_bars(ratio, s["ratio_by_layer_ci"]), ecolor="0.2", capsize=2)
        top.axhline(1.0, color="0.3", linewidth=0.8)
        top.set_yscale("log")
        top.set_ylabel("loss ratio (skipped / baseline)")
        bottom.bar(x, delta, color=colors, yerr=_error_bars(delta, s["delta_by_layer_ci"]), ecolor="0.2", capsize=2)
        bottom.axhline(0.0, color="0.3", linewidth=0.8)
        bottom.set_ylabel("Δ loss (nats)")
        bottom.set_xlabel("skipped block")
        for ax in axes:
            ax.set_xticks(range(0, n, max(1, round(n / 15))))
        lo, hi = s["baseline_loss_ci"]
        top.set_title(f"knockout — {s['model']} on {s['prompt_set']}: baseline {s['baseline_loss']:.3f} "
                      f"[{lo:.3f}, {hi:.3f}] nats, {s['n_prompts']} prompts, {s['n_tokens']} tokens\n"
                      f"most critical block {s['most_critical_layer']} (in {s['most_critical_layer_stability']:.0%} "
                      f"of resamples); bars: 95% intervals over prompts; red: pairwise set", fontsize=8)
        save(fig, path)


def plot_synergy(result: KnockoutResult, path: str | Path) -> None:
    from layerscope.report.plotting import figure, save

    layers = result.summary["pairwise_layers"]
    k = len(layers)
    matrix = np.full((k, k), np.nan)
    index = {layer: n for n, layer in enumerate(layers)}
    excludes_zero = np.zeros((k, k), dtype=bool)
    for r in result.pairs.itertuples():
        a, b = index[r.layer_i], index[r.layer_j]
        matrix[a, b] = matrix[b, a] = r.synergy
        excludes_zero[a, b] = excludes_zero[b, a] = r.synergy_lo > 0 or r.synergy_hi < 0
    with figure(width=5.2, height=4.4) as (fig, ax):
        ax.grid(False)
        if k >= 2:
            bound = float(np.nanmax(np.abs(matrix))) or 1.0
            image = ax.imshow(matrix, cmap="RdBu_r", vmin=-bound, vmax=bound)
            fig.colorbar(image, ax=ax, label="synergy Δ(i,j) − Δ(i) − Δ(j) (nats)")
            for (a, b), value in np.ndenumerate(matrix):
                if np.isfinite(value):
                    mark = "*" if excludes_zero[a, b] else ""
                    ax.text(b, a, f"{value:.2f}{mark}", ha="center", va="center", fontsize=7,
                            color="white" if abs(value) > 0.6 * bound else "black")
        ax.set_xticks(range(k), [str(x) for x in layers])
        ax.set_yticks(range(k), [str(x) for x in layers])
        ax.set_xlabel("block j")
        ax.set_ylabel("block i")
        ax.set_title("pairwise knockout synergy among the most damaging blocks\n"
                     "(*: its 95% interval over prompts excludes 0)", fontsize=9)
        save(fig, path)


def run(job: Job) -> Result:
    """Knockout and pairwise synergy of one model on one prompt set (runs model blocks)."""
    params = job.params
    evaluator = surgery_evaluator(job.input("model"), job.input("resid"), params=params, device=job.device)
    result = knockout(evaluator, model=job.model, prompt_set=job.prompt_set, pairwise_top=params["pairwise_top"],
                      top_synergy=params["top_synergy"], seed=params["seed"])
    return Result(
        summary=result.summary,
        tables={"metrics": result.metrics, "pairs": result.pairs},
        figures={"ratio": partial(plot_ratio, result), "synergy": partial(plot_synergy, result)},
    )


EXPERIMENT = Experiment(
    name="knockout",
    dashboard=('baseline_loss', 'most_critical_layer', 'max_ratio', 'min_ratio', 'ratio_by_layer'),
    headlines=("baseline_loss", "ratio_by_layer", "min_ratio", "delta_by_layer"),
    family="surgery",
    description="loss with each block skipped, pairwise synergy",
    description_long="Knockout of each block and pairwise synergy among the most damaging ones, with bootstrap "
                     "intervals over the prompts.",
    needs="decoder",
    data="prompts",
    gpu=True,
    inputs=("model", "resid", "tokens"),
    run=run,
    tables=("metrics", "pairs"),
    figures=(Figure("ratio", "loss ratio and Δ per skipped block"), Figure("synergy", "pairwise synergy")),
    params={
        "max_prompts": MAX_PROMPTS_PARAM,
        **SURGERY_PARAMS,
        "pairwise_top": {
            "description": "Knock out every pair among this many blocks with the largest single-knockout loss "
                           "increase (0: no pairs).",
            "type": "integer",
            "minimum": 0,
            "default": 6
        },
        "top_synergy": {
            "description": "How many pairs with the largest synergy Δ(i,j) − Δ(i) − Δ(j) the summary lists.",
            "type": "integer",
            "minimum": 1,
            "default": 5
        }
    },
    threads=2,
    runtime=120,
)
