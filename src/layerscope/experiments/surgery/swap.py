"""Swap cost: how much each pair of blocks cares about its place.

For every pair i < j, the completion-token loss of the model with blocks i and j exchanged
(:func:`layerscope.engines.surgery.swap`), as a ratio to the baseline. Derived:

* **interchangeable pairs** — the upper end of the ratio's interval is at most
  ``interchangeable_ratio`` (the sample supports a swap cost that small); the count of pairs
  whose point ratio is below the threshold is kept as ``n_below_threshold_point``;
* **zones** — hierarchical clustering (``scipy.cluster.hierarchy``, average linkage,
  Euclidean distance) of the blocks' swap-cost profiles — block i's row of ln ratio(i, j)
  over all j, its cost of trading places with every block — cut into ``n_zones`` clusters
  and numbered by mean depth (blocks in one zone are hurt alike by the same moves);
  ``zones_stability`` is the fraction of bootstrap resamples that give the same segmentation;
* **position sensitivity** of block i — the geometric mean of its ratios over its partners
  j ≠ i, exp(mean ln ratio(i, j)) (a ratio is multiplicative: one catastrophic partner does
  not outweigh many free ones as it does in an arithmetic mean);
* **adjacent mean ratio** — the mean ratio of the swaps (i, i+1).

Uncertainty: a bootstrap over the prompts of the per-prompt loss sums and token counts of
every swap and of the baseline, resampled together, so each ratio (and everything derived
from the ratio matrix: sensitivities, zones, counts) is computed on the same resample. No
forward pass is added for it.

The sweep is one :meth:`~layerscope.engines.surgery.LossEvaluator.losses` call: every swap starts
from the cached ``resid.i`` of its first block.
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
from layerscope.engines.surgery import SURGERY_PARAMS, LossEvaluator, surgery_evaluator, swap
from layerscope.experiments.registry import Experiment, Figure, Job, Result
from layerscope.experiments.surgery.common import MAX_PROMPTS_PARAM, interval, prompt_sums, sample_fragment

log = logging.getLogger(__name__)


@dataclass
class SwapResult:
    metrics: pd.DataFrame  # per layer: model, prompt_set, layer, metric, value, lo, hi
    pairs: pd.DataFrame  # layer_i, layer_j, loss, ratio, ratio_lo, ratio_hi, interchangeable, below_threshold_point
    ratio: np.ndarray  # [L, L] symmetric, diagonal 1
    zone_of_layer: np.ndarray
    summary: dict


def swap_sweep(evaluator: LossEvaluator) -> dict:
    """Every swap: ``baseline``, ``loss`` [L, L] and ``ratio`` [L, L] (diagonal: the identity), and
    ``per_prompt``: the loss sums of the baseline [P] and of every pair i < j [P, n_pairs] (in
    ``pairs`` order) and the token counts [P], for the bootstrap."""
    n = evaluator.n_layers
    base_tokens = evaluator.losses([list(range(n))], per_token=True)[0]
    baseline = float(base_tokens.mean())
    pairs = list(itertools.combinations(range(n), 2))
    per_token = evaluator.losses([swap(n, i, j) for i, j in pairs], per_token=True, progress="swap: variants")
    loss = np.full((n, n), baseline)
    for (i, j), values in zip(pairs, per_token):
        loss[i, j] = loss[j, i] = float(values.mean())
    base_sums, counts = prompt_sums(evaluator, [base_tokens])
    pair_sums, _ = prompt_sums(evaluator, per_token)
    return {"baseline": baseline, "loss": loss, "ratio": loss / baseline, "pairs": pairs,
            "per_prompt": {"baseline": base_sums[:, 0], "pairs": pair_sums, "counts": counts}}


def swap_matrix(evaluator: LossEvaluator) -> tuple[float, np.ndarray, np.ndarray]:
    """(baseline, loss[L, L], ratio[L, L]) of every swap; the diagonal is the baseline (swap (i, i) = identity)."""
    sweep = swap_sweep(evaluator)
    return sweep["baseline"], sweep["loss"], sweep["ratio"]


def ratio_matrices(q: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    """Ratio matrices [n_boot, L, L] from resampled pair sums q [n_boot, P, n_pairs] and baseline sums b [n_boot, P]."""
    iu = np.triu_indices(n, 1)
    out = np.ones((q.shape[0], n, n))
    values = q.sum(1) / b.sum(1)[:, None]
    out[:, iu[0], iu[1]] = values
    out[:, iu[1], iu[0]] = values
    return out


def position_sensitivity(ratio: np.ndarray) -> np.ndarray:
    """Geometric mean over partners j ≠ i of ratio(i, j), per block (batched over leading axes)."""
    ratio = np.asarray(ratio, dtype=float)
    n = ratio.shape[-1]
    logs = np.log(np.maximum(ratio, 1e-300))
    off = ~np.eye(n, dtype=bool)
    return np.exp((logs * off).sum(-1) / max(1, n - 1))


def zones(ratio: np.ndarray, n_zones: int) -> np.ndarray:
    """Zone of each block, numbered by mean depth: average-linkage clustering (Euclidean) of the
    blocks' swap-cost profiles, the rows of ln ratio (a block's cost of trading places with every block)."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import pdist

    n = len(ratio)
    k = max(1, min(int(n_zones), n))
    if n < 2 or k == 1:
        return np.zeros(n, dtype=int)
    profiles = np.log(np.maximum(ratio, 1e-300))
    profiles = (profiles + profiles.T) / 2
    np.fill_diagonal(profiles, 0.0)
    labels = fcluster(linkage(pdist(profiles, metric="euclidean"), method="average"), k, criterion="maxclust")
    order = sorted(set(labels), key=lambda z: (np.mean(np.flatnonzero(labels == z)), z))
    renumber = {z: rank for rank, z in enumerate(order)}
    return np.array([renumber[z] for z in labels])


