"""How much precision does each layer need: fake-quantization sensitivity.

Round-to-nearest (RTN) fake quantization, symmetric and per group: each output row of a
projection ([out, in], see :meth:`ModelAdapter.projection_refs`) is cut into groups of
``group_size`` consecutive input columns (the last group may be shorter); a group with
largest magnitude m gets the scale s = m / q_max with q_max = 2^(bits−1) − 1, and every
weight w becomes s · clamp(round(w / s), −q_max, q_max). The levels are symmetric
(2 bits: {−s, 0, s}); the round-trip error is at most s/2 per weight, reached exactly by
weights halfway between two levels. Only the projection matrices q k v o gate up down are
quantized (fused ones slice by slice); embeddings, norms and biases stay in full precision.

Every variant quantizes in place, is evaluated with :class:`layerscope.engines.surgery.LossEvaluator`
(mean next-token loss on completion tokens; a variant that changes block i starts from the
cached ``resid.i``) and restores the original weights bit for bit. Sweeps:

* one block at a time, at each bit width → per-layer sensitivity Δloss = loss − baseline;
* one matrix type at a time (in every block) → per-type sensitivity;
* the whole model at uniform bit widths (4 and 8 by default);
* mixed precision at equal average bits: ``uniform`` (every block at ``mixed_bits``),
  ``sensitivity`` (the n blocks the per-block sweep found least damaged at
  ``mixed_bits − step`` bits get that many, then the n blocks most damaged at
  ``mixed_bits`` get ``mixed_bits + step``; n = ``mixed_fraction`` · L) and ``spectrum`` (the
  same moves, ranked by the blocks' mean entropy effective-rank ratio of their weights, from
  :mod:`layerscope.engines.spectra`: the hypothesis that effectively higher-rank weights carry more
  information and need more bits). Allocations are chosen on the calibration prompts and
  compared on held-out prompts, so the sensitivity-guided allocation does not get an
  in-sample advantage.

Prompts: the calibration set (``max_prompts``) is a seeded sample stratified over the prompt
set's categories, the held-out set (``heldout_prompts``) a second stratified sample of the
prompts left, so the two are disjoint (:mod:`layerscope.engines.sampling`); prompts without a
completion token are left out and counted. Every loss is the token-weighted mean over the
completion tokens of its set (the first ``max_target_tokens`` of each prompt when set), and
its interval is a bootstrap over prompts from per-prompt loss sums and token counts
(:mod:`layerscope.engines.statistics`): calibration prompts for the sweeps, held-out prompts
for the comparison of allocations. Differences between two variants are resampled prompt by
prompt (paired), so a prompt that is hard for both does not widen their difference.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from layerscope import LayerscopeError
from layerscope.data.activations import ActivationCache
from layerscope.engines.sampling import sample_cache_prompts, sample_summary, stratified_sample
from layerscope.engines.statistics import Bootstrap, weighted_mean
from layerscope.engines.surgery import LossEvaluator
from layerscope.engines.weights import WeightEditor, weights_digest
from layerscope.experiments.nonlinearity.quant_methods import run_library_methods
from layerscope.experiments.registry import Experiment, Figure, Job, Result
from layerscope.model.adapter import ModelAdapter
from layerscope.progress import track

log = logging.getLogger(__name__)

ALLOCATIONS = ("uniform", "sensitivity", "spectrum")
# the held-out differences reported (first minus second): each guided allocation against uniform, and the two guided
COMPARISONS = (("sensitivity", "uniform"), ("spectrum", "uniform"), ("sensitivity", "spectrum"))


# ---------------------------------------------------------------------------- the quantizer


def qmax(bits: int) -> int:
    """Largest integer level of a symmetric ``bits``-bit grid: 2^(bits−1) − 1."""
    if int(bits) != bits or bits < 2:
        raise ValueError(f"bits must be an integer ≥ 2, got {bits}")
    return 2 ** (int(bits) - 1) - 1


def _grouped(w: torch.Tensor, group_size: int | None) -> tuple[torch.Tensor, int]:
    """w [out, in] as [out, n_groups, g] (zero-padded at the end of each row) and the padding."""
    if w.ndim != 2:
        raise ValueError(f"expected an [out, in] matrix, got shape {tuple(w.shape)}")
    out_features, in_features = w.shape
    g = in_features if not group_size else int(group_size)
    if g < 1:
        raise ValueError(f"group_size must be positive, got {group_size}")
    pad = (-in_features) % g
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(out_features, -1, g), pad


def group_scales(w: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """Scale of every group, [out, n_groups]: max |w| in the group / q_max."""
    grouped, _ = _grouped(w.detach().to(torch.float64 if w.dtype == torch.float64 else torch.float32), group_size)
    return grouped.abs().amax(dim=-1) / qmax(bits)


def fake_quantize(w: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """Symmetric per-group round-to-nearest quantize-dequantize of an [out, in] matrix.

    ``group_size`` None or 0: one group per row (per-channel). Computed in float32 (float64
    for float64 input) and returned in ``w``'s dtype.
    """
    compute = torch.float64 if w.dtype == torch.float64 else torch.float32
    grouped, pad = _grouped(w.detach().to(compute), group_size)
    levels = qmax(bits)
    scale = grouped.abs().amax(dim=-1, keepdim=True) / levels
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(grouped / safe), -levels, levels) * scale  # all-zero group → 0
    q = q.reshape(w.shape[0], -1)
    if pad:
        q = q[:, : w.shape[1]]
    return q.to(w.dtype)


def rtn(bits: int, group_size: int | None):
    """The RTN quantizer at ``bits`` and ``group_size``, as a function of one [out, in] matrix (for
    :meth:`WeightEditor.edit`)."""
    return lambda w: fake_quantize(w, bits, group_size)


# ---------------------------------------------------------------------------- allocations


def spectrum_scores(editor: WeightEditor) -> np.ndarray:
    """Per block: mean over its projections of entropy effective rank / min(m, n)."""
    from layerscope.engines.spectra import entropy_effective_rank, singular_values

    scores = []
    for layer in range(editor.adapter.n_layers):
        ratios = []
        for ref in editor.refs[layer].values():
            w = editor.matrix(ref)
            ratios.append(entropy_effective_rank(singular_values(w)) / min(w.shape))
        scores.append(float(np.mean(ratios)))
    return np.asarray(scores)


def allocate(scores: np.ndarray, *, mean_bits: int, step: int, fraction: float,
             down_scores: np.ndarray | None = None) -> list[int]:
    """Bits per block at an average of exactly ``mean_bits`` (for equal-sized blocks).

    With n = round(fraction · L) (at most L/2): the n blocks with the lowest ``down_scores``
    (default ``scores``) get mean − step, then the n remaining blocks with the highest
    ``scores`` get mean + step, every other block mean. Ties go by block index.
    """
    scores = np.asarray(scores, dtype=float)
    down = scores if down_scores is None else np.asarray(down_scores, dtype=float)
    n_layers = len(scores)
    n = min(int(round(fraction * n_layers)), n_layers // 2)
    bits = [int(mean_bits)] * n_layers
    lowered = [int(i) for i in np.argsort(down, kind="stable")[:n]]
    for i in lowered:
        bits[i] = int(mean_bits - step)
    raised = [int(i) for i in np.argsort(-scores, kind="stable") if int(i) not in lowered][:n]
    for i in raised:
        bits[i] = int(mean_bits + step)
    return bits


# ---------------------------------------------------------------------------- the experiment


@dataclass
class QuantizationResult:
    metrics: pd.DataFrame
    summary: dict


def _check_params(p: dict, editor: WeightEditor) -> dict:
    p = dict(p)
    p["bits"] = sorted({int(b) for b in p["bits"]})
    for key in ("bits", "uniform_bits"):
        for b in p[key]:
            qmax(b)
    if p["sensitivity_bits"] not in p["bits"]:
        raise LayerscopeError(f"quantization.sensitivity_bits {p['sensitivity_bits']} is not in bits {p['bits']}")
    if p["mixed"]:
        low = p["mixed_bits"] - p["mixed_step"]
        if low < 2:
            raise LayerscopeError(
                f"quantization: mixed_bits − mixed_step = {low}; the lowest allocation needs at least 2 bits"
            )
    p.setdefault("max_target_tokens", None)
    p.setdefault("seed", 0)
    return p


def split_prompts(tokens: pd.DataFrame, n_calibration: int | None, n_heldout: int, *,
                  seed: int) -> tuple[list[str], list[str], dict]:
    """Disjoint calibration and held-out prompt samples, each seeded and stratified over categories.

    The calibration sample (``n_calibration`` prompts, None: all) is drawn first; the held-out
    one from the prompts left (with a seed of its own). Only prompts with completion tokens
    are eligible. Returns (calibration ids, held-out ids, summary fragment).
    """
    calibration, fragment = sample_cache_prompts(tokens, n_calibration, seed=seed)
    per_prompt = tokens.groupby("prompt_id", sort=False).agg(category=("category", "first"),
                                                              n_targets=("is_target", "sum"))
    eligible = per_prompt[per_prompt["n_targets"] > 0]
    ids = [str(i) for i in eligible.index]
    categories = eligible["category"].astype(str).tolist()
    taken = set(calibration)
    rest = [(i, c) for i, c in zip(ids, categories) if i not in taken]
    heldout: list[str] = []
    if n_heldout and rest:
        heldout = stratified_sample([i for i, _ in rest], [c for _, c in rest], int(n_heldout), seed=int(seed) + 1)
    if n_heldout and len(heldout) < n_heldout:
        log.warning("quantization: only %d held-out prompt(s) available (asked for %d)", len(heldout), n_heldout)
    calib_part = sample_summary(ids, categories, calibration)
    heldout_part = sample_summary(ids, categories, heldout)
    both = sample_summary(ids, categories, [i for i in ids if i in taken or i in set(heldout)])
    out = {
        "prompt_ids": both["prompt_ids"],
        "prompt_categories": both["prompt_categories"],
        "calibration_prompt_ids": calib_part["prompt_ids"],
        "calibration_prompt_categories": calib_part["prompt_categories"],
        "heldout_prompt_ids": heldout_part["prompt_ids"],
        "heldout_prompt_categories": heldout_part["prompt_categories"],
        "n_empty_completions": fragment["n_empty_completions"],
    }
    return calibration, heldout, out


def _pooled(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Token-weighted mean of resampled per-prompt loss sums [B, P, ...] with token counts [B, P]."""
    total = counts.sum(axis=1)
    return sums.sum(axis=1) / total.reshape(total.shape + (1,) * (sums.ndim - 2))


