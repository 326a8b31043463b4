"""Knockout: which blocks matter, which matter together, and where the answer is carried.

* **Single knockouts** — the completion-token loss with block i skipped
  (:func:`layerscope.engines.surgery.skip`), as a ratio to the baseline loss, and Δ(i) = loss − baseline.
* **Pairwise knockouts** — among the ``pairwise_top`` blocks with the largest Δ, every pair
  skipped together; synergy(i, j) = Δ(i, j) − Δ(i) − Δ(j) (> 0: the pair hurts more than the
  two knockouts add up to). The pairs share their computation with each other through the
  evaluator's prefix sharing (``skip(i, j)`` for all j share ``[0…i-1, i+1…j-1]``).
* **Causal tracing** — :mod:`layerscope.engines.tracing`.

All losses come from one :class:`~layerscope.engines.surgery.LossEvaluator` over the first
``max_prompts`` prompts of the activation cache.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from layerscope import LayerscopeError
from layerscope.engines.surgery import LossEvaluator, skip
from layerscope.engines.tracing import TraceResult
from layerscope.jobs.io import output_getter, write_json, write_parquet

log = logging.getLogger(__name__)


@dataclass
class KnockoutResult:
    metrics: pd.DataFrame  # tidy per-layer: model, prompt_set, layer, metric, value
    pairs: pd.DataFrame  # layer_i, layer_j, loss, ratio, delta, synergy
    trace: TraceResult | None
    summary: dict


def pair_label(i: int, j: int) -> str:
    return f"{i}+{j}"


def knockout_sweep(evaluator: LossEvaluator, *, pairwise_top: int = 6, top_synergy: int = 5) -> dict:
    """Baseline, single and pairwise knockout losses (plain numbers; see module docstring)."""
    n = evaluator.n_layers
    if n < 2:
        raise LayerscopeError("knockout needs a model with at least 2 blocks")
    baseline = evaluator.baseline()
    single = np.array(evaluator.losses([skip(n, i) for i in range(n)]))
    delta = single - baseline
    k = max(0, min(int(pairwise_top), n))
    top = sorted(np.argsort(-delta, kind="stable")[:k].tolist())
    pairs = list(itertools.combinations(top, 2))
    pair_losses = evaluator.losses([skip(n, i, j) for i, j in pairs]) if pairs else []
    rows = []
    for (i, j), loss in zip(pairs, pair_losses):
        d_ij = loss - baseline
        rows.append((i, j, loss, loss / baseline, d_ij, d_ij - delta[i] - delta[j]))
    table = pd.DataFrame(rows, columns=["layer_i", "layer_j", "loss", "ratio", "delta", "synergy"])
    ranked = table.sort_values(["synergy", "layer_i", "layer_j"], ascending=[False, True, True]).head(top_synergy)
    return {"baseline": baseline, "single": single, "delta": delta, "top": top, "pairs": table, "ranked": ranked}


def knockout(evaluator: LossEvaluator, *, model: str, prompt_set: str, pairwise_top: int = 6, top_synergy: int = 5,
             trace: TraceResult | None = None) -> KnockoutResult:
    sweep = knockout_sweep(evaluator, pairwise_top=pairwise_top, top_synergy=top_synergy)
    baseline, single, delta = sweep["baseline"], sweep["single"], sweep["delta"]
    ratio = single / baseline
    n = evaluator.n_layers
    records = []
    for metric, values in (("loss", single), ("ratio", ratio), ("delta", delta)):
        records += [(layer, metric, float(v)) for layer, v in enumerate(values)]
    metrics = pd.DataFrame(records, columns=["layer", "metric", "value"])
    metrics.insert(0, "prompt_set", prompt_set)
    metrics.insert(0, "model", model)
    ranked = sweep["ranked"]
    summary = {
        "model": model,
        "prompt_set": prompt_set,
        "n_layers": n,
        **evaluator.provenance(),
        "baseline_loss": float(baseline),
        "ratio_by_layer": [float(r) for r in ratio],
        "most_critical_layer": int(np.argmax(ratio)),
        "max_ratio": float(ratio.max()),
        "least_critical_layer": int(np.argmin(ratio)),
        "min_ratio": float(ratio.min()),
        "pairwise_layers": [int(i) for i in sweep["top"]],
        "top_synergy_pairs": [pair_label(int(r.layer_i), int(r.layer_j)) for r in ranked.itertuples()],
        "top_synergy": [float(r.synergy) for r in ranked.itertuples()],
        "synergy_pairs": [
            {"pair": [int(r.layer_i), int(r.layer_j)], "loss": float(r.loss), "ratio": float(r.ratio),
             "delta": float(r.delta), "synergy": float(r.synergy)} for r in ranked.itertuples()
        ],
    }
    if trace is not None:
        summary.update(trace.summary())
        summary["trace_answers"] = trace.prompts.to_dict(orient="records")
    return KnockoutResult(metrics, sweep["pairs"], trace, summary)


# ---------------------------------------------------------------------------- outputs


def plot_ratio(result: KnockoutResult, path: str | Path) -> None:
    from layerscope.report.plotting import figure, save

    ratio = np.array(result.summary["ratio_by_layer"])
    n = len(ratio)
    with figure(width=7.2, height=3.4) as (fig, ax):
        colors = ["tab:red" if i in result.summary["pairwise_layers"] else "tab:blue" for i in range(n)]
        ax.bar(np.arange(n), ratio, color=colors)
        ax.axhline(1.0, color="0.3", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("skipped block")
        ax.set_xticks(range(0, n, max(1, round(n / 15))))
        ax.set_ylabel("loss ratio (skipped / baseline)")
        ax.set_title(f"knockout — {result.summary['model']} on {result.summary['prompt_set']} "
                     f"(baseline {result.summary['baseline_loss']:.3f} nats, {result.summary['n_tokens']} tokens; "
                     "red: pairwise set)")
        save(fig, path)


def plot_synergy(result: KnockoutResult, path: str | Path) -> None:
    from layerscope.report.plotting import figure, save

    layers = result.summary["pairwise_layers"]
    k = len(layers)
    matrix = np.full((k, k), np.nan)
    index = {layer: n for n, layer in enumerate(layers)}
    for r in result.pairs.itertuples():
        matrix[index[r.layer_i], index[r.layer_j]] = matrix[index[r.layer_j], index[r.layer_i]] = r.synergy
    with figure(width=5.2, height=4.4) as (fig, ax):
        ax.grid(False)
        if k >= 2:
            bound = float(np.nanmax(np.abs(matrix))) or 1.0
            image = ax.imshow(matrix, cmap="RdBu_r", vmin=-bound, vmax=bound)
            fig.colorbar(image, ax=ax, label="synergy Δ(i,j) − Δ(i) − Δ(j) (nats)")
            for (a, b), value in np.ndenumerate(matrix):
                if np.isfinite(value):
                    ax.text(b, a, f"{value:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if abs(value) > 0.6 * bound else "black")
        ax.set_xticks(range(k), [str(x) for x in layers])
        ax.set_yticks(range(k), [str(x) for x in layers])
        ax.set_xlabel("block j")
        ax.set_ylabel("block i")
        ax.set_title("pairwise knockout synergy among the most damaging blocks")
        save(fig, path)


def plot_tracing(result: KnockoutResult, path: str | Path) -> None:
    from layerscope.report.plotting import figure, save

    trace = result.trace
    with figure(width=7.6, height=3.6) as (fig, ax):
        ax.grid(False)
        if trace is None:
            ax.text(0.5, 0.5, "causal tracing disabled (trace_prompts: 0)", ha="center", va="center")
            ax.set_axis_off()
        else:
            data = trace.heatmap.T  # offsets × layers
            image = ax.imshow(data, aspect="auto", cmap="magma", origin="upper", vmin=0.0)
            fig.colorbar(image, ax=ax, label="restored p(answer)")
            ax.set_yticks(range(len(trace.offsets)), [str(o) for o in trace.offsets])
            ax.set_ylabel("position (offset from the answer position)")
            ax.set_xlabel("restored site resid.l (0 = embeddings, L = last block output)")
            s = trace.summary()
            ax.set_title(f"causal tracing ({s['trace_prompts']} prompts): clean p = {s['trace_p_clean']:.3f}, "
                         f"corrupted p = {s['trace_p_corrupt']:.3f}, noise σ = {trace.noise_std:.3g}")
        save(fig, path)


FIGURES = ("ratio", "synergy", "tracing")


def write_outputs(result: KnockoutResult, outputs) -> None:
    """metrics, pairs, tracing (parquet), the figures, then summary.json last."""
    get = output_getter(outputs)
    write_parquet(get("metrics"), result.metrics)
    write_parquet(get("pairs"), result.pairs)
    trace = result.trace.table if result.trace is not None else pd.DataFrame(
        columns=["prompt_id", "layer", "offset", "position", "token", "p_restored"])
    write_parquet(get("tracing"), trace)
    plot_ratio(result, get("ratio_plot"))
    plot_synergy(result, get("synergy_plot"))
    plot_tracing(result, get("tracing_plot"))
    write_json(get("summary"), result.summary)
