"""Does a layer's need for precision follow its nonlinearity? (cross-experiment rule)

Reads one model × prompt set's ``linearization`` and ``quantization`` summaries and, over
the blocks both measured, computes Spearman's rank correlation (``scipy.stats.spearmanr``)
between per-block quantization sensitivity (Δloss with that block quantized) and the
linearization gap at the reference ε — for every bit width of the sweep and for the block,
attention and MLP gaps. The headline pairs the block gap with the sensitivity at
``sensitivity_bits`` (the bit width the quantization experiment ranks layers by).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from layerscope import LayerscopeError
from layerscope.experiments.registry import Experiment, Figure, Job, Result
from layerscope.jobs.io import read_json

log = logging.getLogger(__name__)

GAP_KEYS = {"block": "gap_by_layer", "attn": "attn_gap_by_layer", "mlp": "mlp_gap_by_layer"}


@dataclass
class CorrelationResult:
    metrics: pd.DataFrame
    summary: dict
    points: pd.DataFrame  # layer, gap, sensitivity (headline pair), for the scatter


def _spearman(x: np.ndarray, y: np.ndarray) -> tuple[float | None, float | None]:
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None, None  # undefined: too few layers or a constant series
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rho, p = spearmanr(x, y)
    return float(rho), float(p)


def sensitivity_vs_linearity(linearization: dict, quantization: dict, *, model: str,
                             prompt_set: str) -> CorrelationResult:
    """Spearman ρ between per-block quantization sensitivity and linearization gap."""
    layers = [int(i) for i in linearization["layers"]]
    n_layers = int(quantization["n_layers"])
    if linearization["n_layers"] != n_layers:
        raise LayerscopeError(
            f"linearization ({linearization['n_layers']} layers) and quantization ({n_layers} layers) "
            "summaries describe different models"
        )
    common = [i for i in layers if 0 <= i < n_layers]
    index = [layers.index(i) for i in common]
    records = []
    for bits, values in quantization["sensitivity"].items():
        sens = np.asarray(values, dtype=float)[common]
        for sub, key in GAP_KEYS.items():
            gap = np.asarray(linearization[key], dtype=float)[index]
            rho, p = _spearman(gap, sens)
            records += [(int(bits), sub, "spearman_rho", np.nan if rho is None else rho),
                        (int(bits), sub, "p_value", np.nan if p is None else p),
                        (int(bits), sub, "n_layers", float(len(common)))]
    metrics = pd.DataFrame(records, columns=["bits", "sublayer", "metric", "value"])
    metrics.insert(0, "prompt_set", prompt_set)
    metrics.insert(0, "model", model)

    sb = int(quantization["sensitivity_bits"])
    headline_gap = np.asarray(linearization["gap_by_layer"], dtype=float)[index]
    headline_sens = np.asarray(quantization["sensitivity"][str(sb)], dtype=float)[common]
    rho, p = _spearman(headline_gap, headline_sens)

    def pick(sub: str, bits: int, metric: str):
        row = metrics[(metrics["sublayer"] == sub) & (metrics["bits"] == bits) & (metrics["metric"] == metric)]
        value = float(row["value"].iloc[0])
        return float(value) if np.isfinite(value) else None

    summary = {
        "model": model,
        "prompt_set": prompt_set,
        "n_layers": len(common),
        "sensitivity_bits": sb,
        "ref_eps": linearization["ref_eps"],
        "spearman_rho": rho,
        "p_value": p,
        "attn_spearman_rho": pick("attn", sb, "spearman_rho"),
        "mlp_spearman_rho": pick("mlp", sb, "spearman_rho"),
        "rho_by_bits": {str(b): pick("block", int(b), "spearman_rho") for b in quantization["sensitivity"]},
    }
    if rho is None:
        log.warning("sensitivity_vs_linearity: Spearman ρ undefined (fewer than 3 layers or a constant series)")
    points = pd.DataFrame({"layer": common, "gap": headline_gap, "sensitivity": headline_sens})
    return CorrelationResult(metrics, summary, points)


def plot_scatter(result: CorrelationResult, path: str | Path) -> None:
    from layerscope.report.plotting import figure, save

    s = result.summary
    pts = result.points
    with figure(width=6.0, height=4.2) as (fig, ax):
        sc = ax.scatter(pts["gap"], pts["sensitivity"], c=pts["layer"], cmap="viridis", s=28, zorder=3)
        for row in pts.itertuples(index=False):
            ax.annotate(str(row.layer), (row.gap, row.sensitivity), textcoords="offset points", xytext=(3, 3),
                        fontsize=7)
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_xlabel(f"block linearization gap at ε = {s['ref_eps']:g}")
        ax.set_ylabel(f"Δ loss with the block at {s['sensitivity_bits']} bits (nats, symlog)")
        rho = "undefined" if s["spearman_rho"] is None else f"{s['spearman_rho']:.2f} (p = {s['p_value']:.2g})"
        ax.set_title(f"sensitivity vs linearity — {s['model']} on {s['prompt_set']}\nSpearman ρ = {rho} "
                     f"over {s['n_layers']} blocks")
        fig.colorbar(sc, ax=ax, label="block")
        save(fig, path)


def run(job: Job) -> Result:
    """Read both experiments' summaries for this model and prompt set; correlate."""
    result = sensitivity_vs_linearity(read_json(job.input("linearization")), read_json(job.input("quantization")),
                                      model=job.model, prompt_set=job.prompt_set)
    return Result(summary=result.summary, tables={"metrics": result.metrics},
                  figures={"scatter": partial(plot_scatter, result)})


EXPERIMENT = Experiment(
    name="sensitivity_vs_linearity",
    family="nonlinearity",
    description="rank correlation of quantization sensitivity with the linearization gap",
    description_long="Cross-experiment rule: Spearman correlation between per-block quantization sensitivity and "
                     "linearization gap; runs wherever both experiments run.",
    needs="decoder",
    data="prompts",
    gpu=False,
    inputs=("summary:linearization", "summary:quantization"),
    run=run,
    tables=("metrics",),
    figures=(Figure("scatter", "sensitivity vs gap"),),
    params={},
    threads=1,
    requires=("linearization", "quantization"),
)
