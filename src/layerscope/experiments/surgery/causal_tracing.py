"""Causal tracing (Meng et al. 2022) on a prompt set of factual-recall prompts.

For each prompt of a seeded, category-stratified sample of the prompts that carry a
``subject`` and an ``answer``: the clean probability of the answer token, the corrupted one
(noise on the subject's embeddings), and the indirect effect of restoring the clean output
of every block at every position (:mod:`layerscope.engines.tracing`). Prompts whose clean
probability is below ``min_clean_prob`` (facts the model does not know) are traced and
reported but left out of the averages. The averages, by ROME's position kinds × block, carry
a bootstrap interval over prompts; the peaks carry their bootstrap stability.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from layerscope import LayerscopeError
from layerscope.data.prompts import PromptSet, load_prompt_set
from layerscope.engines.sampling import sample_summary, stratified_sample
from layerscope.engines.statistics import Bootstrap, uncertainty
from layerscope.engines.tracing import (
    KIND_LABELS, LAYOUTS, POSITION_KINDS, FactPrompt, PromptTrace, draw_noise, kind_of_positions, noise_std,
    prepare_prompt, trace_prompt,
)
from layerscope.experiments.registry import Experiment, Figure, Job, Result
from layerscope.progress import track

log = logging.getLogger(__name__)

MIN_PROMPTS = 10  # an average indirect-effect map from fewer prompts is flagged underpowered
MIN_SAMPLES = 10  # ROME's number of noise draws per prompt


@dataclass
class TracingResult:
    summary: dict
    effects: pd.DataFrame  # per (prompt, layer, position)
    prompts: pd.DataFrame  # per prompt of the set
    metrics: pd.DataFrame  # per (position kind, layer): the average indirect effect and its interval
    grid: np.ndarray | None  # [n_kinds, n_layers] average indirect effect (None: no prompt included)
    grid_ci: list | None


def _nanmean(x: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():  # a resample without any prompt of a kind: NaN, left out of the interval
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(x, axis=1)


def _argmax_cell(grid: np.ndarray):
    """(kind index, layer) of the largest finite cell, ignoring the last block (its restoration is the clean
    output at the last token and nothing elsewhere, by construction)."""
    inner = np.asarray(grid)[:, :-1] if np.asarray(grid).shape[1] > 1 else np.asarray(grid)
    if not np.isfinite(inner).any():
        return None
    return tuple(int(i) for i in np.unravel_index(np.nanargmax(inner), inner.shape))


def _argmax_layer(values: np.ndarray):
    values = np.asarray(values)
    return int(np.nanargmax(values)) if np.isfinite(values).any() else None


def _share_of_total(kind: str):
    """Statistic: the mean indirect effect of one position kind per block over the mean total effect."""
    index = POSITION_KINDS.index(kind)

    def statistic(kinds: np.ndarray, total: np.ndarray) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(kinds[:, :, index], axis=1) / total.mean(axis=1)[:, None]

    return statistic


def _first_at_least_half(values: np.ndarray):
    hits = np.flatnonzero(np.asarray(values) >= 0.5)
    return int(hits[0]) if hits.size else None


def _last_at_least_half(values: np.ndarray):
    hits = np.flatnonzero(np.asarray(values) >= 0.5)
    return int(hits[-1]) if hits.size else None


def causal_tracing(adapter, tokenizer, prompt_set: PromptSet, *, model: str, prompt_set_name: str,
                   max_prompts: int | None, noise: float = 3.0, samples: int = 10, min_clean_prob: float = 0.0,
                   seed: int = 0, layout: str = "auto", batch_size: int = 16, device="cpu") -> TracingResult:
    L = adapter.n_layers
    prepared: dict[str, FactPrompt | str] = {p.id: prepare_prompt(tokenizer, p) for p in prompt_set.prompts}
    skipped = {pid: why for pid, why in prepared.items() if isinstance(why, str)}
    eligible = [fp for fp in prepared.values() if isinstance(fp, FactPrompt)]
    if not eligible:
        first = "; ".join(f"{pid}: {why}" for pid, why in list(skipped.items())[:3])
        raise LayerscopeError(f"prompt set {prompt_set_name}: no prompt can be traced (each needs a subject and an "
                              f"answer that tokenizes as a continuation): {first}")
    for pid, why in skipped.items():
        log.info("causal tracing skips %s: %s", pid, why)
    ids = [fp.prompt_id for fp in eligible]
    categories = [fp.category for fp in eligible]
    chosen = set(stratified_sample(ids, categories, max_prompts, seed=seed))
    sample = [fp for fp in eligible if fp.prompt_id in chosen]
    unit = noise_std(adapter, eligible, device)
    sigma = float(noise) * unit
    traces: list[PromptTrace] = []
    for fp in track(sample, "causal tracing", unit="prompts"):
        trace = trace_prompt(adapter, fp, draw_noise(fp, samples, adapter.facts.d_model, sigma, seed), device=device,
                             layout=layout, batch_size=batch_size)
        log.info("traced %s: p_clean %.4f, p_corrupted %.4f, max indirect effect %.4f", fp.prompt_id, trace.p_clean,
                 trace.p_corrupted, float(trace.effect.max()))
        traces.append(trace)
    included = [t for t in traces if t.p_clean >= min_clean_prob]
    below = [t.prompt.prompt_id for t in traces if t.p_clean < min_clean_prob]

    summary = {
        "model": model,
        "prompt_set": prompt_set_name,
        "n_layers": L,
        "n_prompts_in_set": len(prompt_set),
        "n_skipped": len(skipped),
        "skipped": skipped,
        **sample_summary(ids, categories, [fp.prompt_id for fp in sample]),
        "n_traced": len(traces),
        "min_clean_prob": float(min_clean_prob),
        "n_below_min_clean_prob": len(below),
        "below_min_clean_prob": below,
        "n_included": len(included),
        "n_clean_top1": int(sum(t.clean_top1 for t in traces)),
        "noise": float(noise),
        "embedding_std": unit,
        "noise_std": sigma,
        "samples": int(samples),
        "position_kinds": list(POSITION_KINDS),
    }
    grid, grid_ci, stats = None, None, {}
    if included:
        boot = Bootstrap(len(included), unit="prompt", seed=seed)
        if len(included) < MIN_PROMPTS:
            boot.flag(f"the averages come from {len(included)} prompts (fewer than {MIN_PROMPTS})")
        if samples < MIN_SAMPLES:
            boot.flag(f"{samples} noise draws per prompt (ROME uses {MIN_SAMPLES})")
        p_clean = np.array([t.p_clean for t in included])
        p_corrupted = np.array([t.p_corrupted for t in included])
        kinds = np.stack([t.kind_effects() for t in included])  # [n, K, L]
        stats["p_clean_mean"], stats["p_clean_mean_ci"] = boot.interval(p_clean)
        stats["p_corrupted_mean"], stats["p_corrupted_mean_ci"] = boot.interval(p_corrupted)
        stats["total_effect_mean"], stats["total_effect_mean_ci"] = boot.interval(p_clean - p_corrupted)
        point, grid_ci = boot.interval(kinds, statistic=_nanmean)
        grid = np.array(point, dtype=float)
        stats["n_prompts_by_kind"] = {k: int(np.isfinite(kinds[:, i, 0]).sum()) for i, k in enumerate(POSITION_KINDS)}
        stats["indirect_effect_by_kind"] = {k: _listed(grid[i]) for i, k in enumerate(POSITION_KINDS)}
        stats["indirect_effect_by_kind_ci"] = {k: grid_ci[i] for i, k in enumerate(POSITION_KINDS)}
        for key, kind in (("ie_last_subject_by_layer", "last_subject"), ("ie_last_token_by_layer", "last")):
            i = POSITION_KINDS.index(kind)
            stats[key] = _listed(grid[i])
            stats[key + "_ci"] = grid_ci[i]
        cell, stability = boot.stability(kinds, statistic=_nanmean, pick=_argmax_cell)
        if cell is not None:
            stats["peak_position_kind"], stats["peak_layer"] = POSITION_KINDS[cell[0]], cell[1]
            stats["peak_ie"] = float(grid[cell])
            stats["peak_ie_ci"] = grid_ci[cell[0]][cell[1]]
            stats["peak_stability"] = stability
            boot.check_stability("the peak (position kind, block)", stability)
        subject = kinds[:, POSITION_KINDS.index("last_subject")]
        layer, stability = boot.stability(subject, statistic=_nanmean, pick=_argmax_layer)
        if layer is not None:
            stats["subject_peak_layer"] = layer
            stats["subject_peak_ie"] = float(grid[POSITION_KINDS.index("last_subject"), layer])
            stats["subject_peak_ie_ci"] = grid_ci[POSITION_KINDS.index("last_subject")][layer]
            stats["subject_peak_layer_stability"] = stability
            boot.check_stability("the block with the largest effect at the last subject token", stability)
        # where the sites begin and end: robust to the flat plateaus an argmax wanders over
        total = p_clean - p_corrupted
        if total.mean() > 0:
            for key, kind, pick, what in (
                    ("late_site_onset_layer", "last", _first_at_least_half,
                     "the first block whose effect at the last token reaches half the total effect"),
                    ("early_site_last_layer", "last_subject", _last_at_least_half,
                     "the last block whose effect at the last subject token reaches half the total effect")):
                layer, stability = boot.stability(kinds, total, statistic=_share_of_total(kind), pick=pick)
                stats[key], stats[key + "_stability"] = layer, stability
                boot.check_stability(what, stability)
        fragment = boot.summary()
    else:
        fragment = {"uncertainty": uncertainty("prompt", 0), "underpowered": True,
                    "underpowered_reasons": [f"no traced prompt reaches min_clean_prob = {min_clean_prob}"]}
    summary.update(stats)
    summary.update(fragment)
    return TracingResult(summary, _effects_table(traces, included), _prompts_table(prompt_set, prepared, traces,
                                                                                    included),
                         _metrics_table(grid, grid_ci, summary), grid, grid_ci)


def _listed(values: np.ndarray) -> list:
    return [float(v) if np.isfinite(v) else None for v in values]


def _effects_table(traces: list[PromptTrace], included: list[PromptTrace]) -> pd.DataFrame:
    keep = {t.prompt.prompt_id for t in included}
    rows = []
    for trace in traces:
        fp = trace.prompt
        kinds = kind_of_positions(fp.length, fp.start, fp.end)
        for layer in range(trace.p_restored.shape[0]):
            for t in range(fp.length):
                rows.append((fp.prompt_id, fp.category, layer, t, fp.tokens[t], kinds[t], fp.start <= t < fp.end,
                             float(trace.p_restored[layer, t]), float(trace.effect[layer, t]), fp.prompt_id in keep))
    return pd.DataFrame(rows, columns=["prompt_id", "category", "layer", "position", "token", "position_kind",
                                       "in_subject", "p_restored", "indirect_effect", "included"])


def _prompts_table(prompt_set: PromptSet, prepared: dict, traces: list[PromptTrace],
                   included: list[PromptTrace]) -> pd.DataFrame:
    by_id = {t.prompt.prompt_id: t for t in traces}
    keep = {t.prompt.prompt_id for t in included}
    rows = []
    for p in prompt_set.prompts:
        fp, trace = prepared[p.id], by_id.get(p.id)
        ok = isinstance(fp, FactPrompt)
        rows.append({
            "prompt_id": p.id, "category": p.category, "text": p.text, "subject": p.subject or "",
            "answer": "" if p.answer is None else str(p.answer),
            "answer_token": fp.answer_token if ok else "", "answer_id": fp.answer_id if ok else -1,
            "n_tokens": fp.length if ok else -1, "subject_start": fp.start if ok else -1,
            "subject_end": fp.end if ok else -1,
            "traced": trace is not None, "included": p.id in keep,
            "p_clean": trace.p_clean if trace else np.nan, "p_corrupted": trace.p_corrupted if trace else np.nan,
            "clean_top1": bool(trace.clean_top1) if trace else False,
            "skip_reason": "" if ok else fp,
        })
    return pd.DataFrame(rows)


def _metrics_table(grid, grid_ci, summary) -> pd.DataFrame:
    columns = ["model", "prompt_set", "position_kind", "layer", "indirect_effect", "ci_lo", "ci_hi", "n_prompts"]
    if grid is None:
        return pd.DataFrame(columns=columns)
    rows = []
    for i, kind in enumerate(POSITION_KINDS):
        for layer in range(grid.shape[1]):
            lo, hi = grid_ci[i][layer]
            rows.append((summary["model"], summary["prompt_set"], kind, layer,
                         float(grid[i, layer]) if np.isfinite(grid[i, layer]) else np.nan,
                         np.nan if lo is None else lo, np.nan if hi is None else hi,
                         summary["n_prompts_by_kind"][kind]))
    return pd.DataFrame(rows, columns=columns)


# ---------------------------------------------------------------------------- outputs


def plot_indirect_effect(result: TracingResult, path: str | Path) -> None:
    from layerscope.report.plotting import PALETTE, figure, save

    s = result.summary
    with figure(2, 1, width=7.6, height=6.4, gridspec_kw={"height_ratios": [1.1, 1]}) as (fig, axes):
        top, bottom = axes[0], axes[1]
        if result.grid is None:
            for ax in (top, bottom):
                ax.text(0.5, 0.5, f"no traced prompt reaches min_clean_prob = {s['min_clean_prob']}", ha="center",
                        va="center", transform=ax.transAxes)
                ax.set_axis_off()
            save(fig, path)
            return
        top.grid(False)
        bound = float(np.nanmax(np.abs(result.grid))) if np.isfinite(result.grid).any() else 1.0
        image = top.imshow(result.grid, aspect="auto", cmap="RdBu_r", vmin=-(bound or 1.0), vmax=bound or 1.0,
                           interpolation="nearest")
        fig.colorbar(image, ax=top, label="mean indirect effect on p(answer)")
        top.set_yticks(range(len(POSITION_KINDS)),
                       [f"{KIND_LABELS[k]} ({s['n_prompts_by_kind'][k]})" for k in POSITION_KINDS])
        top.set_xlabel("block whose output is restored")
        top.set_title(f"causal tracing — {s['model']} on {s['prompt_set']}: {s['n_included']} prompts, "
                      f"{s['samples']} noise draws (σ = {s['noise']:g} × embedding std)\n"
                      f"p_clean {s['p_clean_mean']:.3f}, p_corrupted {s['p_corrupted_mean']:.3f}")
        x = np.arange(s["n_layers"])
        for k, (key, label) in enumerate((("ie_last_subject_by_layer", "last subject token"),
                                          ("ie_last_token_by_layer", "last token"))):
            values = np.array([np.nan if v is None else v for v in s[key]], dtype=float)
            ci = np.array([[np.nan if v is None else v for v in pair] for pair in s[key + "_ci"]], dtype=float)
            bottom.plot(x, values, marker="o", markersize=2.5, color=PALETTE[k], label=label)
            bottom.fill_between(x, ci[:, 0], ci[:, 1], color=PALETTE[k], alpha=0.2)
        bottom.axhline(0, color="0.5", linewidth=0.8)
        bottom.set_xlim(-0.5, s["n_layers"] - 0.5)
        bottom.set_xlabel("block whose output is restored")
        bottom.set_ylabel("mean indirect effect")
        bottom.legend(loc="best")
        level = s["uncertainty"]["level"]
        bottom.set_title(f"bands: {level:.0%} bootstrap interval over prompts")
        save(fig, path)


def run(job: Job) -> Result:
    """Causal tracing of one model on one prompt set of factual-recall prompts (runs the model's blocks)."""
    from layerscope.model.adapter import load_model, load_tokenizer

    params = job.params
    model_dir = job.input("model")
    prompt_set = load_prompt_set(job.input("prompts"))
    adapter = load_model(model_dir, dtype=params["dtype"], device=job.device, kind="decoder")
    tokenizer = load_tokenizer(model_dir)
    result = causal_tracing(adapter, tokenizer, prompt_set, model=job.model, prompt_set_name=job.prompt_set,
                            max_prompts=params["max_prompts"], noise=params["noise"], samples=params["samples"],
                            min_clean_prob=params["min_clean_prob"], seed=params.get("seed", 0),
                            layout=params["layout"], batch_size=params["batch_size"], device=job.device)
    result.summary["layout"] = params["layout"]
    result.summary["dtype"] = str(adapter.dtype).removeprefix("torch.")
    return Result(
        summary=result.summary,
        tables={"metrics": result.metrics, "effects": result.effects, "prompts": result.prompts},
        figures={"indirect_effect": partial(plot_indirect_effect, result)},
    )


EXPERIMENT = Experiment(
    name="causal_tracing",
    dashboard=('p_clean_mean', 'total_effect_mean', 'peak_layer', 'ie_last_subject_by_layer'),
    headlines=("p_clean_mean", "p_corrupted_mean", "total_effect_mean"),
    family="surgery",
    description="causal tracing of factual recall (ROME): noise on the subject, restore one state at a time",
    description_long="Causal tracing as in Meng et al. 2022 on prompts with an annotated subject and answer: noise "
                     "on the subject's embeddings, the clean output of each block restored at each position, the "
                     "indirect effect on the answer's probability.",
    needs="decoder",
    data="prompts",
    gpu=True,
    inputs=("model", "prompts"),
    run=run,
    tables=("metrics", "effects", "prompts"),
    figures=(Figure("indirect_effect", "average indirect effect by position kind and block"),),
    params={
        "max_prompts": {
            "description": "Trace a seeded, category-stratified sample of N of the prompts that have a subject and an "
                           "answer (null: all). Each prompt costs about samples × L²/2 block runs of its tokens.",
            "type": ["integer", "null"],
            "minimum": 1,
            "default": None,
        },
        "noise": {
            "description": "Standard deviation of the noise added to the subject's embeddings, in units of the "
                           "standard deviation of the embeddings (resid.0) at the subject tokens of the prompt set.",
            "type": "number",
            "minimum": 0,
            "default": 3.0,
        },
        "samples": {
            "description": "Noise draws per prompt (run as one batch; probabilities are averaged over them).",
            "type": "integer",
            "minimum": 1,
            "default": 10,
        },
        "min_clean_prob": {
            "description": "Prompts whose clean probability of the answer token is below this are traced and "
                           "reported but left out of the averages (facts the model does not know).",
            "type": "number",
            "minimum": 0,
            "maximum": 1,
            "default": 0.05,
        },
        "batch_size": {
            "description": "Restored positions run together per block call (each one row per noise draw in the "
                           "padded layout, a segment of each draw's row in the packed layout).",
            "type": "integer",
            "minimum": 1,
            "default": 16,
        },
        "layout": {
            "description": "packed: every draw's restored runs share one row under a prepared 4-D mask, positions "
                           "before the restored one are not recomputed; padded: one full row per (position, draw); "
                           "auto: packed where the architecture allows it.",
            "enum": list(LAYOUTS),
            "default": "auto",
        },
        "dtype": {
            "description": "Compute dtype of the model (auto: bfloat16 on GPU, float32 on CPU).",
            "enum": ["float32", "bfloat16", "float16", "auto"],
            "default": "float32",
        },
    },
    threads=2,
    runtime=60,
)