def _baseline_fn(evaluator: LossEvaluator, cache: ActivationCache, adapter: ModelAdapter):
    """Per-prompt loss sums of the unmodified model when starting from cached resid.k.

    When the cache holds exactly what this model computes (float32 storage of a float32
    run), every start reproduces the cached baseline; otherwise (e.g. float16 storage) each
    start gets its own unmodified reference, so Δloss never mixes storage rounding in.
    """
    meta = cache.metadata
    exact = (meta.get("storage_dtype") == "float32" and meta.get("compute_dtype") == "float32"
             and adapter.dtype == torch.float32)
    memo: dict[int, np.ndarray] = {}

    def baseline(start: int) -> np.ndarray:
        key = 0 if exact else start
        if key not in memo:
            identity = list(range(adapter.n_layers))
            per_token = (evaluator.baseline(per_token=True) if exact
                         else evaluator.loss(identity, per_token=True, max_prefix=start))
            memo[key] = evaluator.per_prompt(per_token)[1]
        return memo[key]

    return baseline, exact


def quantization(adapter: ModelAdapter, cache: ActivationCache, *, model: str, prompt_set: str,
                 params: dict, model_dir: str | Path | None = None) -> QuantizationResult:
    """Run every sweep (see module docstring); the model's weights are unchanged afterwards.

    ``params``: bits, group_size, sensitivity_bits, matrix_types, uniform_bits, mixed,
    mixed_bits, mixed_step, mixed_fraction, max_prompts, heldout_prompts, max_target_tokens,
    batch_size, library_methods, seed. ``model_dir`` is needed only by the ``gptq`` library
    method.
    """
    editor = WeightEditor(adapter)
    p = _check_params(params, editor)
    group = p["group_size"] or None
    n_layers = adapter.n_layers
    identity = list(range(n_layers))
    calib_ids, heldout_ids, sample = split_prompts(cache.tokens, p["max_prompts"], p["heldout_prompts"],
                                                   seed=p["seed"])
    ev = LossEvaluator(adapter, cache, batch_size=p["batch_size"], prompt_ids=calib_ids,
                       max_target_tokens=p["max_target_tokens"])
    order, _, counts = ev.per_prompt(np.zeros(ev.n_targets))  # prompts in the evaluator's order, token counts
    before = weights_digest(adapter.model)
    baseline, exact = _baseline_fn(ev, cache, adapter)
    base_sums = baseline(0)
    base = float(base_sums.sum() / counts.sum())
    records: list[tuple] = [("baseline", -1, "none", np.nan, "", "calibration", "loss", base)]

    def record(scope, layer, matrix, bits, allocation, loss, start, split="calibration", ref=None):
        ref = float(baseline(start).sum() / counts.sum()) if ref is None else ref
        records.extend([
            (scope, layer, matrix, bits, allocation, split, "loss", loss),
            (scope, layer, matrix, bits, allocation, split, "delta_loss", loss - ref),
            (scope, layer, matrix, bits, allocation, split, "ppl", math.exp(loss)),
            (scope, layer, matrix, bits, allocation, split, "ppl_ratio", math.exp(loss - ref)),
        ])

    def evaluate(start: int) -> tuple[float, np.ndarray]:
        """Pooled loss of the current weights, and per-prompt Δloss sums against the baseline."""
        sums = ev.per_prompt(ev.loss(identity, per_token=True, max_prefix=start))[1]
        return float(sums.sum() / counts.sum()), sums - baseline(start)

    # one block at a time
    layer_sums = {b: np.zeros((len(order), n_layers)) for b in p["bits"]}  # per-prompt Δloss sums
    for layer in track(range(n_layers), "quantization: one block at a time", unit="blocks"):
        for b in p["bits"]:
            with editor.variant():
                editor.edit(layer, None, rtn(b, group))
                loss, delta = evaluate(layer)
            record("layer", layer, "all", b, "", loss, layer)
            layer_sums[b][:, layer] = delta
        log.info("quantization: block %d/%d: Δloss %s", layer + 1, n_layers,
                 ", ".join(f"{b}b {layer_sums[b][:, layer].sum() / counts.sum():+.4f}" for b in p["bits"]))

    # one matrix type at a time, in every block
    types = editor.types()
    type_sums: dict[int, dict[str, np.ndarray]] = {b: {} for b in p["bits"]}
    if p["matrix_types"]:
        for t in track(types, "quantization: one matrix type at a time", unit="types"):
            for b in p["bits"]:
                with editor.variant():
                    for layer in range(n_layers):
                        editor.edit(layer, [t], rtn(b, group))
                    loss, type_sums[b][t] = evaluate(0)
                record("matrix", -1, t, b, "", loss, 0)
            log.info("quantization: type %s: Δloss %s", t,
                     ", ".join(f"{b}b {type_sums[b][t].sum() / counts.sum():+.4f}" for b in p["bits"]))

    # the whole model, uniform
    uniform_sums: dict[int, np.ndarray] = {}
    for b in p["uniform_bits"]:
        with editor.variant():
            for layer in range(n_layers):
                editor.edit(layer, None, rtn(b, group))
            loss, uniform_sums[b] = evaluate(0)
        record("uniform", -1, "all", b, "", loss, 0)
        log.info("quantization: whole model at %d bits: Δloss %+.4f", b, uniform_sums[b].sum() / counts.sum())

    boot = Bootstrap(len(order), unit="prompt", seed=p["seed"])
    sweeps = _sweep_statistics(boot, p, base_sums, counts, layer_sums, type_sums, uniform_sums, types)
    mixed = _mixed_precision(adapter, cache, editor, p, group, sweeps["sensitivity"], calib_ids, heldout_ids,
                             record, boot)

    after = weights_digest(adapter.model)
    if after != before:  # pragma: no cover - a bug, never a user error
        raise RuntimeError("quantization sweep left the model's weights changed")

    library = run_library_methods(p["library_methods"], adapter, cache, calib_ids, p, base, record,
                                  model_dir=model_dir)

    metrics = pd.DataFrame(records, columns=["scope", "layer", "matrix", "bits", "allocation", "split", "metric",
                                             "value"])
    metrics.insert(0, "prompt_set", prompt_set)
    metrics.insert(0, "model", model)
    summary = _summary(model, prompt_set, p, adapter, ev, base, exact, sweeps, mixed, library, sample, types, boot)
    return QuantizationResult(metrics, summary)


