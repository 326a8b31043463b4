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
  compared on held-out prompts (the next ``heldout_prompts`` prompts of the set), so the
  sensitivity-guided allocation does not get an in-sample advantage.
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
from layerscope.engines.surgery import LossEvaluator
from layerscope.engines.weights import WeightEditor, weights_digest
from layerscope.experiments.nonlinearity.quant_methods import run_library_methods
from layerscope.experiments.registry import Experiment, Figure, Job, Result
from layerscope.model.adapter import ModelAdapter

log = logging.getLogger(__name__)

ALLOCATIONS = ("uniform", "sensitivity", "spectrum")


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
    return p


def _baseline_fn(evaluator: LossEvaluator, cache: ActivationCache, adapter: ModelAdapter):
    """Loss of the unmodified model when starting from cached resid.k.

    When the cache holds exactly what this model computes (float32 storage of a float32
    run), every start reproduces the cached baseline; otherwise (e.g. float16 storage) each
    start gets its own unmodified reference, so Δloss never mixes storage rounding in.
    """
    meta = cache.metadata
    exact = (meta.get("storage_dtype") == "float32" and meta.get("compute_dtype") == "float32"
             and adapter.dtype == torch.float32)
    memo: dict[int, float] = {}

    def baseline(start: int) -> float:
        key = 0 if exact else start
        if key not in memo:
            identity = list(range(adapter.n_layers))
            memo[key] = evaluator.baseline() if exact else evaluator.loss(identity, max_prefix=start)
        return memo[key]

    return baseline, exact


def quantization(adapter: ModelAdapter, cache: ActivationCache, *, model: str, prompt_set: str,
                 params: dict, model_dir: str | Path | None = None) -> QuantizationResult:
    """Run every sweep (see module docstring); the model's weights are unchanged afterwards.

    ``params``: bits, group_size, sensitivity_bits, matrix_types, uniform_bits, mixed,
    mixed_bits, mixed_step, mixed_fraction, max_prompts, heldout_prompts, batch_size,
    library_methods. ``model_dir`` is needed only by the ``gptq`` library method.
    """
    editor = WeightEditor(adapter)
    p = _check_params(params, editor)
    group = p["group_size"] or None
    n_layers = adapter.n_layers
    identity = list(range(n_layers))
    prompts_in_order = list(dict.fromkeys(cache.tokens.loc[cache.tokens["is_target"], "prompt_id"]))
    if not prompts_in_order:
        raise LayerscopeError(f"{cache.directory}: no completion tokens to evaluate a loss on")
    n_calib = min(int(p["max_prompts"]), len(prompts_in_order)) if p["max_prompts"] else len(prompts_in_order)
    calib_ids = prompts_in_order[:n_calib]
    n_heldout = min(int(p["heldout_prompts"]), len(prompts_in_order) - n_calib)
    if p["heldout_prompts"] and n_heldout < p["heldout_prompts"]:
        log.warning("quantization: only %d held-out prompt(s) available (asked for %d)", n_heldout,
                    p["heldout_prompts"])
    # LossEvaluator counts prompts in the cache's order; prompts without completion tokens
    # (none in practice) would shift the count, so evaluate by the number in token order
    all_prompts = list(dict.fromkeys(cache.tokens["prompt_id"]))
    calib_limit = all_prompts.index(calib_ids[-1]) + 1
    ev = LossEvaluator(adapter, cache, batch_size=p["batch_size"], max_prompts=calib_limit)
    before = weights_digest(adapter.model)
    baseline, exact = _baseline_fn(ev, cache, adapter)
    base = baseline(0)
    records: list[tuple] = [("baseline", -1, "none", np.nan, "", "calibration", "loss", base)]

    def record(scope, layer, matrix, bits, allocation, loss, start, split="calibration", ref=None):
        ref = baseline(start) if ref is None else ref
        records.extend([
            (scope, layer, matrix, bits, allocation, split, "loss", loss),
            (scope, layer, matrix, bits, allocation, split, "delta_loss", loss - ref),
            (scope, layer, matrix, bits, allocation, split, "ppl", math.exp(loss)),
            (scope, layer, matrix, bits, allocation, split, "ppl_ratio", math.exp(loss - ref)),
        ])

    # one block at a time
    layer_delta = {b: np.zeros(n_layers) for b in p["bits"]}
    for layer in range(n_layers):
        for b in p["bits"]:
            with editor.variant():
                editor.edit(layer, None, rtn(b, group))
                loss = ev.loss(identity, max_prefix=layer)
            record("layer", layer, "all", b, "", loss, layer)
            layer_delta[b][layer] = loss - baseline(layer)
        log.info("quantization: block %d/%d: Δloss %s", layer + 1, n_layers,
                 ", ".join(f"{b}b {layer_delta[b][layer]:+.4f}" for b in p["bits"]))

    # one matrix type at a time, in every block
    types = editor.types()
    type_delta = {b: {} for b in p["bits"]}
    if p["matrix_types"]:
        for t in types:
            for b in p["bits"]:
                with editor.variant():
                    for layer in range(n_layers):
                        editor.edit(layer, [t], rtn(b, group))
                    loss = ev.loss(identity, max_prefix=0)
                record("matrix", -1, t, b, "", loss, 0)
                type_delta[b][t] = loss - baseline(0)
            log.info("quantization: type %s: Δloss %s", t, ", ".join(f"{b}b {type_delta[b][t]:+.4f}" for b in p["bits"]))

    # the whole model, uniform
    uniform = {}
    for b in p["uniform_bits"]:
        with editor.variant():
            for layer in range(n_layers):
                editor.edit(layer, None, rtn(b, group))
            loss = ev.loss(identity, max_prefix=0)
        record("uniform", -1, "all", b, "", loss, 0)
        uniform[b] = loss - baseline(0)
        log.info("quantization: whole model at %d bits: Δloss %+.4f", b, uniform[b])

    heldout_ids = prompts_in_order[n_calib : n_calib + n_heldout]
    mixed = _mixed_precision(adapter, cache, editor, p, group, layer_delta, calib_ids, heldout_ids, all_prompts,
                             record)

    after = weights_digest(adapter.model)
    if after != before:  # pragma: no cover - a bug, never a user error
        raise RuntimeError("quantization sweep left the model's weights changed")

    library = run_library_methods(p["library_methods"], adapter, cache, calib_limit, p, base, record,
                                  model_dir=model_dir)

    metrics = pd.DataFrame(records, columns=["scope", "layer", "matrix", "bits", "allocation", "split", "metric",
                                             "value"])
    metrics.insert(0, "prompt_set", prompt_set)
    metrics.insert(0, "model", model)
    summary = _summary(model, prompt_set, p, adapter, ev, base, exact, layer_delta, type_delta, uniform, mixed,
                       library, n_calib, n_heldout, types)
    return QuantizationResult(metrics, summary)