def layer_ranges(layers) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    layers = sorted(int(x) for x in layers)
    parts, start = [], None
    for a, b in itertools.zip_longest(layers, layers[1:]):
        start = a if start is None else start
        if b is None or b != a + 1:
            parts.append(f"{start}-{a}" if a != start else f"{a}")
            start = None
    return ",".join(parts)


def swap_label(i: int, j: int) -> str:
    return f"{i}<->{j}"


def swap_experiment(evaluator: LossEvaluator, *, model: str, prompt_set: str, interchangeable_ratio: float = 1.05,
                    n_zones: int = 3, seed: int = 0, n_boot: int = N_BOOT) -> SwapResult:
    n = evaluator.n_layers
    if n < 2:
        raise LayerscopeError("swap needs a model with at least 2 blocks")
    sweep = swap_sweep(evaluator)
    baseline, loss, ratio = sweep["baseline"], sweep["loss"], sweep["ratio"]
    pp = sweep["per_prompt"]
    b, q, c = pp["baseline"], pp["pairs"], pp["counts"]
    boot = Bootstrap(len(c), unit="prompt", n_boot=n_boot, seed=seed)

    def matrices(q, b):
        return ratio_matrices(q, b, n)

    zone_of_layer = zones(ratio, n_zones)
    _, zones_stability = boot.stability(q, b, statistic=matrices, pick=lambda r: tuple(zones(r, n_zones).tolist()))
    boot.check_stability("zones", zones_stability)
    sensitivity = position_sensitivity(ratio)
    sensitivity_ci = interval(boot, sensitivity, q, b, statistic=lambda q, b: position_sensitivity(matrices(q, b)))
    most_sensitive, least_sensitive = int(np.argmax(sensitivity)), int(np.argmin(sensitivity))
    _, most_sensitive_stability = boot.stability(q, b, statistic=lambda q, b: position_sensitivity(matrices(q, b)),
                                                 pick=lambda v: int(np.argmax(v)))
    boot.check_stability("most_position_sensitive_layer", most_sensitive_stability)

    iu = np.triu_indices(n, 1)
    pairs = pd.DataFrame({"layer_i": iu[0], "layer_j": iu[1], "loss": loss[iu], "ratio": ratio[iu]})
    pair_ci = interval(boot, ratio[iu], q, b, statistic=lambda q, b: q.sum(1) / b.sum(1)[:, None])
    pairs["ratio_lo"] = [lo for lo, _ in pair_ci]
    pairs["ratio_hi"] = [hi for _, hi in pair_ci]
    pairs["interchangeable"] = pairs["ratio_hi"] <= interchangeable_ratio
    pairs["below_threshold_point"] = pairs["ratio"] < interchangeable_ratio
    cheapest = pairs.loc[pairs["ratio"].idxmin()]
    dearest = pairs.loc[pairs["ratio"].idxmax()]
    _, cheapest_stability = boot.stability(q, b, statistic=lambda q, b: q.sum(1) / b.sum(1)[:, None],
                                           pick=lambda v: int(np.argmin(v)))
    _, dearest_stability = boot.stability(q, b, statistic=lambda q, b: q.sum(1) / b.sum(1)[:, None],
                                          pick=lambda v: int(np.argmax(v)))
    boot.check_stability("cheapest_swap", cheapest_stability)
    boot.check_stability("most_expensive_swap", dearest_stability)
    adjacent = np.array([ratio[i, i + 1] for i in range(n - 1)])
    steps = np.arange(n - 1)
    adjacent_ci = interval(boot, adjacent, q, b, statistic=lambda q, b: matrices(q, b)[:, steps, steps + 1])
    adjacent_mean_ci = interval(boot, adjacent.mean(), q, b,
                                statistic=lambda q, b: matrices(q, b)[:, steps, steps + 1].mean(axis=1))

    records = [(layer, "position_sensitivity", float(v), lo, hi)
               for layer, (v, (lo, hi)) in enumerate(zip(sensitivity, sensitivity_ci))]
    records += [(layer, "zone", float(z), np.nan, np.nan) for layer, z in enumerate(zone_of_layer)]
    records += [(layer, "adjacent_ratio", float(v), lo, hi)  # swap (layer, layer+1)
                for layer, (v, (lo, hi)) in enumerate(zip(adjacent, adjacent_ci))]
    metrics = pd.DataFrame(records, columns=["layer", "metric", "value", "lo", "hi"])
    metrics.insert(0, "prompt_set", prompt_set)
    metrics.insert(0, "model", model)
    interchangeable = pairs[pairs["interchangeable"]].sort_values("ratio")
    summary = {
        "model": model,
        "prompt_set": prompt_set,
        "n_layers": n,
        **evaluator.provenance(),
        **sample_fragment(evaluator),
        "baseline_loss": float(baseline),
        "baseline_loss_ci": interval(boot, baseline, b, c, statistic=lambda b, c: b.sum(1) / c.sum(1)),
        "n_pairs": int(len(pairs)),
        "interchangeable_ratio": float(interchangeable_ratio),
        "n_interchangeable": int(len(interchangeable)),
        "n_below_threshold_point": int(pairs["below_threshold_point"].sum()),
        "interchangeable_pairs": [swap_label(int(r.layer_i), int(r.layer_j)) for r in interchangeable.head(12).itertuples()],
        "n_zones": int(zone_of_layer.max() + 1),
        "zones": [layer_ranges(np.flatnonzero(zone_of_layer == z)) for z in range(int(zone_of_layer.max()) + 1)],
        "zone_of_layer": [int(z) for z in zone_of_layer],
        "zones_stability": float(zones_stability),
        "position_sensitivity": [float(v) for v in sensitivity],
        "position_sensitivity_ci": sensitivity_ci,
        "most_position_sensitive_layer": most_sensitive,
        "most_position_sensitive_layer_stability": float(most_sensitive_stability),
        "max_position_sensitivity": float(sensitivity.max()),
        "max_position_sensitivity_ci": sensitivity_ci[most_sensitive],
        "least_position_sensitive_layer": least_sensitive,
        "min_position_sensitivity": float(sensitivity.min()),
        "min_position_sensitivity_ci": sensitivity_ci[least_sensitive],
        "cheapest_swap": swap_label(int(cheapest.layer_i), int(cheapest.layer_j)),
        "cheapest_swap_ratio": float(cheapest.ratio),
        "cheapest_swap_ratio_ci": [float(cheapest.ratio_lo), float(cheapest.ratio_hi)],
        "cheapest_swap_stability": float(cheapest_stability),
        "most_expensive_swap": swap_label(int(dearest.layer_i), int(dearest.layer_j)),
        "most_expensive_swap_ratio": float(dearest.ratio),
        "most_expensive_swap_ratio_ci": [float(dearest.ratio_lo), float(dearest.ratio_hi)],
        "most_expensive_swap_stability": float(dearest_stability),
        "adjacent_mean_ratio": float(adjacent.mean()),
        "adjacent_mean_ratio_ci": adjacent_mean_ci,
        "mean_ratio": float(pairs["ratio"].mean()),
        "mean_ratio_ci": interval(boot, pairs["ratio"].mean(), q, b,
                                  statistic=lambda q, b: (q.sum(1) / b.sum(1)[:, None]).mean(axis=1)),
        "median_ratio": float(pairs["ratio"].median()),
        **boot.summary(),
    }
    return SwapResult(metrics, pairs, ratio, zone_of_layer, summary)