def _sweep_statistics(boot: Bootstrap, p, base_sums, counts, layer_sums, type_sums, uniform_sums, types) -> dict:
    """Point values (token-weighted pooled Δloss) and bootstrap intervals of every sweep."""
    out: dict = {"baseline": boot.interval(base_sums, counts, statistic=weighted_mean)}
    out["sensitivity"], out["sensitivity_ci"] = {}, {}
    for b, sums in layer_sums.items():
        out["sensitivity"][b], out["sensitivity_ci"][b] = boot.interval(sums, counts, statistic=_pooled)
    sb = p["sensitivity_bits"]
    out["most"] = boot.stability(layer_sums[sb], counts, statistic=_pooled, pick=lambda v: int(np.argmax(v)))
    out["least"] = boot.stability(layer_sums[sb], counts, statistic=_pooled, pick=lambda v: int(np.argmin(v)))
    boot.check_stability("most_sensitive_layer", out["most"][1])
    out["matrix"], out["matrix_ci"] = {}, {}
    for b, by_type in type_sums.items():
        if not by_type:
            continue
        names = [t for t in types if t in by_type]
        point, ci = boot.interval(np.stack([by_type[t] for t in names], axis=1), counts, statistic=_pooled)
        out["matrix"][b] = dict(zip(names, point))
        out["matrix_ci"][b] = dict(zip(names, ci))
        if b == sb:
            stack = np.stack([by_type[t] for t in names], axis=1)
            index, stability = boot.stability(stack, counts, statistic=_pooled, pick=lambda v: int(np.argmax(v)))
            out["most_matrix"] = (names[index], stability)
            boot.check_stability("most_sensitive_matrix", stability)
    out["uniform"], out["uniform_ci"] = {}, {}
    for b, sums in uniform_sums.items():
        out["uniform"][b], out["uniform_ci"][b] = boot.interval(sums, counts, statistic=weighted_mean)
    return out


