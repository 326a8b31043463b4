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
change-point segmentation of the per-layer curves (:mod:`layerscope.engines.phases`), the
number of phases (at most ``max_phases``) chosen by BIC.

Uncertainty: the tokens of one prompt are not independent, so the unit of the bootstrap is
the prompt. Every mean over tokens (per-token quantities, per-layer curves) is computed as
Σ_prompts sum / Σ_prompts count from per-prompt sums and token counts: the point value is
the plain mean over tokens, and a resample of prompts carries each prompt's tokens with it.
Per category, the bootstrap runs over that category's prompts. Prompts without a completion
token contribute nothing and are counted (``n_empty_completions``). The stability of the
phase boundaries is the fraction of resamples whose BIC segmentation of the resampled
curves gives the same boundaries.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from layerscope import LayerscopeError
from layerscope.data.activations import ActivationCache
from layerscope.model.adapter import ModelAdapter
from layerscope.engines.phases import Segmentation, phases_from_boundaries, select_segments
from layerscope.engines.readout import Readout
from layerscope.engines.statistics import N_BOOT, Bootstrap, contain, weighted_mean
from layerscope.experiments.registry import Experiment, Figure, Job, Result
from layerscope.progress import track

log = logging.getLogger(__name__)

LAYER_METRICS = ("top1_agreement", "topk_agreement", "final_top1_prob", "final_top1_log_rank", "entropy", "kl_final")
PHASE_FEATURES = ("top1_agreement", "topk_agreement", "final_top1_prob", "entropy", "kl_final")
TOKEN_QUANTITIES = ("first_top1", "crystallization", "gap", "first_topk", "crystallization_topk", "gap_topk")


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
def lens_arrays(adapter: ModelAdapter, cache: ActivationCache, *, chunk_tokens: int = 256,
                rows: np.ndarray | None = None,
                transform: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> LensArrays:
    """The lens read-outs of the cache's completion-token rows (or of ``rows``, ascending).

    ``transform(layer, hidden)`` is applied to ``resid.layer`` before the read-out at every
    layer below L (the tuned lens's translators); layer L is always read as it is, so it
    stays the model's own output.
    """
    if adapter.unembed is None:
        raise LayerscopeError("the logit lens needs a decoder with an unembedding")
    if cache.n_layers != adapter.n_layers or cache.d_model != adapter.facts.d_model:
        raise LayerscopeError(
            f"activation cache ({cache.n_layers} layers, d={cache.d_model}) does not match the model "
            f"({adapter.n_layers} layers, d={adapter.facts.d_model})"
        )
    readout = Readout(adapter)
    rows = cache.target_rows() if rows is None else np.asarray(rows, dtype=np.int64)
    if len(rows) and np.any(np.diff(rows) <= 0):
        raise LayerscopeError("lens_arrays: rows must be strictly ascending")
    if len(rows) == 0:
        raise LayerscopeError(f"{cache.directory}: no completion tokens in the cache")
    n_sites, n = adapter.n_layers + 1, len(rows)
    out = {k: np.zeros((n_sites, n), dtype=np.float64) for k in ("rank", "prob", "entropy", "kl")}
    match = np.zeros((n_sites, n), dtype=bool)
    final_top1 = np.zeros(n, dtype=np.int64)
    device = adapter.device
    for start, chunk in track(_chunks(rows, chunk_tokens), "logit lens", total=n, unit="tokens",
                              weight=lambda item: len(item[1])):
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
                hidden = cache.resid(layer, span)[local].to(device)
                logits = readout(transform(layer, hidden) if transform is not None else hidden)
                logp = torch.log_softmax(logits, dim=-1)
            target = logits.gather(1, top1[:, None])
            match[layer, cols] = (logits.argmax(dim=-1) == top1).cpu().numpy()
            out["rank"][layer, cols] = (logits > target).sum(dim=-1).cpu().numpy()
            out["prob"][layer, cols] = logp.gather(1, top1[:, None]).exp().squeeze(1).cpu().numpy()
            out["entropy"][layer, cols] = (-(logp.exp() * logp).sum(dim=-1)).cpu().numpy()
            out["kl"][layer, cols] = (p_final * (final_logp - logp)).sum(dim=-1).clamp_min(0).cpu().numpy()
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


def _token_values(arrays: LensArrays, topk: int) -> dict[str, np.ndarray]:
    """The per-(layer, token) quantities the curves average, [n_layers + 1, n_tokens] each."""
    return {
        "top1_agreement": arrays.top1_match.astype(float),
        "topk_agreement": (arrays.rank < topk).astype(float),
        "final_top1_prob": arrays.prob,
        "final_top1_log_rank": np.log1p(arrays.rank),
        "entropy": arrays.entropy,
        "kl_final": arrays.kl,
    }


@dataclass
class _Units:
    """The prompts (bootstrap units) of a selection of completion tokens."""

    ids: list[str]
    codes: np.ndarray  # per selected token: its prompt's index in ids
    select: np.ndarray  # bool over all tokens of the table

    @property
    def n(self) -> int:
        return len(self.ids)

    def sums(self, values: np.ndarray) -> np.ndarray:
        """Per-prompt sums of ``values`` [..., n_tokens (all)] over the selected tokens: [n_prompts, ...]."""
        values = np.asarray(values, dtype=float)
        flat = values[..., self.select].reshape(-1, int(self.select.sum()))
        out = np.stack([np.bincount(self.codes, weights=row, minlength=self.n) for row in flat], axis=1)
        return out.reshape(self.n, *values.shape[:-1])

    def counts(self) -> np.ndarray:
        return np.bincount(self.codes, minlength=self.n).astype(float)


def _units(table: pd.DataFrame, select: np.ndarray, ids: list[str] | None = None) -> _Units:
    """The prompts of the selected tokens (in table order), or the given ``ids`` (a superset)."""
    if ids is None:
        ids = list(dict.fromkeys(table.loc[select, "prompt_id"]))
    position = {pid: k for k, pid in enumerate(ids)}
    codes = table.loc[select, "prompt_id"].map(position).to_numpy(dtype=np.int64)
    return _Units([str(i) for i in ids], codes, np.asarray(select, dtype=bool))


def _curve_intervals(values: dict[str, np.ndarray], curves: dict[str, np.ndarray], units: _Units,
                     boot: Bootstrap) -> dict[str, np.ndarray]:
    """Per metric: [n_layers + 1, 2] interval of the token-weighted per-layer mean, over prompts."""
    counts = units.counts()
    out = {}
    for metric, v in values.items():
        _, ci = boot.interval(units.sums(v), counts, statistic=_weighted_curve)
        out[metric] = np.array(contain(ci, curves[metric]))
    return out


def _weighted_curve(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Σ per-prompt sums / Σ per-prompt token counts, per layer: [n_boot, n_layers + 1]."""
    return sums.sum(axis=1) / counts.sum(axis=1)[:, None]


def _token_stats(table: pd.DataFrame, units: _Units, boot: Bootstrap) -> dict:
    """Means over the selected completion tokens, each with its bootstrap interval over prompts.

    A mean over tokens is Σ_prompts (sum over the prompt's tokens) / Σ_prompts (its token
    count), so the point value is exactly the plain mean over tokens and a resample of
    prompts takes each prompt's tokens with it.
    """
    counts = units.counts()
    out: dict = {"n_tokens": int(counts.sum()), "n_prompts": units.n}
    for quantity in TOKEN_QUANTITIES:
        sums = units.sums(table[quantity].to_numpy(dtype=float))
        point, ci = boot.interval(sums, counts, statistic=weighted_mean)
        out[f"{quantity}_mean"] = point
        out[f"{quantity}_mean_ci"] = ci
    return out


def _category_stats(table: pd.DataFrame, units: _Units, boot: Bootstrap) -> dict:
    out = _token_stats(table, units, boot)
    summary = boot.summary()
    out["underpowered"] = summary["underpowered"]
    out["underpowered_reasons"] = summary["underpowered_reasons"]
    return out


def phase_segmentation(curves: dict[str, np.ndarray], max_phases: int) -> Segmentation:
    """Phases of depth: the BIC-chosen segmentation of the standardised PHASE_FEATURES curves."""
    return select_segments(np.column_stack([curves[m] for m in PHASE_FEATURES]), max_phases)


def _phase_stability(values: dict[str, np.ndarray], units: _Units, boot: Bootstrap, max_phases: int,
                     point: Segmentation) -> tuple[float, float]:
    """Fractions of bootstrap resamples (of prompts) giving the same phase boundaries / the same number."""
    counts = units.counts()
    resampled = []
    for metric in PHASE_FEATURES:
        _, dist = boot.distribution(_weighted_curve, units.sums(values[metric]), counts)
        resampled.append(dist)
    resampled = np.stack(resampled, axis=2)  # [n_boot, n_layers + 1, n_features]
    same_boundaries = same_k = 0
    for curves in resampled:
        seg = select_segments(curves, max_phases)
        same_boundaries += seg.boundaries == point.boundaries
        same_k += seg.n_segments == point.n_segments
    return same_boundaries / len(resampled), same_k / len(resampled)


def empty_completions(tokens: pd.DataFrame) -> int:
    """Prompts of the cache without a completion token (the model stopped at once)."""
    n_targets = tokens.groupby("prompt_id", sort=False)["is_target"].sum()
    return int((n_targets == 0).sum())


@dataclass
class LensResult:
    metrics: pd.DataFrame
    per_token: pd.DataFrame
    summary: dict
    curves: dict  # view -> metric -> array over layers
    category_curves: dict  # category -> metric -> array
    curve_ci: dict = None  # view -> metric -> [n_layers + 1, 2] bootstrap interval over prompts
    category_ci: dict = None  # category -> metric -> [n_layers + 1, 2]


def logit_lens(
    adapter: ModelAdapter,
    cache: ActivationCache,
    *,
    model: str,
    prompt_set: str,
    topk: int = 10,
    max_phases: int = 4,
    chunk_tokens: int = 256,
    seed: int = 0,
    n_boot: int = N_BOOT,
) -> LensResult:
    arrays = lens_arrays(adapter, cache, chunk_tokens=chunk_tokens)
    table = per_token_table(arrays, cache.tokens, topk)
    n_layers = adapter.n_layers
    views = {"all": np.ones(len(table), dtype=bool), "first_token": (table["target_index"] == 0).to_numpy()}
    curves = {view: _layer_curves(arrays, sel, topk) for view, sel in views.items() if sel.any()}
    categories = list(dict.fromkeys(table["category"]))
    in_category = {c: (table["category"] == c).to_numpy() for c in categories}
    category_curves = {c: _layer_curves(arrays, in_category[c], topk) for c in categories}

    # uncertainty: a bootstrap over prompts (their tokens are not independent), from per-prompt sums
    values = _token_values(arrays, topk)
    units = _units(table, views["all"])
    boot = Bootstrap(units.n, unit="prompt", n_boot=n_boot, seed=seed)
    # every view is a selection of tokens of the same prompts: it shares the resamples of "all"
    view_units = {view: _units(table, sel, units.ids) for view, sel in views.items() if sel.any()}
    curve_ci = {view: _curve_intervals(values, curves[view], view_units[view], boot) for view in curves}
    category_units = {c: _units(table, in_category[c]) for c in categories}
    category_boot = {c: Bootstrap(u.n, unit="prompt", n_boot=n_boot, seed=seed) for c, u in category_units.items()}
    category_ci = {c: _curve_intervals(values, category_curves[c], category_units[c], category_boot[c])
                   for c in categories}

    records = []
    for view, metrics in curves.items():
        for metric, v in metrics.items():
            ci = curve_ci[view][metric]
            records += [(view, "all", layer, metric, float(x), *map(float, ci[layer])) for layer, x in enumerate(v)]
    for category, metrics in category_curves.items():
        for metric, v in metrics.items():
            ci = category_ci[category][metric]
            records += [("all", category, layer, metric, float(x), *map(float, ci[layer]))
                        for layer, x in enumerate(v)]
    frame = pd.DataFrame(records, columns=["view", "category", "layer", "metric", "value", "ci_lo", "ci_hi"])
    frame.insert(0, "prompt_set", prompt_set)
    frame.insert(0, "model", model)

    segmentation = phase_segmentation(curves["all"], max_phases)
    boundaries = [int(b) for b in segmentation.boundaries]
    phases_stability, n_phases_stability = _phase_stability(values, units, boot, max_phases, segmentation)
    boot.check_stability("phase_boundaries", phases_stability)

    stats = _token_stats(table, units, boot)
    greedy = (table["final_top1"] == table["target_id"]).to_numpy(dtype=float)
    greedy_point, greedy_ci = boot.interval(units.sums(greedy), units.counts(), statistic=weighted_mean)
    summary = {
        "model": model,
        "prompt_set": prompt_set,
        "n_layers": n_layers,
        "n_prompts": units.n,
        "n_empty_completions": empty_completions(cache.tokens),
        "prompt_categories": {c: category_units[c].n for c in categories},
        "topk": topk,
        **{k: v for k, v in stats.items() if k != "n_prompts"},
        "crystallization_mean_frac": stats["crystallization_mean"] / n_layers,
        "crystallization_mean_frac_ci": [x / n_layers for x in stats["crystallization_mean_ci"]],
        "final_entropy_mean": float(curves["all"]["entropy"][-1]),
        "final_entropy_mean_ci": curve_ci["all"]["entropy"][-1].tolist(),
        "greedy_agreement": greedy_point,
        "greedy_agreement_ci": greedy_ci,
        "max_phases": int(max_phases),
        "n_phases": segmentation.n_segments,
        "phases_bic": [float(b) for b in segmentation.bic],
        "phase_boundaries": boundaries,
        "phases": phases_from_boundaries(boundaries, n_layers + 1),
        "phases_stability": float(phases_stability),
        "n_phases_stability": float(n_phases_stability),
        "first_token": (_token_stats(table, view_units["first_token"], boot)
                        if "first_token" in view_units else None),
        "by_category": {c: _category_stats(table, category_units[c], category_boot[c]) for c in categories},
        **boot.summary(),
    }
    return LensResult(frame, table, summary, curves, category_curves, curve_ci, category_ci)


# ---------------------------------------------------------------------------- outputs


def _band(ax, x, ci, **kwargs) -> None:
    if ci is not None:
        ax.fill_between(x, ci[:, 0], ci[:, 1], linewidth=0, **kwargs)


def plot_curves(result: LensResult, path: str | Path) -> None:
    from layerscope.report.plotting import figure, layer_axis, mark_boundaries, save

    s = result.summary
    n_layers = s["n_layers"]
    ci = result.curve_ci or {}
    panels = [
        ("top1_agreement", "top-1 = final top-1 (fraction)"),
        ("final_top1_prob", "probability of final top-1"),
        ("entropy", "entropy (nats)"),
        ("kl_final", "KL(final ‖ layer) (nats)"),
    ]
    with figure(2, 2, width=8.0, height=5.6) as (fig, axes):
        for ax, (metric, label) in zip(axes.flat, panels):
            x = np.arange(n_layers + 1)
            line, = ax.plot(x, result.curves["all"][metric], marker="o", markersize=2.5,
                            label="all completion tokens")
            _band(ax, x, ci.get("all", {}).get(metric), color=line.get_color(), alpha=0.25)
            if "first_token" in result.curves:
                line, = ax.plot(x, result.curves["first_token"][metric], linestyle="--",
                                label="first completion token")
                _band(ax, x, ci.get("first_token", {}).get(metric), color=line.get_color(), alpha=0.15)
            if metric == "top1_agreement":
                line, = ax.plot(x, result.curves["all"]["topk_agreement"], linestyle=":",
                                label=f"final top-1 in top-{s['topk']}")
                _band(ax, x, ci.get("all", {}).get("topk_agreement"), color=line.get_color(), alpha=0.15)
            layer_axis(ax, n_layers)
            mark_boundaries(ax, s["phase_boundaries"])
            ax.set_ylabel(label)
        axes[0, 0].legend(loc="upper left")
        fig.suptitle(f"logit lens — {s['model']} on {s['prompt_set']} ({s['n_tokens']} completion tokens of "
                     f"{s['n_prompts']} prompts)\nbands: 95% bootstrap over prompts; dashed lines: boundaries of "
                     f"the {s['n_phases']} phases chosen by BIC")
        save(fig, path)


def plot_categories(result: LensResult, path: str | Path) -> None:
    from layerscope.report.plotting import figure, layer_axis, save

    n_layers = result.summary["n_layers"]
    ci = result.category_ci or {}
    x = np.arange(n_layers + 1)
    with figure(1, 2, width=9.0, height=3.6) as (fig, axes):
        for category, metrics in result.category_curves.items():
            stats = result.summary["by_category"][category]
            line, = axes[0].plot(x, metrics["top1_agreement"],
                                 label=f"{category} ({stats['n_prompts']}/{stats['n_tokens']})")
            _band(axes[0], x, ci.get(category, {}).get("top1_agreement"), color=line.get_color(), alpha=0.12)
            axes[1].plot(x, metrics["kl_final"], color=line.get_color(), label=category)
            _band(axes[1], x, ci.get(category, {}).get("kl_final"), color=line.get_color(), alpha=0.12)
        axes[0].set_ylabel("top-1 = final top-1 (fraction)")
        axes[1].set_ylabel("KL(final ‖ layer) (nats)")
        for ax in axes:
            layer_axis(ax, n_layers)
        axes[0].legend(loc="upper left", ncol=2)
        fig.suptitle("logit lens by prompt category (prompts/tokens in brackets)\nbands: 95% bootstrap over the "
                     "category's prompts")
        save(fig, path)


def plot_crystallization(result: LensResult, path: str | Path) -> None:
    from layerscope.report.plotting import figure, save

    s = result.summary
    n_layers = s["n_layers"]
    bins = np.arange(n_layers + 2) - 0.5
    with figure(width=6.4, height=3.4) as (fig, ax):
        for key, label in (("first_top1", "first top-1 layer"), ("crystallization", "crystallization layer")):
            _, _, patches = ax.hist(result.per_token[key], bins=bins, alpha=0.6, label=label)
            color = patches[0].get_facecolor()[:3] if len(patches) else None
            lo, hi = s[f"{key}_mean_ci"]
            ax.axvspan(lo, hi, color=color, alpha=0.25, linewidth=0)
            ax.axvline(s[f"{key}_mean"], color=color, linewidth=1.2)
        ax.set_xlabel("layer")
        ax.set_ylabel("completion tokens")
        ax.legend()
        lo, hi = s["gap_mean_ci"]
        ax.set_title(f"when the final prediction appears (mean gap {s['gap_mean']:.2f} [{lo:.2f}, {hi:.2f}] layers)\n"
                     "lines: means; spans: 95% bootstrap over prompts", fontsize="medium")
        save(fig, path)


def run(job: Job) -> Result:
    """The logit lens of one model on one prompt set, from its activation cache (CPU)."""
    from layerscope.model.adapter import load_model

    params = job.params
    max_phases = params["max_phases"]
    adapter = load_model(job.input("model"), dtype="float32", device="cpu", kind="decoder")
    cache = ActivationCache(Path(job.input("resid")).parent)
    result = logit_lens(adapter, cache, model=job.model, prompt_set=job.prompt_set, topk=params["topk"],
                        max_phases=max_phases, chunk_tokens=params["chunk_tokens"], seed=params["seed"])
    return Result(
        summary=result.summary,
        tables={"metrics": result.metrics, "per_token": result.per_token},
        figures={"curves": partial(plot_curves, result), "categories": partial(plot_categories, result),
                 "crystallization": partial(plot_crystallization, result)},
    )


EXPERIMENT = Experiment(
    name="logit_lens",
    dashboard=('crystallization_mean', 'first_top1_mean', 'gap_mean', 'greedy_agreement'),
    headlines=("crystallization_mean", "first_top1_mean", "gap_mean"),
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
        "max_phases": {
            "description": "Largest number of phases considered: change-point segmentations of the per-layer "
                           "curves into k = 1 … max_phases segments are compared by BIC and the best k is "
                           "reported (summary key n_phases); the answer is not fixed in advance.",
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