# ---------------------------------------------------------------------------- outputs


def _zone_colors(zone_of_layer):
    from layerscope.report.plotting import PALETTE

    return [PALETTE[int(z) % len(PALETTE)] for z in zone_of_layer]


def plot_cost_matrix(result: SwapResult, path: str | Path) -> None:
    from matplotlib.patches import Rectangle

    from layerscope.report.plotting import figure, save

    n = len(result.ratio)
    data = np.log10(np.maximum(result.ratio, 1e-12))
    colors = _zone_colors(result.zone_of_layer)
    with figure(width=6.4, height=5.4) as (fig, ax):
        ax.grid(False)
        bound = max(float(np.abs(data).max()), 1e-6)
        image = ax.imshow(data, cmap="RdBu_r", vmin=-bound, vmax=bound)
        fig.colorbar(image, ax=ax, label="log10 loss ratio (swapped / baseline)")
        for i, color in enumerate(colors):  # zone strips along both axes
            ax.add_patch(Rectangle((i - 0.5, n - 0.5), 1, max(0.6, n / 40), color=color, clip_on=False))
            ax.add_patch(Rectangle((-0.5 - max(0.6, n / 40), i - 0.5), max(0.6, n / 40), 1, color=color, clip_on=False))
        free = result.pairs[result.pairs["interchangeable"]]
        if len(free):  # interchangeable by the interval: its upper end is at most the threshold
            ax.scatter(free["layer_j"], free["layer_i"], s=max(2.0, 60.0 / n), color="black", marker="o",
                       label="interchangeable (interval upper end ≤ threshold)")
            ax.legend(loc="lower left", fontsize=7)
        step = max(1, round(n / 15))
        ax.set_xticks(range(0, n, step))
        ax.set_yticks(range(0, n, step))
        ax.set_xlabel("block j (strip: zone)")
        ax.set_ylabel("block i")
        s = result.summary
        ax.set_title(f"swap cost — {s['model']} on {s['prompt_set']}: {s['n_zones']} zones {', '.join(s['zones'])}\n"
                     f"(same zones in {s['zones_stability']:.0%} of bootstrap resamples over "
                     f"{s['n_prompts']} prompts)", fontsize=9)
        save(fig, path)