def _mixed_precision(adapter, cache, editor, p, group, sensitivity, calib_ids, heldout_ids, record, boot):
    if not p["mixed"]:
        return None
    n_layers = adapter.n_layers
    low, mid = p["mixed_bits"] - p["mixed_step"], p["mixed_bits"]
    if low in sensitivity and mid in sensitivity:
        # measured: lower the blocks hurt least at the low width, raise those hurt most at the mean width
        sens_up, sens_down = sensitivity[mid], sensitivity[low]
        rule = f"lowered: least Δloss at {low} bits; raised: most Δloss at {mid} bits"
    else:
        sb = p["sensitivity_bits"]
        sens_up = sens_down = sensitivity[sb]
        rule = f"Δloss at {sb} bits ({low} or {mid} bits not in the sweep)"
        log.warning("quantization: sensitivity-guided allocation ranks blocks by %s", rule)
    spectrum = spectrum_scores(editor)
    scores = {"sensitivity_up": np.asarray(sens_up, dtype=float), "sensitivity_down": np.asarray(sens_down, dtype=float),
              "spectrum": spectrum}
    common = dict(mean_bits=p["mixed_bits"], step=p["mixed_step"], fraction=p["mixed_fraction"])
    bits = {
        "uniform": [int(p["mixed_bits"])] * n_layers,
        "sensitivity": allocate(scores["sensitivity_up"], down_scores=scores["sensitivity_down"], **common),
        "spectrum": allocate(spectrum, **common),
    }
    split = "heldout" if heldout_ids else "calibration"
    if not heldout_ids:
        log.warning("quantization: no held-out prompts; mixed-precision allocations are compared on the "
                    "calibration prompts they were chosen on")
        boot.flag("mixed precision: no held-out prompts; allocations are compared on the prompts that chose them")
    ev = LossEvaluator(adapter, cache, batch_size=p["batch_size"], prompt_ids=list(calib_ids) + list(heldout_ids),
                       max_target_tokens=p["max_target_tokens"])
    ids, _, counts = ev.per_prompt(np.zeros(ev.n_targets))
    ids = np.asarray(ids)
    select = {"calibration": np.isin(ids, calib_ids), "heldout": np.isin(ids, heldout_ids)}
    select = {name: sel for name, sel in select.items() if sel.any()}
    base = ev.per_prompt(ev.loss(list(range(n_layers)), per_token=True, max_prefix=0))[1]
    bases = {name: float(base[sel].sum() / counts[sel].sum()) for name, sel in select.items()}
    weights = np.array([editor.n_weights(layer) for layer in range(n_layers)], dtype=float)
    out = {"split": split, "n_heldout_prompts": len(heldout_ids), "sensitivity_rule": rule, "bits_by_layer": bits,
           "score_by_layer": {k: v.tolist() for k, v in scores.items()}, "allocations": {}}
    alloc_sums = {}
    for name in ALLOCATIONS:
        with editor.variant():
            for layer in range(n_layers):
                editor.edit(layer, None, rtn(bits[name][layer], group))
            sums = ev.per_prompt(ev.loss(list(range(n_layers)), per_token=True, max_prefix=0))[1]
        alloc_sums[name] = sums - base
        avg_bits = float(np.dot(weights, bits[name]) / weights.sum())
        entry = {"avg_bits": avg_bits}
        for name_split, sel in select.items():
            loss = float(sums[sel].sum() / counts[sel].sum())
            record("mixed", -1, "all", avg_bits, name, loss, 0, split=name_split, ref=bases[name_split])
            entry[f"{name_split}_delta_loss"] = loss - bases[name_split]
        out["allocations"][name] = entry
        log.info("quantization: mixed %s (avg %.3f bits): Δloss %s", name, avg_bits,
                 {k: round(v, 5) for k, v in entry.items() if k.endswith("delta_loss")})

    # intervals over the prompts the allocations are compared on (paired: the same resampled prompts for all)
    sel = select[split]
    n_compare = int(sel.sum())
    compare = Bootstrap(n_compare, unit="prompt", seed=p["seed"])
    c = counts[sel]
    stack = np.stack([alloc_sums[name][sel] for name in ALLOCATIONS], axis=1)  # [P, allocations]
    point, ci = compare.interval(stack, c, statistic=_pooled)
    for k, name in enumerate(ALLOCATIONS):
        out["allocations"][name][f"{split}_delta_loss_ci"] = ci[k]
    differences = {}  # negative: the first allocation loses less
    for a, b_name in COMPARISONS:
        value, interval = compare.interval(alloc_sums[a][sel] - alloc_sums[b_name][sel], c, statistic=weighted_mean)
        differences[f"{a}_minus_{b_name}"] = {"delta_loss": value, "ci": interval}
    out["differences"] = differences
    best_index, best_stability = compare.stability(stack, c, statistic=_pooled, pick=lambda v: int(np.argmin(v)))
    best = ALLOCATIONS[best_index]
    out["best"], out["best_stability"] = best, best_stability
    for other in ALLOCATIONS:
        if other == best:
            continue
        key = f"{best}_minus_{other}" if f"{best}_minus_{other}" in differences else f"{other}_minus_{best}"
        lo, hi = differences[key]["ci"]
        if lo <= 0 <= hi:
            boot.flag(f"mixed_best: {best} is not separated from {other} on the {n_compare} {split} prompts "
                      f"(Δloss difference interval [{lo:.4g}, {hi:.4g}] contains 0)")
    boot.check_stability("mixed_best", best_stability)
    for reason in compare.reasons:
        boot.flag(f"mixed precision ({split} prompts): {reason}")
    out["uncertainty"] = compare.summary()["uncertainty"]
    return out


