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
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from layerscope import LayerscopeError
from layerscope.engines.surgery import SURGERY_PARAMS, LossEvaluator, skip, surgery_evaluator
from layerscope.engines.tracing import TraceResult
from layerscope.experiments.registry import Experiment, Figure, Job, Result

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


def run(job: Job) -> Result:
    """Knockout, pairwise synergy and causal tracing of one model on one prompt set (runs model blocks)."""
    from layerscope.engines.tracing import causal_trace

    params = job.params
    evaluator = surgery_evaluator(job.input("model"), job.input("resid"), params=params, device=job.device)
    trace = None
    if params["trace_prompts"] > 0:
        trace = causal_trace(evaluator.adapter, evaluator.cache, n_prompts=params["trace_prompts"],
                             n_positions=params["trace_positions"], noise_scale=params["trace_noise"],
                             n_samples=params["trace_samples"], seed=params["seed"], device=evaluator.device,
                             layout=params["layout"])
    result = knockout(evaluator, model=job.model, prompt_set=job.prompt_set, pairwise_top=params["pairwise_top"],
                      top_synergy=params["top_synergy"], trace=trace)
    tracing = result.trace.table if result.trace is not None else pd.DataFrame(
        columns=["prompt_id", "layer", "offset", "position", "token", "p_restored"])
    return Result(
        summary=result.summary,
        tables={"metrics": result.metrics, "pairs": result.pairs, "tracing": tracing},
        figures={"ratio": partial(plot_ratio, result), "synergy": partial(plot_synergy, result),
                 "tracing": partial(plot_tracing, result)},
    )


EXPERIMENT = Experiment(
    name="knockout",
    family="surgery",
    description="loss with each block skipped, pairwise synergy, causal tracing",
    description_long="Knockout of each block, pairwise synergy among the most damaging ones, and causal tracing.",
    needs="decoder",
    data="prompts",
    gpu=True,
    inputs=("model", "resid", "tokens"),
    run=run,
    tables=("metrics", "pairs", "tracing"),
    figures=(Figure("ratio", "loss ratio per skipped block"), Figure("synergy", "pairwise synergy"),
             Figure("tracing", "causal tracing")),
    params={
        "max_prompts": {
            "description": "Evaluate the loss on the prompt set's first N prompts only (null: all). Every variant "
                           "re-runs blocks on these prompts, so this sets the cost.",
            "type": ["integer", "null"],
            "minimum": 1,
            "default": 4
        },
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
        },
        "trace_prompts": {
            "description": "Causal tracing on the first N prompts with prompt tokens and a completion (0: no tracing).",
            "type": "integer",
            "minimum": 0,
            "default": 2
        },
        "trace_positions": {
            "description": "Positions traced: the answer position (the one predicting the first completion token) "
                           "and the N−1 before it.",
            "type": "integer",
            "minimum": 1,
            "default": 8
        },
        "trace_noise": {
            "description": "Noise standard deviation added to resid.0 at the prompt tokens, in units of the standard "
                           "deviation of resid.0 over the cache.",
            "type": "number",
            "minimum": 0,
            "default": 3.0
        },
        "trace_samples": {
            "description": "Noise samples per prompt (restored probabilities are averaged over them).",
            "type": "integer",
            "minimum": 1,
            "default": 1
        }
    },
    threads=2,
    runtime=120,
)
