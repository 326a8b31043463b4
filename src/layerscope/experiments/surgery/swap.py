"""Swap cost: how much each pair of blocks cares about its place.

For every pair i < j, the completion-token loss of the model with blocks i and j exchanged
(:func:`layerscope.engines.surgery.swap`), as a ratio to the baseline. Derived:

* **interchangeable pairs** — ratio below ``interchangeable_ratio``;
* **zones** — hierarchical clustering (``scipy.cluster.hierarchy``, average linkage,
  Euclidean distance) of the blocks' swap-cost profiles — block i's row of ln ratio(i, j)
  over all j, its cost of trading places with every block — cut into ``n_zones`` clusters
  and numbered by mean depth (blocks in one zone are hurt alike by the same moves);
* **position sensitivity** of block i — the mean ratio over its partners j ≠ i;
* **adjacent mean ratio** — the mean ratio of the swaps (i, i+1).

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
from layerscope.engines.surgery import SURGERY_PARAMS, LossEvaluator, surgery_evaluator, swap
from layerscope.experiments.registry import Experiment, Figure, Job, Result

log = logging.getLogger(__name__)


@dataclass
class SwapResult:
    metrics: pd.DataFrame  # per layer: model, prompt_set, layer, metric, value
    pairs: pd.DataFrame  # layer_i, layer_j, loss, ratio, interchangeable
    ratio: np.ndarray  # [L, L] symmetric, diagonal 1
    zone_of_layer: np.ndarray
    summary: dict


def swap_matrix(evaluator: LossEvaluator) -> tuple[float, np.ndarray, np.ndarray]:
    """(baseline, loss[L, L], ratio[L, L]) of every swap; the diagonal is the baseline (swap (i, i) = identity)."""
    n = evaluator.n_layers
    baseline = evaluator.baseline()
    pairs = list(itertools.combinations(range(n), 2))
    values = evaluator.losses([swap(n, i, j) for i, j in pairs])
    loss = np.full((n, n), baseline)
    for (i, j), value in zip(pairs, values):
        loss[i, j] = loss[j, i] = value
    return baseline, loss, loss / baseline


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
                    n_zones: int = 3) -> SwapResult:
    n = evaluator.n_layers
    if n < 2:
        raise LayerscopeError("swap needs a model with at least 2 blocks")
    baseline, loss, ratio = swap_matrix(evaluator)
    zone_of_layer = zones(ratio, n_zones)
    off = ~np.eye(n, dtype=bool)
    sensitivity = np.array([ratio[i, off[i]].mean() for i in range(n)])
    iu = np.triu_indices(n, 1)
    pairs = pd.DataFrame({"layer_i": iu[0], "layer_j": iu[1], "loss": loss[iu], "ratio": ratio[iu]})
    pairs["interchangeable"] = pairs["ratio"] < interchangeable_ratio
    cheapest = pairs.loc[pairs["ratio"].idxmin()]
    dearest = pairs.loc[pairs["ratio"].idxmax()]
    adjacent = np.array([ratio[i, i + 1] for i in range(n - 1)])
    records = [(layer, "position_sensitivity", float(v)) for layer, v in enumerate(sensitivity)]
    records += [(layer, "zone", float(z)) for layer, z in enumerate(zone_of_layer)]
    records += [(layer, "adjacent_ratio", float(v)) for layer, v in enumerate(adjacent)]  # swap (layer, layer+1)
    metrics = pd.DataFrame(records, columns=["layer", "metric", "value"])
    metrics.insert(0, "prompt_set", prompt_set)
    metrics.insert(0, "model", model)
    interchangeable = pairs[pairs["interchangeable"]].sort_values("ratio")
    summary = {
        "model": model,
        "prompt_set": prompt_set,
        "n_layers": n,
        **evaluator.provenance(),
        "baseline_loss": float(baseline),
        "n_pairs": int(len(pairs)),
        "interchangeable_ratio": float(interchangeable_ratio),
        "n_interchangeable": int(len(interchangeable)),
        "interchangeable_pairs": [swap_label(int(r.layer_i), int(r.layer_j)) for r in interchangeable.head(12).itertuples()],
        "n_zones": int(zone_of_layer.max() + 1),
        "zones": [layer_ranges(np.flatnonzero(zone_of_layer == z)) for z in range(int(zone_of_layer.max()) + 1)],
        "zone_of_layer": [int(z) for z in zone_of_layer],
        "most_position_sensitive_layer": int(np.argmax(sensitivity)),
        "max_position_sensitivity": float(sensitivity.max()),
        "least_position_sensitive_layer": int(np.argmin(sensitivity)),
        "min_position_sensitivity": float(sensitivity.min()),
        "cheapest_swap": swap_label(int(cheapest.layer_i), int(cheapest.layer_j)),
        "cheapest_swap_ratio": float(cheapest.ratio),
        "most_expensive_swap": swap_label(int(dearest.layer_i), int(dearest.layer_j)),
        "most_expensive_swap_ratio": float(dearest.ratio),
        "adjacent_mean_ratio": float(adjacent.mean()),
        "mean_ratio": float(pairs["ratio"].mean()),
        "median_ratio": float(pairs["ratio"].median()),
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
        step = max(1, round(n / 15))
        ax.set_xticks(range(0, n, step))
        ax.set_yticks(range(0, n, step))
        ax.set_xlabel("block j (strip: zone)")
        ax.set_ylabel("block i")
        s = result.summary
        ax.set_title(f"swap cost — {s['model']} on {s['prompt_set']}: {s['n_zones']} zones {', '.join(s['zones'])}")
        save(fig, path)


def plot_sensitivity(result: SwapResult, path: str | Path) -> None:
    from layerscope.report.plotting import figure, save

    s = result.summary
    n = s["n_layers"]
    sensitivity = result.metrics.query("metric == 'position_sensitivity'")["value"].to_numpy()
    adjacent = result.metrics.query("metric == 'adjacent_ratio'")["value"].to_numpy()
    with figure(width=7.2, height=3.4) as (fig, ax):
        ax.bar(np.arange(n), sensitivity, color=_zone_colors(result.zone_of_layer), label="mean ratio over partners")
        ax.plot(np.arange(len(adjacent)) + 0.5, adjacent, color="0.2", marker=".", label="swap with next block")
        ax.axhline(1.0, color="0.3", linewidth=0.8)
        ax.axhline(s["interchangeable_ratio"], color="0.5", linestyle=":", linewidth=0.8,
                   label=f"interchangeable below {s['interchangeable_ratio']:g}")
        ax.set_yscale("log")
        ax.set_xlabel("block (bar colour: zone)")
        ax.set_xticks(range(0, n, max(1, round(n / 15))))
        ax.set_ylabel("loss ratio (swapped / baseline)")
        ax.legend(loc="upper right")
        ax.set_title(f"position sensitivity (most sensitive: block {s['most_position_sensitive_layer']}; "
                     f"{s['n_interchangeable']} of {s['n_pairs']} pairs interchangeable)")
        save(fig, path)


def run(job: Job) -> Result:
    """The swap cost of every pair of blocks of one model on one prompt set (runs model blocks)."""
    params = job.params
    evaluator = surgery_evaluator(job.input("model"), job.input("resid"), params=params, device=job.device)
    result = swap_experiment(evaluator, model=job.model, prompt_set=job.prompt_set,
                             interchangeable_ratio=params["interchangeable_ratio"], n_zones=params["n_zones"])
    return Result(
        summary=result.summary,
        tables={"metrics": result.metrics, "pairs": result.pairs},
        figures={"cost_matrix": partial(plot_cost_matrix, result), "sensitivity": partial(plot_sensitivity, result)},
    )


EXPERIMENT = Experiment(
    name="swap",
    family="surgery",
    description="loss with every pair of blocks swapped; zones",
    description_long="Loss with every pair of blocks swapped, interchangeable pairs, zones, position sensitivity.",
    needs="decoder",
    data="prompts",
    gpu=True,
    inputs=("model", "resid", "tokens"),
    run=run,
    tables=("metrics", "pairs"),
    figures=(Figure("cost_matrix", "swap cost matrix and zones"), Figure("sensitivity", "position sensitivity")),
    params={
        "max_prompts": {
            "description": "Evaluate the loss on the prompt set's first N prompts only (null: all). Every variant "
                           "re-runs blocks on these prompts, so this sets the cost.",
            "type": ["integer", "null"],
            "minimum": 1,
            "default": 2
        },
        **SURGERY_PARAMS,
        "interchangeable_ratio": {
            "description": "A swap is interchangeable when its loss ratio (swapped / baseline) is below this.",
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