def plot_sensitivity(result: SwapResult, path: str | Path) -> None:
    from layerscope.report.plotting import figure, save

    s = result.summary
    n = s["n_layers"]
    rows = result.metrics.query("metric == 'position_sensitivity'")
    sensitivity = rows["value"].to_numpy(dtype=float)
    error = np.vstack([np.maximum(sensitivity - rows["lo"].to_numpy(dtype=float), 0.0),
                       np.maximum(rows["hi"].to_numpy(dtype=float) - sensitivity, 0.0)])
    adjacent = result.metrics.query("metric == 'adjacent_ratio'")
    x = np.arange(len(adjacent)) + 0.5
    with figure(width=7.2, height=3.6) as (fig, ax):
        ax.bar(np.arange(n), sensitivity, color=_zone_colors(result.zone_of_layer), yerr=error, ecolor="0.3",
               capsize=2, label="geometric mean ratio over partners")
        ax.fill_between(x, adjacent["lo"].to_numpy(dtype=float), adjacent["hi"].to_numpy(dtype=float), color="0.2",
                        alpha=0.2, linewidth=0)
        ax.plot(x, adjacent["value"].to_numpy(dtype=float), color="0.2", marker=".", label="swap with next block")
        ax.axhline(1.0, color="0.3", linewidth=0.8)
        ax.axhline(s["interchangeable_ratio"], color="0.5", linestyle=":", linewidth=0.8,
                   label=f"interchangeable threshold {s['interchangeable_ratio']:g}")
        ax.set_yscale("log")
        ax.set_xlabel("block (bar colour: zone)")
        ax.set_xticks(range(0, n, max(1, round(n / 15))))
        ax.set_ylabel("loss ratio (swapped / baseline)")
        ax.legend(loc="upper right")
        ax.set_title(f"position sensitivity: most sensitive block {s['most_position_sensitive_layer']} (in "
                     f"{s['most_position_sensitive_layer_stability']:.0%} of resamples)\n{s['n_interchangeable']} of "
                     f"{s['n_pairs']} pairs interchangeable by their interval; bars and band: 95% intervals over "
                     "prompts", fontsize=8)
        save(fig, path)


