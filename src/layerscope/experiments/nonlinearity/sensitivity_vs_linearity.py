"""Does a layer's need for precision follow its nonlinearity? (cross-experiment rule)

Reads one model × prompt set's ``linearization`` and ``quantization`` summaries and, over
the blocks both measured, computes Spearman's rank correlation (``scipy.stats.spearmanr``)
between per-block quantization sensitivity (Δloss with that block quantized) and the
linearization gap of the block's update at the reference ε — for every bit width of the
sweep and for the block, attention and MLP gaps. The headline pairs the block gap with the
sensitivity at ``sensitivity_bits`` (the bit width the quantization experiment ranks layers by).

Both series drift with depth in most models, so a raw ρ mostly says "both grow along the
stack". Each correlation is therefore also computed with depth (the block index) partialled
out (:func:`layerscope.engines.statistics.partial_spearman`), and every p-value is adjusted
for the number of tests this rule makes (Holm, :func:`layerscope.engines.statistics.holm`,
over the raw and the partial test of every bit width × gap). The claim "sensitivity follows
linearity" is flagged unless the partial correlation stays significant after the adjustment.
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
from layerscope.engines.statistics import holm, partial_spearman, uncertainty
from layerscope.experiments.registry import Experiment, Figure, Job, Result
from layerscope.jobs.io import read_json

log = logging.getLogger(__name__)

GAP_KEYS = {"block": "gap_by_layer", "attn": "attn_gap_by_layer", "mlp": "mlp_gap_by_layer"}
ALPHA = 0.05  # family-wise level of the Holm-adjusted claims


@dataclass
class CorrelationResult:
    metrics: pd.DataFrame
    summary: dict
    points: pd.DataFrame  # layer, gap, sensitivity (headline pair), for the scatter


def _usable(*series: np.ndarray) -> tuple[np.ndarray, ...] | None:
    keep = np.logical_and.reduce([np.isfinite(v) for v in series])
    out = tuple(v[keep] for v in series)
    if len(out[0]) < 3 or any(np.ptp(v) == 0 for v in out):
        return None  # undefined: too few layers or a constant series
    return out


def _spearman(x: np.ndarray, y: np.ndarray) -> tuple[float | None, float | None]:
    usable = _usable(x, y)
    if usable is None:
        return None, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rho, p = spearmanr(*usable)
    return float(rho), float(p)


def _partial(x: np.ndarray, y: np.ndarray, depth: np.ndarray) -> tuple[float | None, float | None]:
    """Spearman ρ of x and y with depth partialled out (None when undefined: < 4 layers, constant series)."""
    usable = _usable(x, y, depth)
    if usable is None:
        return None, None
    rho, p = partial_spearman(*usable)
    if not (np.isfinite(rho) and np.isfinite(p)):
        return None, None
    return float(rho), float(p)


def sensitivity_vs_linearity(linearization: dict, quantization: dict, *, model: str,
                             prompt_set: str) -> CorrelationResult:
    """Spearman ρ (raw and with depth partialled out, Holm-adjusted) between per-block quantization
    sensitivity and linearization gap."""
    layers = [int(i) for i in linearization["layers"]]
    n_layers = int(quantization["n_layers"])
    if linearization["n_layers"] != n_layers:
        raise LayerscopeError(
            f"linearization ({linearization['n_layers']} layers) and quantization ({n_layers} layers) "
            "summaries describe different models"
        )
    common = [i for i in layers if 0 <= i < n_layers]
    index = [layers.index(i) for i in common]
    depth = np.asarray(common, dtype=float)
    tests = []  # (bits, sublayer, kind, rho, p)
    for bits, values in quantization["sensitivity"].items():
        sens = np.asarray(values, dtype=float)[common]
        for sub, key in GAP_KEYS.items():
            gap = np.asarray(linearization[key], dtype=float)[index]
            tests.append((int(bits), sub, "raw", *_spearman(gap, sens)))
            tests.append((int(bits), sub, "partial", *_partial(gap, sens, depth)))
    made = [k for k, t in enumerate(tests) if t[4] is not None and np.isfinite(t[4])]
    adjusted = dict(zip(made, holm([tests[k][4] for k in made]))) if made else {}
    records = []
    names = {"raw": ("spearman_rho", "p_value", "p_holm"),
             "partial": ("partial_spearman_rho", "partial_p_value", "partial_p_holm")}
    for k, (bits, sub, kind, rho, p) in enumerate(tests):
        rho_name, p_name, holm_name = names[kind]
        records += [(bits, sub, rho_name, np.nan if rho is None else rho),
                    (bits, sub, p_name, np.nan if p is None else p),
                    (bits, sub, holm_name, adjusted.get(k, np.nan))]
        if kind == "raw":
            records.append((bits, sub, "n_layers", float(len(common))))
    metrics = pd.DataFrame(records, columns=["bits", "sublayer", "metric", "value"])
    metrics.insert(0, "prompt_set", prompt_set)
    metrics.insert(0, "model", model)

    sb = int(quantization["sensitivity_bits"])
    headline_gap = np.asarray(linearization["gap_by_layer"], dtype=float)[index]
    headline_sens = np.asarray(quantization["sensitivity"][str(sb)], dtype=float)[common]

    def pick(sub: str, bits: int, metric: str):
        row = metrics[(metrics["sublayer"] == sub) & (metrics["bits"] == bits) & (metrics["metric"] == metric)]
        value = float(row["value"].iloc[0])
        return float(value) if np.isfinite(value) else None

    rho, partial_rho = pick("block", sb, "spearman_rho"), pick("block", sb, "partial_spearman_rho")
    p_holm, partial_p_holm = pick("block", sb, "p_holm"), pick("block", sb, "partial_p_holm")
    reasons = []
    for name, upstream in (("linearization", linearization), ("quantization", quantization)):
        for reason in upstream.get("underpowered_reasons", []) or []:
            reasons.append(f"{name}: {reason}")
    if partial_rho is None:
        reasons.append("the rank correlation with depth partialled out is undefined (fewer than 4 blocks or a "
                       "constant series)")
    elif partial_p_holm >= ALPHA:
        reasons.append(f"ρ(sensitivity, gap) with depth partialled out is {partial_rho:.2f}, not significant after "
                       f"Holm adjustment over {len(made)} tests (p_holm = {partial_p_holm:.2g} ≥ {ALPHA})")
    summary = {
        "model": model,
        "prompt_set": prompt_set,
        "n_layers": len(common),
        "sensitivity_bits": sb,
        "ref_eps": linearization["ref_eps"],
        "gap": "gap_by_layer (the linearization gap of the block's update u = f − h)",
        "spearman_rho": rho,
        "p_value": pick("block", sb, "p_value"),
        "p_holm": p_holm,
        "partial_spearman_rho": partial_rho,
        "partial_p_value": pick("block", sb, "partial_p_value"),
        "partial_p_holm": partial_p_holm,
        "n_tests": len(made),
        "attn_spearman_rho": pick("attn", sb, "spearman_rho"),
        "mlp_spearman_rho": pick("mlp", sb, "spearman_rho"),
        "attn_partial_spearman_rho": pick("attn", sb, "partial_spearman_rho"),
        "mlp_partial_spearman_rho": pick("mlp", sb, "partial_spearman_rho"),
        "rho_by_bits": {str(b): pick("block", int(b), "spearman_rho") for b in quantization["sensitivity"]},
        "partial_rho_by_bits": {str(b): pick("block", int(b), "partial_spearman_rho")
                                for b in quantization["sensitivity"]},
        "uncertainty": uncertainty("layer", len(common), n_boot=0, level=1 - ALPHA,
                                   method=f"rank-correlation tests over blocks (t approximation), Holm-adjusted "
                                          f"over the {len(made)} tests of this summary"),
        "underpowered": bool(reasons),
        "underpowered_reasons": reasons,
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
        ax.set_xlabel(f"block update linearization gap at ε = {s['ref_eps']:g}")
        ax.set_ylabel(f"Δ loss with the block at {s['sensitivity_bits']} bits (nats, symlog)")
        def show(r, p):
            return "undefined" if r is None else f"{r:.2f} (p_Holm = {'n/a' if p is None else f'{p:.2g}'})"

        rho, partial_rho = show(s["spearman_rho"], s["p_holm"]), show(s["partial_spearman_rho"], s["partial_p_holm"])
        ax.set_title(f"sensitivity vs linearity — {s['model']} on {s['prompt_set']}\nSpearman ρ = {rho}; "
                     f"depth partialled out: {partial_rho} ({s['n_layers']} blocks)", fontsize=9)
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
    dashboard=('spearman_rho', 'partial_spearman_rho', 'partial_p_holm'),
    family="nonlinearity",
    description="rank correlation of quantization sensitivity with the linearization gap",
    description_long="Cross-experiment rule: Spearman correlation between per-block quantization sensitivity and "
                     "linearization gap, raw and with depth partialled out, Holm-adjusted; runs wherever both "
                     "experiments run.",
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