def _summary(model, prompt_set, p, adapter, ev, base, exact, sweeps, mixed, library, sample, types, boot):
    sb = p["sensitivity_bits"]
    sens = np.asarray(sweeps["sensitivity"][sb], dtype=float)
    sens_ci = sweeps["sensitivity_ci"][sb]
    order = np.argsort(-sens, kind="stable")
    most, most_stability = sweeps["most"]
    least, least_stability = sweeps["least"]
    summary = {
        "model": model,
        "prompt_set": prompt_set,
        "n_layers": adapter.n_layers,
        "n_prompts": len(sample["calibration_prompt_ids"]),
        "n_heldout_prompts": len(sample["heldout_prompt_ids"]),
        "n_tokens": int(ev.n_targets),
        **sample,
        "max_target_tokens": p["max_target_tokens"],
        "group_size": p["group_size"] or None,
        "bits": p["bits"],
        "sensitivity_bits": sb,
        "baseline_loss": base,
        "baseline_loss_ci": sweeps["baseline"][1],
        "baseline_ppl": math.exp(base),
        "baseline_from_cache": exact,
        "most_sensitive_layer": int(most),
        "most_sensitive_layer_stability": most_stability,
        "least_sensitive_layer": int(least),
        "least_sensitive_layer_stability": least_stability,
        "most_sensitive_layers": [int(i) for i in order[:3]],
        "max_layer_delta_loss": float(sens[most]),
        "max_layer_delta_loss_ci": sens_ci[most],
        "min_layer_delta_loss": float(sens[least]),
        "min_layer_delta_loss_ci": sens_ci[least],
    }
    if "most_matrix" in sweeps:
        ranked = sorted(sweeps["matrix"][sb], key=lambda t: -sweeps["matrix"][sb][t])
        summary["most_sensitive_matrix"] = ranked[0]
        summary["most_sensitive_matrix_stability"] = sweeps["most_matrix"][1]
        summary["least_sensitive_matrix"] = ranked[-1]
    for b, delta in sweeps["uniform"].items():
        summary[f"uniform_{b}bit_delta_loss"] = float(delta)
        summary[f"uniform_{b}bit_delta_loss_ci"] = sweeps["uniform_ci"][b]
        summary[f"uniform_{b}bit_ppl"] = math.exp(base + delta)
    if mixed:
        key = f"{mixed['split']}_delta_loss"
        summary["mixed_bits"] = p["mixed_bits"]
        summary["mixed_split"] = mixed["split"]
        for name, entry in mixed["allocations"].items():
            summary[f"mixed_{name}_delta_loss"] = entry.get(key)
            summary[f"mixed_{name}_delta_loss_ci"] = entry.get(f"{key}_ci")
        for name, diff in mixed["differences"].items():
            summary[f"mixed_{name}"] = diff["delta_loss"]
            summary[f"mixed_{name}_ci"] = diff["ci"]
        summary["mixed_best"] = mixed["best"]
        summary["mixed_best_stability"] = mixed["best_stability"]
    summary["weights_restored"] = True
    summary["sensitivity"] = {str(b): [float(x) for x in v] for b, v in sweeps["sensitivity"].items()}
    summary["sensitivity_ci"] = {str(b): v for b, v in sweeps["sensitivity_ci"].items()}
    summary["matrix_sensitivity"] = {str(b): {t: float(v) for t, v in d.items()} for b, d in sweeps["matrix"].items()}
    summary["matrix_sensitivity_ci"] = {str(b): d for b, d in sweeps["matrix_ci"].items()}
    summary["uniform"] = {str(b): float(d) for b, d in sweeps["uniform"].items()}
    summary["uniform_ci"] = {str(b): v for b, v in sweeps["uniform_ci"].items()}
    summary["mixed"] = mixed
    summary["library_methods"] = library
    summary.update(boot.summary())
    return summary