def _mixed_precision(adapter, cache, editor, p, group, layer_delta, calib_ids, heldout_ids, all_prompts, record):
    if not p["mixed"]:
        return None
    n_layers = adapter.n_layers
    low, mid = p["mixed_bits"] - p["mixed_step"], p["mixed_bits"]
    if low in layer_delta and mid in layer_delta:
        # measured: lower the blocks hurt least at the low width, raise those hurt most at the mean width
        sens_up, sens_down = layer_delta[mid], layer_delta[low]
        rule = f"lowered: least Δloss at {low} bits; raised: most Δloss at {mid} bits"
    else:
        sb = p["sensitivity_bits"]
        sens_up = sens_down = layer_delta[sb]
        rule = f"Δloss at {sb} bits ({low} or {mid} bits not in the sweep)"
        log.warning("quantization: sensitivity-guided allocation ranks blocks by %s", rule)
    spectrum = spectrum_scores(editor)
    scores = {"sensitivity_up": np.asarray(sens_up), "sensitivity_down": np.asarray(sens_down), "spectrum": spectrum}
    common = dict(mean_bits=p["mixed_bits"], step=p["mixed_step"], fraction=p["mixed_fraction"])
    bits = {
        "uniform": [int(p["mixed_bits"])] * n_layers,
        "sensitivity": allocate(sens_up, down_scores=sens_down, **common),
        "spectrum": allocate(spectrum, **common),
    }
    split_ids = heldout_ids if heldout_ids else calib_ids
    split = "heldout" if heldout_ids else "calibration"
    if not heldout_ids:
        log.warning("quantization: no held-out prompts; mixed-precision allocations are compared on the "
                    "calibration prompts they were chosen on")
    limit = all_prompts.index(split_ids[-1]) + 1
    ev = LossEvaluator(adapter, cache, batch_size=p["batch_size"], max_prompts=limit)
    prompt_of = cache.tokens.set_index("row").loc[ev.target_rows, "prompt_id"].to_numpy()
    select = {"calibration": np.isin(prompt_of, calib_ids), "heldout": np.isin(prompt_of, heldout_ids)}
    base_tokens = ev.loss(list(range(n_layers)), per_token=True, max_prefix=0)
    bases = {name: float(base_tokens[sel].mean()) for name, sel in select.items() if sel.any()}
    out = {"split": split, "n_heldout_prompts": len(heldout_ids), "sensitivity_rule": rule, "bits_by_layer": bits,
           "score_by_layer": {k: v.tolist() for k, v in scores.items()}, "allocations": {}}
    for name in ALLOCATIONS:
        with editor.variant():
            for layer in range(n_layers):
                editor.edit(layer, None, rtn(bits[name][layer], group))
            per_token = ev.loss(list(range(n_layers)), per_token=True, max_prefix=0)
        weights = np.array([editor.n_weights(layer) for layer in range(n_layers)], dtype=float)
        avg_bits = float(np.dot(weights, bits[name]) / weights.sum())
        entry = {"avg_bits": avg_bits}
        for name_split, sel in select.items():
            if not sel.any():
                continue
            loss = float(per_token[sel].mean())
            record("mixed", -1, "all", avg_bits, name, loss, 0, split=name_split, ref=bases[name_split])
            entry[f"{name_split}_delta_loss"] = loss - bases[name_split]
        out["allocations"][name] = entry
        log.info("quantization: mixed %s (avg %.3f bits): Δloss %s", name, avg_bits,
                 {k: round(v, 5) for k, v in entry.items() if k.endswith("delta_loss")})
    return out


