"""The logit lens, read from the activation cache (no new forward pass).

For every residual boundary ``resid.l`` (l = 0 … L) and every position that predicts a
completion token, the lens applies what the model applies after its last block — its own
final norm in float32, the unembedding, and any final-logit soft-cap — so at l = L it *is*
the model's output. Against the model's final top-1 token it records, per layer: whether
the layer's top-1 agrees, the rank and probability of the final top-1, the entropy, and
KL(final ‖ layer).

Per token: ``first_top1`` (first layer whose top-1 is the final top-1),
``crystallization`` (first layer from which the top-1 equals the final top-1 at every later
layer) and ``gap`` = crystallization − first_top1; the same with "the final top-1 is in
the layer's top-k" (``*_topk``). Views: all completion tokens pooled, the first completion
token only ("pure next token"), and per prompt category. Phases of depth come from
change-point segmentation of the per-layer curves (:mod:`layerscope.engines.phases`).
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
from layerscope.data.activations import ActivationCache
from layerscope.model.adapter import ModelAdapter
from layerscope.engines.phases import phases_from_boundaries, segment
from layerscope.engines.readout import Readout
from layerscope.experiments.registry import Experiment, Figure, Job, Result

log = logging.getLogger(__name__)

LAYER_METRICS = ("top1_agreement", "topk_agreement", "final_top1_prob", "final_top1_log_rank", "entropy", "kl_final")
PHASE_FEATURES = ("top1_agreement", "topk_agreement", "final_top1_prob", "entropy", "kl_final")


@dataclass
class LensArrays:
    """Per (layer, completion token) read-outs; arrays are [n_layers + 1, n_tokens]."""

    top1_match: np.ndarray
    rank: np.ndarray
    prob: np.ndarray
    entropy: np.ndarray
    kl: np.ndarray
    final_top1: np.ndarray  # [n_tokens]
    rows: np.ndarray  # cache rows of the tokens


def _chunks(rows: np.ndarray, chunk_tokens: int):
    for start in range(0, len(rows), chunk_tokens):
        yield start, rows[start : start + chunk_tokens]


@torch.no_grad()
def lens_arrays(adapter: ModelAdapter, cache: ActivationCache, *, chunk_tokens: int = 256) -> LensArrays:
    if adapter.unembed is None:
        raise LayerscopeError("the logit lens needs a decoder with an unembedding")
    if cache.n_layers != adapter.n_layers or cache.d_model != adapter.facts.d_model:
        raise LayerscopeError(
            f"activation cache ({cache.n_layers} layers, d={cache.d_model}) does not match the model "
            f"({adapter.n_layers} layers, d={adapter.facts.d_model})"
        )
    readout = Readout(adapter)
    rows = cache.target_rows()
    if len(rows) == 0:
        raise LayerscopeError(f"{cache.directory}: no completion tokens in the cache")
    n_sites, n = adapter.n_layers + 1, len(rows)
    out = {k: np.zeros((n_sites, n), dtype=np.float64) for k in ("rank", "prob", "entropy", "kl")}
    match = np.zeros((n_sites, n), dtype=bool)
    final_top1 = np.zeros(n, dtype=np.int64)
    device = adapter.device
    for start, chunk in _chunks(rows, chunk_tokens):
        span = slice(int(chunk[0]), int(chunk[-1]) + 1)
        local = torch.as_tensor(chunk - chunk[0], dtype=torch.long)
        cols = slice(start, start + len(chunk))
        final_logits = readout(cache.resid(adapter.n_layers, span)[local].to(device))
        final_logp = torch.log_softmax(final_logits, dim=-1)
        top1 = final_logits.argmax(dim=-1)
        final_top1[cols] = top1.cpu().numpy()
        p_final = final_logp.exp()
        for layer in range(n_sites):
            if layer == adapter.n_layers:
                logits, logp = final_logits, final_logp
            else:
                logits = readout(cache.resid(layer, span)[local].to(device))
                logp = torch.log_softmax(logits, dim=-1)
            target = logits.gather(1, top1[:, None])
            match[layer, cols] = (logits.argmax(dim=-1) == top1).cpu().numpy()
            out["rank"][layer, cols] = (logits > target).sum(dim=-1).cpu().numpy()
            out["prob"][layer, cols] = logp.gather(1, top1[:, None]).exp().squeeze(1).cpu().numpy()
            out["entropy"][layer, cols] = (-(logp.exp() * logp).sum(dim=-1)).cpu().numpy()
            out["kl"][layer, cols] = (p_final * (final_logp - logp)).sum(dim=-1).clamp_min(0).cpu().numpy()
        log.info("lens: %d/%d tokens", start + len(chunk), n)
    return LensArrays(match, out["rank"], out["prob"], out["entropy"], out["kl"], final_top1, rows)


def first_true(mask: np.ndarray) -> np.ndarray:
    """Index of the first True along axis 0 (mask.shape[0] if none)."""
    any_true = mask.any(axis=0)
    return np.where(any_true, mask.argmax(axis=0), mask.shape[0])


def stays_true_from(mask: np.ndarray) -> np.ndarray:
    """First index from which the mask is True at every later index (mask.shape[0] if never)."""
    suffix_all = np.flip(np.cumprod(np.flip(mask, axis=0), axis=0), axis=0).astype(bool)
    return first_true(suffix_all)


def per_token_table(arrays: LensArrays, tokens: pd.DataFrame, topk: int) -> pd.DataFrame:
    info = tokens.set_index("row").loc[arrays.rows]
    in_topk = arrays.rank < topk
    first = first_true(arrays.top1_match)
    cryst = stays_true_from(arrays.top1_match)
    first_k = first_true(in_topk)
    cryst_k = stays_true_from(in_topk)
    return pd.DataFrame(
        {
            "row": arrays.rows,
            "prompt_id": info["prompt_id"].to_numpy(),
            "category": info["category"].to_numpy(),
            "position": info["position"].to_numpy(),
            "target_index": info["target_index"].to_numpy(),
            "target_id": info["target_id"].to_numpy(),
            "final_top1": arrays.final_top1,
            "first_top1": first,
            "crystallization": cryst,
            "gap": cryst - first,
            "first_topk": first_k,
            "crystallization_topk": cryst_k,
            "gap_topk": cryst_k - first_k,
        }
    )


def _layer_curves(arrays: LensArrays, select: np.ndarray, topk: int) -> dict[str, np.ndarray]:
    return {
        "top1_agreement": arrays.top1_match[:, select].mean(axis=1),
        "topk_agreement": (arrays.rank[:, select] < topk).mean(axis=1),
        "final_top1_prob": arrays.prob[:, select].mean(axis=1),
        "final_top1_log_rank": np.log1p(arrays.rank[:, select]).mean(axis=1),
        "entropy": arrays.entropy[:, select].mean(axis=1),
        "kl_final": arrays.kl[:, select].mean(axis=1),
    }


def _token_stats(table: pd.DataFrame) -> dict:
    return {
        "n_tokens": int(len(table)),
        "first_top1_mean": float(table["first_top1"].mean()),
        "crystallization_mean": float(table["crystallization"].mean()),
        "gap_mean": float(table["gap"].mean()),
        "first_topk_mean": float(table["first_topk"].mean()),
        "crystallization_topk_mean": float(table["crystallization_topk"].mean()),
    }


@dataclass
class LensResult:
    metrics: pd.DataFrame
    per_token: pd.DataFrame
    summary: dict
    curves: dict  # view -> metric -> array over layers
    category_curves: dict  # category -> metric -> array


def logit_lens(
    adapter: ModelAdapter,
    cache: ActivationCache,
    *,
    model: str,
    prompt_set: str,
    topk: int = 10,
    n_phases: int = 4,
    chunk_tokens: int = 256,
) -> LensResult:
    arrays = lens_arrays(adapter, cache, chunk_tokens=chunk_tokens)
    table = per_token_table(arrays, cache.tokens, topk)
    n_layers = adapter.n_layers
    views = {"all": np.ones(len(table), dtype=bool), "first_token": (table["target_index"] == 0).to_numpy()}
    curves = {view: _layer_curves(arrays, sel, topk) for view, sel in views.items() if sel.any()}
    categories = list(dict.fromkeys(table["category"]))
    category_curves = {c: _layer_curves(arrays, (table["category"] == c).to_numpy(), topk) for c in categories}

    records = []
    for view, metrics in curves.items():
        for metric, values in metrics.items():
            records += [(view, "all", layer, metric, float(v)) for layer, v in enumerate(values)]
    for category, metrics in category_curves.items():
        for metric, values in metrics.items():
            records += [("all", category, layer, metric, float(v)) for layer, v in enumerate(values)]
    frame = pd.DataFrame(records, columns=["view", "category", "layer", "metric", "value"])
    frame.insert(0, "prompt_set", prompt_set)
    frame.insert(0, "model", model)

    features = np.column_stack([curves["all"][m] for m in PHASE_FEATURES])
    boundaries = segment(features, n_phases)
    greedy = (table["final_top1"] == table["target_id"]).mean()
    summary = {
        "model": model,
        "prompt_set": prompt_set,
        "n_layers": n_layers,
        "n_prompts": int(table["prompt_id"].nunique()),
        "topk": topk,
        **_token_stats(table),
        "crystallization_mean_frac": float(table["crystallization"].mean() / n_layers),
        "gap_topk_mean": float(table["gap_topk"].mean()),
        "final_entropy_mean": float(curves["all"]["entropy"][-1]),
        "greedy_agreement": float(greedy),
        "phase_boundaries": [int(b) for b in boundaries],
        "phases": phases_from_boundaries([int(b) for b in boundaries], n_layers + 1),
        "first_token": _token_stats(table[views["first_token"]]) if views["first_token"].any() else None,
        "by_category": {c: _token_stats(table[table["category"] == c]) for c in categories},
    }
    return LensResult(frame, table, summary, curves, category_curves)


# ---------------------------------------------------------------------------- outputs


def plot_curves(result: LensResult, path: str | Path) -> None:
    from layerscope.report.plotting import figure, layer_axis, mark_boundaries, save

    n_layers = result.summary["n_layers"]
    panels = [
        ("top1_agreement", "top-1 = final top-1 (fraction)"),
        ("final_top1_prob", "probability of final top-1"),
        ("entropy", "entropy (nats)"),
        ("kl_final", "KL(final ‖ layer) (nats)"),
    ]
    with figure(2, 2, width=8.0, height=5.6) as (fig, axes):
        for ax, (metric, label) in zip(axes.flat, panels):
            x = np.arange(n_layers + 1)
            ax.plot(x, result.curves["all"][metric], marker="o", markersize=2.5, label="all completion tokens")
            if "first_token" in result.curves:
                ax.plot(x, result.curves["first_token"][metric], linestyle="--", label="first completion token")
            if metric == "top1_agreement":
                ax.plot(x, result.curves["all"]["topk_agreement"], linestyle=":",
                        label=f"final top-1 in top-{result.summary['topk']}")
            layer_axis(ax, n_layers)
            mark_boundaries(ax, result.summary["phase_boundaries"])
            ax.set_ylabel(label)
        axes[0, 0].legend(loc="upper left")
        fig.suptitle(f"logit lens — {result.summary['model']} on {result.summary['prompt_set']} "
                     f"({result.summary['n_tokens']} completion tokens; dashed lines: phase boundaries)")
        save(fig, path)


def plot_categories(result: LensResult, path: str | Path) -> None:
    from layerscope.report.plotting import figure, layer_axis, save

    n_layers = result.summary["n_layers"]
    with figure(1, 2, width=9.0, height=3.6) as (fig, axes):
        for category, metrics in result.category_curves.items():
            n = result.summary["by_category"][category]["n_tokens"]
            axes[0].plot(metrics["top1_agreement"], label=f"{category} ({n})")
            axes[1].plot(metrics["kl_final"], label=category)
        axes[0].set_ylabel("top-1 = final top-1 (fraction)")
        axes[1].set_ylabel("KL(final ‖ layer) (nats)")
        for ax in axes:
            layer_axis(ax, n_layers)
        axes[0].legend(loc="upper left", ncol=2)
        fig.suptitle("logit lens by prompt category (tokens per category in brackets)")
        save(fig, path)


def plot_crystallization(result: LensResult, path: str | Path) -> None:
    from layerscope.report.plotting import figure, save

    n_layers = result.summary["n_layers"]
    bins = np.arange(n_layers + 2) - 0.5
    with figure(width=6.4, height=3.4) as (fig, ax):
        ax.hist(result.per_token["first_top1"], bins=bins, alpha=0.6, label="first top-1 layer")
        ax.hist(result.per_token["crystallization"], bins=bins, alpha=0.6, label="crystallization layer")
        ax.set_xlabel("layer")
        ax.set_ylabel("completion tokens")
        ax.legend()
        ax.set_title(f"when the final prediction appears (mean gap {result.summary['gap_mean']:.2f} layers)")
        save(fig, path)


def run(job: Job) -> Result:
    """The logit lens of one model on one prompt set, from its activation cache (CPU)."""
    from layerscope.model.adapter import load_model

    params = job.params
    adapter = load_model(job.input("model"), dtype="float32", device="cpu", kind="decoder")
    cache = ActivationCache(Path(job.input("resid")).parent)
    result = logit_lens(adapter, cache, model=job.model, prompt_set=job.prompt_set, topk=params["topk"],
                        n_phases=params["n_phases"], chunk_tokens=params["chunk_tokens"])
    return Result(
        summary=result.summary,
        tables={"metrics": result.metrics, "per_token": result.per_token},
        figures={"curves": partial(plot_curves, result), "categories": partial(plot_categories, result),
                 "crystallization": partial(plot_crystallization, result)},
    )


EXPERIMENT = Experiment(
    name="logit_lens",
    family="lens",
    description="how predictions form across depth",
    description_long="The logit lens over the activation cache: each layer boundary read out through the "
                     "model's own final norm and unembedding.",
    needs="decoder",
    data="prompts",
    gpu=False,
    inputs=("model", "resid", "tokens"),
    run=run,
    tables=("metrics", "per_token"),
    figures=(Figure("curves", "per-layer curves"), Figure("categories", "by category"),
             Figure("crystallization", "crystallization")),
    params={
        "topk": {
            "description": "k of the top-k variant of first/crystallization layer (target stays in the top-k).",
            "type": "integer",
            "minimum": 1,
            "default": 10
        },
        "n_phases": {
            "description": "Number of phases found by change-point segmentation of the per-layer curves.",
            "type": "integer",
            "minimum": 1,
            "default": 4
        },
        "chunk_tokens": {
            "description": "Tokens projected through the unembedding at once (memory, not results).",
            "type": "integer",
            "minimum": 1,
            "default": 256
        }
    },
    threads=2,
    runtime=60,
)