# ---------------------------------------------------------------------------- outputs


def _errors(points, cis) -> np.ndarray:
    """[2, n] distances below and above each point, for ``errorbar``/``bar(yerr=)``."""
    points = np.asarray(points, dtype=float)
    pairs = np.asarray([[np.nan, np.nan] if ci is None else ci for ci in cis], dtype=float)
    return np.abs(np.stack([points - pairs[:, 0], pairs[:, 1] - points]))


def plot_layers(result: QuantizationResult, path: str | Path) -> None:
    from layerscope.report.plotting import figure, save

    s = result.summary
    with figure(width=7.2, height=3.8) as (fig, ax):
        x = np.arange(s["n_layers"])
        for b in s["bits"]:
            values = s["sensitivity"][str(b)]
            line, = ax.plot(x, values, marker="o", markersize=2.5, label=f"{b} bits")
            ci = np.asarray(s["sensitivity_ci"][str(b)], dtype=float)
            ax.fill_between(x, ci[:, 0], ci[:, 1], color=line.get_color(), alpha=0.15, linewidth=0)
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.axhline(0, color="0.5", linewidth=0.8)
        ax.set_xlabel("block quantized (all its projections)")
        ax.set_ylabel("Δ loss vs full precision (nats, symlog)")
        ax.set_title(f"per-block RTN sensitivity — {s['model']} on {s['prompt_set']} (group {s['group_size']}, "
                     f"{s['n_prompts']} prompts, {s['n_tokens']} tokens; bands: bootstrap over prompts)", fontsize=9)
        ax.legend(ncol=len(s["bits"]))
        save(fig, path)