def run(job: Job) -> Result:
    """The swap cost of every pair of blocks of one model on one prompt set (runs model blocks)."""
    params = job.params
    evaluator = surgery_evaluator(job.input("model"), job.input("resid"), params=params, device=job.device)
    result = swap_experiment(evaluator, model=job.model, prompt_set=job.prompt_set,
                             interchangeable_ratio=params["interchangeable_ratio"], n_zones=params["n_zones"],
                             seed=params["seed"])
    return Result(
        summary=result.summary,
        tables={"metrics": result.metrics, "pairs": result.pairs},
        figures={"cost_matrix": partial(plot_cost_matrix, result), "sensitivity": partial(plot_sensitivity, result)},
    )


EXPERIMENT = Experiment(
    name="swap",
    dashboard=('baseline_loss', 'adjacent_mean_ratio', 'n_interchangeable', 'position_sensitivity'),
    headlines=("baseline_loss", "adjacent_mean_ratio", "position_sensitivity"),
    family="surgery",
    description="loss with every pair of blocks swapped; zones",
    description_long="Loss with every pair of blocks swapped, interchangeable pairs, zones, position sensitivity, "
                     "with bootstrap intervals over the prompts.",
    needs="decoder",
    data="prompts",
    gpu=True,
    inputs=("model", "resid", "tokens"),
    run=run,
    tables=("metrics", "pairs"),
    figures=(Figure("cost_matrix", "swap cost matrix and zones"), Figure("sensitivity", "position sensitivity")),
    params={
        "max_prompts": MAX_PROMPTS_PARAM,
        **SURGERY_PARAMS,
        "interchangeable_ratio": {
            "description": "A swap is interchangeable when the upper end of the bootstrap interval of its loss ratio "
                           "(swapped / baseline) is at most this.",
            "type": "number",
            "exclusiveMinimum": 0,
            "default": 1.05
        },
        "n_zones": {
            "description": "Zones cut from the average-linkage clustering of the blocks' swap-cost profiles "
                           "(rows of ln ratio).",
            "type": "integer",
            "minimum": 1,
            "default": 3
        }
    },
    threads=2,
    runtime=240,
)