def _summary(model, prompt_set, p, adapter, ev, base, exact, layer_delta, type_delta, uniform, mixed, library,
             n_calib, n_heldout, types):
    sb = p["sensitivity_bits"]
    sens = layer_delta[sb]
    order = np.argsort(-sens, kind="stable")
    summary = {
        "model": model,
        "prompt_set": prompt_set,
        "n_layers": adapter.n_layers,
        "n_prompts": n_calib,
        "n_tokens": int(ev.n_targets),
        "group_size": p["group_size"] or None,
        "bits": p["bits"],
        "sensitivity_bits": sb,
        "baseline_loss": base,
        "baseline_ppl": math.exp(base),
        "baseline_from_cache": exact,
        "most_sensitive_layer": int(order[0]),
        "least_sensitive_layer": int(order[-1]),
        "most_sensitive_layers": [int(i) for i in order[:3]],
        "max_layer_delta_loss": float(sens[order[0]]),
        "min_layer_delta_loss": float(sens[order[-1]]),
    }
    if type_delta[sb]:
        ranked = sorted(type_delta[sb], key=lambda t: -type_delta[sb][t])
        summary["most_sensitive_matrix"] = ranked[0]
        summary["least_sensitive_matrix"] = ranked[-1]
    for b, delta in uniform.items():
        summary[f"uniform_{b}bit_delta_loss"] = float(delta)
        summary[f"uniform_{b}bit_ppl"] = math.exp(base + delta)
    if mixed:
        key = f"{mixed['split']}_delta_loss"
        summary["mixed_bits"] = p["mixed_bits"]
        summary["mixed_split"] = mixed["split"]
        for name, entry in mixed["allocations"].items():
            summary[f"mixed_{name}_delta_loss"] = entry.get(key)
        summary["mixed_best"] = min(mixed["allocations"], key=lambda n: mixed["allocations"][n][key])
    summary["weights_restored"] = True
    summary["sensitivity"] = {str(b): [float(x) for x in layer_delta[b]] for b in p["bits"]}
    summary["matrix_sensitivity"] = {str(b): {t: float(type_delta[b][t]) for t in types if t in type_delta[b]}
                                     for b in p["bits"] if type_delta[b]}
    summary["uniform"] = {str(b): float(d) for b, d in uniform.items()}
    summary["mixed"] = mixed
    summary["library_methods"] = library
    return summary


# ---------------------------------------------------------------------------- outputs


def plot_layers(result: QuantizationResult, path: str | Path) -> None:
    from layerscope.report.plotting import figure, save

    s = result.summary
    with figure(width=7.2, height=3.8) as (fig, ax):
        for b in s["bits"]:
            ax.plot(range(s["n_layers"]), s["sensitivity"][str(b)], marker="o", markersize=2.5, label=f"{b} bits")
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.axhline(0, color="0.5", linewidth=0.8)
        ax.set_xlabel("block quantized (all its projections)")
        ax.set_ylabel("Δ loss vs full precision (nats, symlog)")
        ax.set_title(f"per-block RTN sensitivity — {s['model']} on {s['prompt_set']} "
                     f"(group {s['group_size']}, {s['n_tokens']} tokens)")
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
                ax.bar(x, [values[t] for t in types], width=width, label=f"{b} bits")
            ax.set_xticks(np.arange(len(types)) + 0.4 - width / 2, types)
            ax.set_yscale("symlog", linthresh=1e-3)
            ax.legend(ncol=len(data))
        ax.set_xlabel("matrix type (quantized in every block)")
        ax.set_ylabel("Δ loss (nats, symlog)")
        ax.set_title("per-matrix-type RTN sensitivity")
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
            axes[0].bar(names, [mixed["allocations"][n][key] for n in names], color=["0.6", "C0", "C1"])
            axes[0].set_ylabel(f"Δ loss on {mixed['split']} prompts (nats)")
            axes[0].set_title(f"mixed precision at {s['mixed_bits']} bits on average")
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
    family="nonlinearity",
    description="how much precision each layer needs",
    description_long=("Round-to-nearest symmetric per-group fake quantization of one block, one matrix type or the "
                      "whole model, and mixed precision at equal average bits, judged by the loss on completion tokens."),
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
        'max_prompts': {'description': 'Calibration prompts: every sweep evaluates the loss on the first N prompts '
                                       'of the set (null = all).',
                        'type': ['integer', 'null'],
                        'minimum': 1,
                        'default': 4},
        'heldout_prompts': {'description': 'Prompts after the calibration ones on which the mixed-precision '
                                           'allocations are compared (0: on the calibration prompts).',
                            'type': 'integer',
                            'minimum': 0,
                            'default': 2},
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