def plot_matrices(result: QuantizationResult, path: str | Path) -> None:
    from layerscope.report.plotting import figure, save

    s = result.summary
    data = s["matrix_sensitivity"]
    with figure(width=7.2, height=3.6) as (fig, ax):
        if not data:
            ax.text(0.5, 0.5, "matrix-type sweep disabled", ha="center", va="center", transform=ax.transAxes)
        else:
            types = list(next(iter(data.values())))
            width = 0.8 / len(data)
            for k, (b, values) in enumerate(data.items()):
                x = np.arange(len(types)) + k * width
                points = [values[t] for t in types]
                ax.bar(x, points, width=width, label=f"{b} bits",
                       yerr=_errors(points, [s["matrix_sensitivity_ci"][b][t] for t in types]),
                       error_kw={"elinewidth": 0.8, "capsize": 1.5})
            ax.set_xticks(np.arange(len(types)) + 0.4 - width / 2, types)
            ax.set_yscale("symlog", linthresh=1e-3)
            ax.legend(ncol=len(data))
        ax.set_xlabel("matrix type (quantized in every block)")
        ax.set_ylabel("Δ loss (nats, symlog)")
        ax.set_title("per-matrix-type RTN sensitivity (bars: bootstrap interval over prompts)")
        save(fig, path)


def plot_mixed(result: QuantizationResult, path: str | Path) -> None:
    from layerscope.report.plotting import figure, save

    s = result.summary
    mixed = s["mixed"]
    with figure(1, 2, width=10.0, height=3.6) as (fig, axes):
        if not mixed:
            for ax in axes:
                ax.text(0.5, 0.5, "mixed precision disabled", ha="center", va="center", transform=ax.transAxes)
        else:
            key = f"{mixed['split']}_delta_loss"
            names = list(mixed["allocations"])
            points = [mixed["allocations"][n][key] for n in names]
            axes[0].bar(names, points, color=["0.6", "C0", "C1"],
                        yerr=_errors(points, [mixed["allocations"][n][f"{key}_ci"] for n in names]), capsize=3)
            axes[0].set_ylabel(f"Δ loss on {mixed['split']} prompts (nats)")
            axes[0].set_title(f"mixed precision at {s['mixed_bits']} bits on average "
                              f"({mixed['uncertainty']['n_units']} {mixed['split']} prompts)", fontsize=9)
            for k, n in enumerate(names):
                axes[1].plot(range(s["n_layers"]), mixed["bits_by_layer"][n], drawstyle="steps-mid",
                             label=n, alpha=0.8, linewidth=1.5 - 0.3 * k)
            axes[1].set_xlabel("block")
            axes[1].set_ylabel("bits")
            axes[1].set_title("allocation")
            axes[1].legend()
        save(fig, path)


def run(job: Job) -> Result:
    """Load the model in float32, run every sweep on its activation cache."""
    from layerscope.model.adapter import load_model

    model_dir = job.input("model")
    adapter = load_model(model_dir, dtype="float32", device=job.device, kind="decoder")
    cache = ActivationCache(Path(job.input("resid")).parent)
    result = quantization(adapter, cache, model=job.model, prompt_set=job.prompt_set, params=job.params,
                          model_dir=model_dir)
    return Result(
        summary=result.summary,
        tables={"metrics": result.metrics},
        figures={"layers": partial(plot_layers, result), "matrices": partial(plot_matrices, result),
                 "mixed": partial(plot_mixed, result)},
    )


EXPERIMENT = Experiment(
    name="quantization",
    dashboard=('baseline_loss', 'uniform_4bit_delta_loss', 'most_sensitive_layer', 'mixed_sensitivity_minus_uniform'),
    headlines=("baseline_loss",),
    family="nonlinearity",
    description="how much precision each layer needs",
    description_long=("Round-to-nearest symmetric per-group fake quantization of one block, one matrix type or the "
                      "whole model, and mixed precision at equal average bits, judged by the loss on completion tokens "
                      "of stratified calibration and held-out prompt samples, with bootstrap intervals over prompts."),
    needs="decoder",
    data="prompts",
    gpu=True,
    inputs=("model", "resid", "tokens"),
    run=run,
    tables=("metrics",),
    figures=(Figure("layers", "per-block sensitivity"), Figure("matrices", "per-matrix-type sensitivity"),
             Figure("mixed", "mixed precision")),
    params={'bits': {'description': 'Bit widths of the per-block and per-matrix-type sweeps.',
                 'type': 'array',
                 'items': {'type': 'integer', 'minimum': 2, 'maximum': 16},
                 'minItems': 1,
                 'uniqueItems': True,
                 'default': [2, 3, 4, 6, 8]},
        'group_size': {'description': "Weights per quantization group along each row's input dimension; 0 = one "
                                      'group per row.',
                       'type': 'integer',
                       'minimum': 0,
                       'default': 128},
        'sensitivity_bits': {'description': 'Bit width that ranks blocks and matrix types (headline, '
                                            'mixed-precision allocation, correlation with linearity); must be in '
                                            'bits.',
                             'type': 'integer',
                             'minimum': 2,
                             'default': 3},
        'matrix_types': {'description': 'Run the one-matrix-type-at-a-time sweep.',
                         'type': 'boolean',
                         'default': True},
        'uniform_bits': {'description': 'Whole-model uniform bit widths.',
                         'type': 'array',
                         'items': {'type': 'integer', 'minimum': 2, 'maximum': 16},
                         'uniqueItems': True,
                         'default': [4, 8]},
        'mixed': {'description': 'Compare mixed-precision allocations (uniform, sensitivity-guided, '
                                 'spectrum-guided) at equal average bits.',
                  'type': 'boolean',
                  'default': True},
        'mixed_bits': {'description': 'Average bits of every mixed-precision allocation.',
                       'type': 'integer',
                       'minimum': 2,
                       'default': 4},
        'mixed_step': {'description': 'Guided allocations give mixed_bits + mixed_step bits to the highest-ranked '
                                      'blocks and mixed_bits − mixed_step to as many lowest-ranked ones.',
                       'type': 'integer',
                       'minimum': 1,
                       'default': 1},
        'mixed_fraction': {'description': 'Fraction of blocks moved up (and the same number moved down) by a guided '
                                          'allocation.',
                           'type': 'number',
                           'minimum': 0,
                           'maximum': 0.5,
                           'default': 0.25},
        'max_prompts': {'description': 'Calibration prompts: every sweep evaluates the loss on a seeded sample of N '
                                       'prompts stratified over the categories of the set (null = all).',
                        'type': ['integer', 'null'],
                        'minimum': 1,
                        'default': 7},
        'heldout_prompts': {'description': 'Held-out prompts, a second stratified sample disjoint from the '
                                           'calibration one, on which the mixed-precision allocations are compared '
                                           '(0: on the calibration prompts).',
                            'type': 'integer',
                            'minimum': 0,
                            'default': 7},
        'max_target_tokens': {'description': 'Completion tokens per prompt the losses are evaluated on: the first K '
                                             '(null: all). Tokens after them are not run, which bounds the cost of '
                                             'every variant.',
                              'type': ['integer', 'null'],
                              'minimum': 1,
                              'default': None},
        'batch_size': {'description': 'Sequences per forward pass (memory, not results).',
                       'type': 'integer',
                       'minimum': 1,
                       'default': 8},
        'library_methods': {'description': "Optional GPU library methods (pip install 'layerscope[quant]'); each is "
                                           'skipped with a logged reason where it cannot run.',
                            'type': 'array',
                            'items': {'enum': ['nf4', 'torchao_int4', 'gptq']},
                            'uniqueItems': True,
                            'default': []}},
    threads=4,
    runtime=240,
)
