"""How nonlinear is each layer: the linearization gap on real cached inputs.

Every function analysed maps the residual stream to the residual stream: a whole block
f(h) = h + u(h), or its attention or MLP sub-layer with its skip connection (see
:class:`layerscope.model.adapter.SubLayers`). What the layer computes is its *update*
u(h) = f(h) − h, the residual branch; the identity carried by the skip connection is exactly
linear. At a real input h and a direction v:

* residual r(ε) = ‖u(h + εv) − u(h) − J_u(h)·εv‖ = ‖f(h + εv) − f(h) − J_f(h)·εv‖ (the
  identity cancels), with J·v computed exactly by forward-mode AD (``torch.func.jvp``), not by
  finite differences;
* gap(ε) = r(ε) / ‖u(h + εv) − u(h)‖: the fraction of the update's actual change that its
  linearization misses (0 for an affine update, 1 for a purely quadratic one at h = 0). This
  is the headline;
* map gap(ε) = r(ε) / ‖f(h + εv) − f(h)‖: the same residual over the change of the whole map,
  identity included (the definition before issue 13, kept as ``block_gap_*``). Its
  denominator carries the perturbation εv itself, so it is smaller than the update's gap and
  ranks layers by how large their update is against the identity, not by how curved it is;
* residual order: the slope of log r against log ε (least squares over the ε grid): 2 for a
  smooth function at small ε, whatever its curvature;
* gap order: the slope of log gap against log ε: 1 for a smooth update at small ε (gap ∝ ε),
  below 1 when the update's curvature saturates over the grid (norms, softmax), 0 when the
  linearization misses a constant fraction;
* transform magnitude ‖f(h) − h‖ / ‖h‖ = ‖u(h)‖ / ‖h‖ at the sampled token;
* Jacobian spectral norm σ_max(J_f(h)) by power iteration on JᵀJ (``jvp`` then ``vjp``);
  power iteration approaches σ_max from below, so the estimate is a lower bound.

A block mixes positions through attention, so f is always a function of a whole sequence
[T, d] (the prompt's full token sequence, the other tokens at their real cached states).
``perturb="token"`` (default) perturbs the state of one sampled completion token t —
v is zero except at row t — and measures the change of the output at every position (in a
causal model, positions ≥ t); the spectral norm is then that of ∂f(H)/∂h_t (T·d × d).
``perturb="all"`` perturbs every token at once and measures σ_max of the whole
sequence Jacobian. Directions are random unit vectors per perturbed row, scaled by that
row's norm ‖h_t‖, so ε is a perturbation relative to the state.

Prompts are a seeded sample stratified over the prompt set's categories
(:mod:`layerscope.engines.sampling`), tokens a seeded choice inside each. Per-layer gaps are
token-pooled means (every sampled token and direction weighs the same); their intervals are
a bootstrap over prompts (:mod:`layerscope.engines.statistics`): each prompt contributes the
sum and the count of its items, never its tokens one by one.

Inputs are the cached ``resid.i`` rows (the block's and attention sub-layer's input); the
MLP sub-layer's input is the attention sub-layer's output computed from them (or
``resid.i`` itself for a parallel residual). Everything runs in the model's dtype with
eager attention (PyTorch's fused CPU attention kernel has no forward-mode derivative).
In float32, rounding puts a floor of about 1e-7·‖f(h)‖ under the residual, far below the
residuals of real layers for ε ≥ 1e-2 (Hugging Face's RMSNorm computes in float32 even in
a float64 model, so a float64 run would not lower that floor for Llama-like models).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch.func import jvp, vjp

from layerscope import LayerscopeError
from layerscope.data.activations import ActivationCache
from layerscope.engines.sampling import sample_summary, stratified_sample
from layerscope.engines.statistics import Bootstrap, weighted_mean
from layerscope.experiments.registry import Experiment, Figure, Job, Result
from layerscope.model.adapter import ModelAdapter
from layerscope.progress import track

log = logging.getLogger(__name__)

SUBLAYERS = ("block", "attn", "mlp")
PERTURB_MODES = ("token", "all")

Fn = Callable[[torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------- numerics on any function


def _item_norms(x: torch.Tensor) -> torch.Tensor:
    """Euclidean norm of each batch item (over every dimension but the first), in float64."""
    return x.flatten(1).double().norm(dim=1)


@dataclass
class GapCurves:
    """Linearization residuals of N (input, direction) items over an ε grid.

    ``f`` maps its input space to itself; its update is u(x) = f(x) − x.
    """

    eps: np.ndarray  # [E]
    residual: np.ndarray  # [N, E]  ‖f(x+εv) − f(x) − εJv‖ (= the same for u: the identity cancels)
    delta: np.ndarray  # [N, E]  ‖f(x+εv) − f(x)‖, the change of the whole map
    update_delta: np.ndarray  # [N, E]  ‖u(x+εv) − u(x)‖ = ‖f(x+εv) − f(x) − εv‖, the change of the update
    fx: torch.Tensor  # f(x), [N, ...]

    @property
    def gap(self) -> np.ndarray:
        """The update's gap r / ‖u(x+εv) − u(x)‖ (the headline definition)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.residual / self.update_delta

    @property
    def map_gap(self) -> np.ndarray:
        """The whole map's gap r / ‖f(x+εv) − f(x)‖ (identity included in the denominator)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.residual / self.delta

    def residual_order(self) -> np.ndarray:
        """Per item, the slope of log r(ε) against log ε (NaN where some r is 0 or not finite)."""
        return fit_order(self.eps, self.residual)

    def gap_order(self) -> np.ndarray:
        """Per item, the slope of log gap(ε) (the update's) against log ε."""
        return fit_order(self.eps, self.gap)


@torch.no_grad()
def linearization_gap(f: Fn, x: torch.Tensor, v: torch.Tensor, eps: Sequence[float]) -> GapCurves:
    """Residuals of the first-order expansion of ``f`` at ``x`` along ``v`` for each ε.

    ``x`` and ``v`` are batches [N, ...] whose items ``f`` treats independently (copies of a
    sequence, or rows of a toy input); ``v`` carries its own scale (the perturbation at
    ε = 1). J·v comes from ``torch.func.jvp``: exact up to floating-point rounding. ``f`` must
    map its input space to itself (its update f(x) − x is what :attr:`GapCurves.gap` measures).
    """
    if x.shape != v.shape:
        raise ValueError(f"input {tuple(x.shape)} and direction {tuple(v.shape)} differ in shape")
    eps = np.asarray(list(eps), dtype=float)
    if eps.size == 0 or (eps <= 0).any():
        raise ValueError(f"ε grid must be non-empty and positive, got {eps.tolist()}")
    x, v = x.contiguous(), v.contiguous()  # forward AD refuses expanded (aliased) inputs
    fx, jv = jvp(f, (x,), (v,))
    if fx.shape != x.shape:
        raise ValueError(f"f maps {tuple(x.shape)} to {tuple(fx.shape)}: its update f(x) − x is undefined")
    residual = np.zeros((x.shape[0], eps.size))
    delta = np.zeros_like(residual)
    update_delta = np.zeros_like(residual)
    for k, e in enumerate(eps):
        change = f(x + float(e) * v) - fx
        delta[:, k] = _item_norms(change).cpu().numpy()
        update_delta[:, k] = _item_norms(change - float(e) * v).cpu().numpy()
        residual[:, k] = _item_norms(change - float(e) * jv).cpu().numpy()
    return GapCurves(eps, residual, delta, update_delta, fx)


def fit_order(eps: np.ndarray, residual: np.ndarray) -> np.ndarray:
    """Least-squares slope of log ``residual`` against log ε, per row of ``residual`` [N, E] (any
    positive curve: the residual, or the gap)."""
    eps = np.asarray(eps, dtype=float)
    residual = np.atleast_2d(np.asarray(residual, dtype=float))
    if eps.size < 2:
        return np.full(residual.shape[0], np.nan)
    valid = np.all(np.isfinite(residual) & (residual > 0), axis=1)
    out = np.full(residual.shape[0], np.nan)
    if valid.any():
        slopes = np.polyfit(np.log(eps), np.log(residual[valid]).T, 1)[0]
        out[valid] = slopes
    return out


def jacobian_spectral_norm(f: Fn, x: torch.Tensor, *, mask: torch.Tensor | None = None, iterations: int = 20,
                           generator: torch.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """σ_max of the Jacobian of ``f`` at each batch item of ``x``, by power iteration on JᵀJ.

    ``mask`` (broadcastable to ``x``) restricts the input space to the entries where it is
    non-zero (e.g. one token's row): the result is then σ_max of J restricted to that
    subspace. Each iteration is one ``jvp`` and one ``vjp``. Returns (σ estimate, relative
    change of the estimate over the last iteration); the estimate never exceeds σ_max.
    """
    if iterations < 1:
        raise ValueError("power iteration needs at least one iteration")
    x = x.contiguous()
    keep = torch.ones_like(x) if mask is None else torch.broadcast_to(mask, x.shape).to(x.dtype)
    u = torch.randn(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device) * keep
    u = u / _item_norms(u).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
    with torch.no_grad():
        _, pullback = vjp(f, x)
        sigma = previous = np.zeros(x.shape[0])
        for _ in range(iterations):
            _, ju = jvp(f, (x,), (u,))
            previous, sigma = sigma, _item_norms(ju).cpu().numpy()
            g = pullback(ju)[0] * keep  # JᵀJ u, restricted
            norms = _item_norms(g).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
            u = g / norms.clamp_min(torch.finfo(x.dtype).tiny)
    with np.errstate(divide="ignore", invalid="ignore"):
        change = np.abs(sigma - previous) / sigma
    return sigma, change


# ---------------------------------------------------------------------------- sampling real inputs


@dataclass
class SampledSequence:
    prompt_id: str
    rows: tuple[int, int]  # cache rows [start, end) of the whole sequence
    ids: list[int]
    positions: list[int]  # sampled token positions (indices into the sequence)


def sample_sequences(cache: ActivationCache, *, n_sequences: int, tokens_per_sequence: int, seed: int,
                     role: str = "completion") -> tuple[list[SampledSequence], dict]:
    """A seeded sample of prompts, stratified over the cache's categories, and in each a seeded
    choice of tokens with the given role.

    Only prompts with at least one token of ``role`` are eligible; the others (for decoders:
    the model stopped at once) are counted in ``n_empty_completions``. Returns the sampled
    sequences (in the cache's order) and the summary fragment ``prompt_ids``,
    ``prompt_categories``, ``n_empty_completions``.
    """
    tokens = cache.tokens
    per_prompt = tokens.groupby("prompt_id", sort=False).agg(category=("category", "first"),
                                                              n_role=("role", lambda r: int((r == role).sum())))
    eligible = per_prompt[per_prompt["n_role"] > 0]
    if eligible.empty:
        raise LayerscopeError(f"{cache.directory}: no tokens with role '{role}' to sample inputs from")
    ids = [str(i) for i in eligible.index]
    categories = eligible["category"].astype(str).tolist()
    chosen = stratified_sample(ids, categories, n_sequences, seed=seed)
    fragment = sample_summary(ids, categories, chosen)
    fragment["n_empty_completions"] = int(len(per_prompt) - len(eligible))
    rng = np.random.default_rng([int(seed), 0x11E])  # token picks: a stream of their own
    out = []
    for prompt_id in chosen:
        g = tokens[tokens["prompt_id"].astype(str) == prompt_id].sort_values("position")
        candidates = g.loc[g["role"] == role, "position"].to_numpy()
        picks = rng.choice(candidates, size=min(tokens_per_sequence, len(candidates)), replace=False)
        out.append(SampledSequence(
            prompt_id, (int(g["row"].iloc[0]), int(g["row"].iloc[-1]) + 1),
            [int(i) for i in g["token_id"]], sorted(int(p) for p in picks),
        ))
    return out, fragment


# ---------------------------------------------------------------------------- the experiment


@dataclass
class LinearizationResult:
    metrics: pd.DataFrame  # tidy per (layer, sublayer[, eps]) means
    per_sample: pd.DataFrame  # one row per (layer, sublayer, token, direction, eps)
    per_token: pd.DataFrame  # one row per (layer, sublayer, token): magnitude, spectral norm
    summary: dict


def _directions(x: torch.Tensor, positions: Sequence[int] | None, n_dirs: int,
                generator: torch.Generator) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Perturbation directions for one sequence x [1, T, d]: rows scaled by their own norm.

    Token mode: for each position and direction one item, zero except that row. All mode
    (positions None): n_dirs items perturbing every row. Returns ([N, T, d], [(position, k)]).
    """
    _, T, d = x.shape
    row_norms = x[0].double().norm(dim=-1)
    items, labels = [], []
    for position in (positions if positions is not None else [-1]):
        for k in range(n_dirs):
            u = torch.randn((T, d), generator=generator, dtype=torch.float64)
            u = u / u.norm(dim=-1, keepdim=True) * row_norms[:, None]
            if position >= 0:
                only = torch.zeros_like(u)
                only[position] = u[position]
                u = only
            items.append(u)
            labels.append((position, k))
    return torch.stack(items).to(x.dtype), labels


class _BatchedInputs:
    """The block arguments of one sequence, captured once per batch size."""

    def __init__(self, adapter: ModelAdapter, ids: list[int]):
        self.adapter = adapter
        self.ids = torch.tensor([ids], device=adapter.device)
        self._by_size: dict[int, object] = {}

    def __call__(self, batch: int):
        if batch not in self._by_size:
            self._by_size[batch] = self.adapter.capture_block_inputs(self.ids.expand(batch, -1))
        return self._by_size[batch]


def _functions(adapter: ModelAdapter, layer: int, inputs) -> dict[str, Fn]:
    sub = adapter.sublayers(layer, inputs)
    return {
        "block": lambda h: adapter.run_block(layer, h, inputs),
        "attn": sub.attn,
        "mlp": sub.mlp,
    }


def _analyse_function(adapter, layer, name, x, positions, batched, params, generator):
    """Gap curves, magnitudes and spectral norms of one function at one sequence's input x [1, T, d]."""
    n_dirs = params["n_directions"]
    mode = params["perturb"]
    v, labels = _directions(x, positions if mode == "token" else None, n_dirs, generator)
    n = v.shape[0]
    f_n = _functions(adapter, layer, batched(n))[name]
    curves = linearization_gap(f_n, x.expand(n, -1, -1), v, params["eps"])
    residual_order, gap_order = curves.residual_order(), curves.gap_order()
    gap, map_gap = curves.gap, curves.map_gap
    with torch.no_grad():
        fx = curves.fx[0]
    samples = []
    for item, (position, k) in enumerate(labels):
        for e_index, e in enumerate(curves.eps):
            samples.append((position, k, float(e), curves.residual[item, e_index], curves.delta[item, e_index],
                            curves.update_delta[item, e_index], gap[item, e_index], map_gap[item, e_index],
                            residual_order[item], gap_order[item]))
    tokens = []
    magnitude = ((fx[positions] - x[0, positions]).double().norm(dim=-1)
                 / x[0, positions].double().norm(dim=-1)).cpu().numpy()
    sigma = change = np.full(len(positions), np.nan)
    iterations = params["power_iterations"]
    if iterations > 0:
        if mode == "token":
            k = len(positions)
            mask = torch.zeros((k, *x.shape[1:]), dtype=x.dtype, device=x.device)
            for j, position in enumerate(positions):
                mask[j, position] = 1
            f_k = _functions(adapter, layer, batched(k))[name]
            sigma, change = jacobian_spectral_norm(f_k, x.expand(k, -1, -1), mask=mask, iterations=iterations,
                                                   generator=generator)
        else:
            f_1 = _functions(adapter, layer, batched(1))[name]
            s, c = jacobian_spectral_norm(f_1, x, iterations=iterations, generator=generator)
            sigma, change = np.full(len(positions), s[0]), np.full(len(positions), c[0])
    for j, position in enumerate(positions):
        tokens.append((position, float(magnitude[j]), float(sigma[j]), float(change[j])))
    return samples, tokens


def _check_params(params: dict, n_layers: int) -> dict:
    p = dict(params)
    p["eps"] = [float(e) for e in p["eps"]]
    if len(p["eps"]) < 2 or any(e <= 0 for e in p["eps"]):
        raise LayerscopeError(f"linearization.eps needs at least two positive values, got {p['eps']}")
    if p["ref_eps"] not in p["eps"]:
        raise LayerscopeError(f"linearization.ref_eps {p['ref_eps']} is not in the ε grid {p['eps']}")
    if p["perturb"] not in PERTURB_MODES:
        raise LayerscopeError(f"linearization.perturb must be one of {PERTURB_MODES}, got {p['perturb']!r}")
    layers = p["layers"]
    if layers:
        bad = [i for i in layers if not 0 <= i < n_layers]
        if bad:
            raise LayerscopeError(f"linearization.layers {bad} outside 0…{n_layers - 1}")
    p["layers"] = sorted(set(layers)) if layers else list(range(n_layers))
    return p


def linearization(adapter: ModelAdapter, cache: ActivationCache, *, model: str, prompt_set: str,
                  params: dict) -> LinearizationResult:
    """Run the linearization analysis of every block (and its sub-layers) on sampled cached inputs.

    ``params``: eps (grid), ref_eps, perturb, n_sequences, tokens_per_sequence, n_directions,
    power_iterations, layers (empty: all), seed.
    """
    if cache.n_layers != adapter.n_layers or cache.d_model != adapter.facts.d_model:
        raise LayerscopeError(
            f"activation cache ({cache.n_layers} layers, d={cache.d_model}) does not match the model "
            f"({adapter.n_layers} layers, d={adapter.facts.d_model})"
        )
    p = _check_params(params, adapter.n_layers)
    adapter.use_attention("eager")  # forward-mode AD through attention
    adapter.model.requires_grad_(False)
    role = "completion" if adapter.facts.kind == "decoder" else "prompt"
    sampled, sample = sample_sequences(cache, n_sequences=p["n_sequences"],
                                       tokens_per_sequence=p["tokens_per_sequence"], seed=p["seed"], role=role)
    dtype = adapter.dtype
    sample_rows, token_rows = [], []
    batched = {s.prompt_id: _BatchedInputs(adapter, s.ids) for s in sampled}
    for layer in track(p["layers"], "linearization", unit="blocks"):
        for s_index, seq in enumerate(sampled):
            generator = torch.Generator().manual_seed(int(p["seed"]) * 1_000_003 + layer * 1009 + s_index)
            h = cache.resid(layer, slice(*seq.rows), dtype=dtype)[None].to(adapter.device)
            with torch.no_grad():
                sub = adapter.sublayers(layer, batched[seq.prompt_id](1))
                mlp_in = sub.mlp_input(h)
            for name, x in (("block", h), ("attn", h), ("mlp", mlp_in)):
                state = generator.get_state()  # the same directions for the three functions
                samples, tokens = _analyse_function(adapter, layer, name, x, seq.positions, batched[seq.prompt_id],
                                                    p, generator)
                generator.set_state(state)
                sample_rows += [(layer, name, seq.prompt_id, *row) for row in samples]
                token_rows += [(layer, name, seq.prompt_id, *row) for row in tokens]
    per_sample = pd.DataFrame(sample_rows, columns=["layer", "sublayer", "prompt_id", "position", "direction", "eps",
                                                    "residual", "delta", "update_delta", "gap", "map_gap",
                                                    "residual_order", "gap_order"])
    per_token = pd.DataFrame(token_rows, columns=["layer", "sublayer", "prompt_id", "position",
                                                  "transform_magnitude", "spectral_norm", "spectral_change"])
    return _summarise(per_sample, per_token, p, adapter, model=model, prompt_set=prompt_set,
                      n_tokens=sum(len(s.positions) for s in sampled), prompts=[s.prompt_id for s in sampled],
                      sample=sample, role=role)


def _per_prompt(frame: pd.DataFrame, value: str, prompts: list[str], layers: list[int]):
    """Per (prompt, layer) sums and counts of the finite values of column ``value``: [P, L] each."""
    finite = frame[np.isfinite(frame[value].to_numpy(dtype=float))]
    g = finite.groupby(["prompt_id", "layer"])[value].agg(["sum", "count"])
    sums = g["sum"].unstack("layer").reindex(index=prompts, columns=layers).fillna(0.0).to_numpy(dtype=float)
    counts = g["count"].unstack("layer").reindex(index=prompts, columns=layers).fillna(0.0).to_numpy(dtype=float)
    return sums, counts


def _by_layer(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Pooled mean per layer of resampled per-prompt sums and counts: [B, P, L] → [B, L]."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return weighted_mean(sums, counts)


def _layer_mean(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Mean over layers of the pooled per-layer means: [B, P, L] → [B]."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(_by_layer(sums, counts), axis=-1)


def _summarise(per_sample, per_token, p, adapter, *, model, prompt_set, n_tokens, prompts, sample, role):
    layers = p["layers"]
    ref = p["ref_eps"]
    records = []
    gap_means = (per_sample.groupby(["layer", "sublayer", "eps"])[["gap", "map_gap"]]
                 .agg(["mean", "std"]).reset_index())
    for _, row in gap_means.iterrows():
        layer, sub, e = int(row[("layer", "")]), row[("sublayer", "")], float(row[("eps", "")])
        records.append((layer, sub, e, "gap", float(row[("gap", "mean")])))
        records.append((layer, sub, e, "gap_std", float(row[("gap", "std")])))
        records.append((layer, sub, e, "map_gap", float(row[("map_gap", "mean")])))
    items = per_sample[np.isclose(per_sample["eps"], ref)]  # one row per (layer, sublayer, token, direction)
    orders = items.groupby(["layer", "sublayer"])[["residual_order", "gap_order"]].mean()
    token_means = per_token.groupby(["layer", "sublayer"])[["transform_magnitude", "spectral_norm"]].mean()
    spectral_max = per_token.groupby(["layer", "sublayer"])["spectral_norm"].max()
    for (layer, sub), row in orders.iterrows():
        records.append((layer, sub, np.nan, "residual_order", float(row["residual_order"])))
        records.append((layer, sub, np.nan, "gap_order", float(row["gap_order"])))
    for (layer, sub), row in token_means.iterrows():
        records.append((layer, sub, np.nan, "transform_magnitude", float(row["transform_magnitude"])))
        records.append((layer, sub, np.nan, "spectral_norm", float(row["spectral_norm"])))
        records.append((layer, sub, np.nan, "spectral_norm_max", float(spectral_max[(layer, sub)])))
    metrics = pd.DataFrame(records, columns=["layer", "sublayer", "eps", "metric", "value"])
    metrics.insert(0, "prompt_set", prompt_set)
    metrics.insert(0, "model", model)
    metrics = metrics.sort_values(["metric", "sublayer", "layer", "eps"], kind="stable").reset_index(drop=True)

    def curve(sub: str, metric: str) -> list[float]:
        sel = (metrics["sublayer"] == sub) & (metrics["metric"] == metric) & metrics["eps"].isna()
        values = metrics[sel].set_index("layer")["value"]
        return [float(values.get(i, np.nan)) for i in layers]

    # every per-layer mean below is pooled over the sampled items, and its interval is a
    # bootstrap over prompts from per-prompt sums and counts
    boot = Bootstrap(len(prompts), unit="prompt", seed=p["seed"])
    per_prompt = {(sub, value): _per_prompt(items[items["sublayer"] == sub], value, prompts, layers)
                  for sub in SUBLAYERS for value in ("gap", "map_gap", "residual_order", "gap_order")}
    prefix = {"block": "", "attn": "attn_", "mlp": "mlp_"}
    out: dict = {}
    for sub in SUBLAYERS:
        pre = prefix[sub]
        for value, key in (("gap", "gap"), ("residual_order", "residual_order"), ("gap_order", "gap_order")):
            point, ci = boot.interval(*per_prompt[(sub, value)], statistic=_by_layer)
            out[f"{pre}{key}_by_layer"], out[f"{pre}{key}_by_layer_ci"] = point, ci
        out[f"{pre}mean_gap"], out[f"{pre}mean_gap_ci"] = boot.interval(*per_prompt[(sub, "gap")],
                                                                        statistic=_layer_mean)
    out["block_gap_by_layer"], out["block_gap_by_layer_ci"] = boot.interval(*per_prompt[("block", "map_gap")],
                                                                            statistic=_by_layer)
    out["block_gap_mean"], out["block_gap_mean_ci"] = boot.interval(*per_prompt[("block", "map_gap")],
                                                                    statistic=_layer_mean)
    for key in ("residual_order", "gap_order"):
        out[f"{key}_mean"], out[f"{key}_mean_ci"] = boot.interval(*per_prompt[("block", key)], statistic=_layer_mean)
        finite = [o for o in out[f"{key}_by_layer"] if np.isfinite(o)]
        out[f"{key}_range"] = [float(min(finite)), float(max(finite))] if finite else [None, None]

    gap = np.asarray(out["gap_by_layer"], dtype=float)
    most, most_stability = boot.stability(*per_prompt[("block", "gap")], statistic=_by_layer,
                                          pick=lambda v: int(np.nanargmax(v)))
    three = min(3, len(layers))
    linear, linear_stability = boot.stability(*per_prompt[("block", "gap")], statistic=_by_layer,
                                              pick=lambda v: frozenset(np.argsort(v, kind="stable")[:three].tolist()))
    boot.check_stability("most_nonlinear_layer", most_stability)
    boot.check_stability("most_linear_layers", linear_stability)
    ranked = [layers[i] for i in np.argsort(gap, kind="stable")]
    magnitude = curve("block", "transform_magnitude")
    spectral = curve("block", "spectral_norm")
    spectral_arr = np.asarray(spectral, dtype=float)
    has_spectral = np.isfinite(spectral_arr).any()
    summary = {
        "model": model,
        "prompt_set": prompt_set,
        "n_layers": adapter.n_layers,
        "layers": layers,
        "perturb": p["perturb"],
        "input_role": role,
        "eps": p["eps"],
        "ref_eps": ref,
        "n_sequences": len(prompts),
        "n_tokens": n_tokens,
        "n_directions": p["n_directions"],
        "power_iterations": p["power_iterations"],
        "dtype": str(adapter.dtype).removeprefix("torch."),
        **sample,
        "mean_gap": out["mean_gap"],
        "mean_gap_ci": out["mean_gap_ci"],
        "attn_mean_gap": out["attn_mean_gap"],
        "attn_mean_gap_ci": out["attn_mean_gap_ci"],
        "mlp_mean_gap": out["mlp_mean_gap"],
        "mlp_mean_gap_ci": out["mlp_mean_gap_ci"],
        "block_gap_mean": out["block_gap_mean"],
        "block_gap_mean_ci": out["block_gap_mean_ci"],
        "most_nonlinear_layer": int(layers[most]),
        "most_nonlinear_layer_stability": most_stability,
        "most_linear_layers": [int(i) for i in ranked[:three]],
        "most_linear_layers_stability": linear_stability,
        "residual_order_range": out["residual_order_range"],
        "residual_order_mean": out["residual_order_mean"],
        "residual_order_mean_ci": out["residual_order_mean_ci"],
        "gap_order_range": out["gap_order_range"],
        "gap_order_mean": out["gap_order_mean"],
        "gap_order_mean_ci": out["gap_order_mean_ci"],
        "max_transform_magnitude_layer": int(layers[int(np.nanargmax(magnitude))]),
        "max_spectral_norm": float(np.nanmax(spectral_arr)) if has_spectral else None,
        "max_spectral_norm_layer": int(layers[int(np.nanargmax(spectral_arr))]) if has_spectral else None,
        "spectral_max_relative_change": (float(np.nanmax(per_token["spectral_change"]))
                                         if per_token["spectral_change"].notna().any() else None),
    }
    for sub in SUBLAYERS:
        pre = prefix[sub]
        for key in ("gap", "residual_order", "gap_order"):
            summary[f"{pre}{key}_by_layer"] = out[f"{pre}{key}_by_layer"]
            summary[f"{pre}{key}_by_layer_ci"] = out[f"{pre}{key}_by_layer_ci"]
    summary["block_gap_by_layer"] = out["block_gap_by_layer"]
    summary["block_gap_by_layer_ci"] = out["block_gap_by_layer_ci"]
    summary["transform_magnitude_by_layer"] = magnitude
    summary["spectral_norm_by_layer"] = spectral
    summary.update(boot.summary())
    return LinearizationResult(metrics, per_sample, per_token, summary)


# ---------------------------------------------------------------------------- outputs

_LABELS = {"block": "block", "attn": "attention sub-layer", "mlp": "MLP sub-layer"}
_PREFIX = {"block": "", "attn": "attn_", "mlp": "mlp_"}


def _band(ax, x, values, ci, **kwargs):
    """A line with its interval as a band."""
    line, = ax.plot(x, values, marker="o", markersize=2.5, **kwargs)
    lo = [np.nan if pair[0] is None else pair[0] for pair in ci]
    hi = [np.nan if pair[1] is None else pair[1] for pair in ci]
    ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    return line


def plot_gap(result: LinearizationResult, path: str | Path) -> None:
    from layerscope.report.plotting import figure, save

    s = result.summary
    m = result.metrics
    with figure(1, 2, width=10.0, height=3.8) as (fig, axes):
        for sub in SUBLAYERS:
            key = f"{_PREFIX[sub]}gap_by_layer"
            _band(axes[0], s["layers"], s[key], s[f"{key}_ci"], label=f"{_LABELS[sub]} update")
        line = _band(axes[0], s["layers"], s["block_gap_by_layer"], s["block_gap_by_layer_ci"],
                     label="whole block h + u(h)", linestyle="--", color="0.4")
        line.set_markersize(1.5)
        axes[0].set_ylabel(f"linearization gap at ε = {s['ref_eps']:g}")
        axes[0].set_title(f"gap by layer (bands: {s['uncertainty']['level']:.0%} bootstrap over "
                          f"{s['n_sequences']} prompts)", fontsize=9)
        axes[0].legend(fontsize=7)
        block = m[(m["sublayer"] == "block") & (m["metric"] == "gap")]
        for e, group in block.groupby("eps"):
            axes[1].plot(group["layer"], group["value"], marker="o", markersize=2, label=f"ε = {e:g}")
        axes[1].set_yscale("log")
        axes[1].set_ylabel("block update gap (log scale)")
        axes[1].set_title("block update gap over the ε grid")
        axes[1].legend(ncol=2)
        for ax in axes:
            ax.set_xlabel("block")
        fig.suptitle(f"update gap ‖u(h+εv) − u(h) − J·εv‖ / ‖u(h+εv) − u(h)‖, u = f − h — {s['model']} on "
                     f"{s['prompt_set']} ({s['n_tokens']} tokens × {s['n_directions']} directions, "
                     f"perturb={s['perturb']})")
        save(fig, path)


def plot_order(result: LinearizationResult, path: str | Path) -> None:
    from layerscope.report.plotting import figure, save

    s = result.summary
    with figure(1, 2, width=10.0, height=3.6) as (fig, axes):
        for sub in SUBLAYERS:
            pre = _PREFIX[sub]
            _band(axes[0], s["layers"], s[f"{pre}gap_order_by_layer"], s[f"{pre}gap_order_by_layer_ci"],
                  label=_LABELS[sub])
            _band(axes[1], s["layers"], s[f"{pre}residual_order_by_layer"],
                  s[f"{pre}residual_order_by_layer_ci"], label=_LABELS[sub])
        axes[0].axhline(1.0, color="0.5", linestyle="--", linewidth=0.8, label="smooth limit (gap ∝ ε)")
        axes[0].set_ylabel("gap order (update gap ∝ ε^q)")
        axes[0].set_title("order of the update gap")
        axes[1].axhline(2.0, color="0.5", linestyle="--", linewidth=0.8, label="smooth limit (residual ∝ ε²)")
        axes[1].set_ylabel("residual order (residual ∝ ε^p)")
        axes[1].set_title("order of the residual")
        for ax in axes:
            ax.set_xlabel("block")
            ax.legend(fontsize=7)
        fig.suptitle(f"slopes over ε ∈ {s['eps']} — {s['model']} on {s['prompt_set']} "
                     f"(bands: bootstrap over {s['n_sequences']} prompts)")
        save(fig, path)


def plot_jacobian(result: LinearizationResult, path: str | Path) -> None:
    from layerscope.report.plotting import figure, save

    s = result.summary
    m = result.metrics
    with figure(1, 2, width=10.0, height=3.6) as (fig, axes):
        for sub in SUBLAYERS:
            for ax, metric in zip(axes, ("transform_magnitude", "spectral_norm")):
                sel = m[(m["sublayer"] == sub) & (m["metric"] == metric)]
                ax.plot(sel["layer"], sel["value"], marker="o", markersize=2.5, label=_LABELS[sub])
        axes[0].set_ylabel("‖f(h) − h‖ / ‖h‖")
        axes[0].set_title("transform magnitude")
        axes[1].set_ylabel("σ_max(J) (power iteration)")
        axes[1].set_title(f"Jacobian spectral norm ({s['power_iterations']} iterations)")
        for ax in axes:
            ax.set_xlabel("block")
        axes[0].legend()
        save(fig, path)


def run(job: Job) -> Result:
    """Load the model (float32, eager attention) and the cache, analyse every sampled block input."""
    from layerscope.model.adapter import load_model

    adapter = load_model(job.input("model"), dtype="float32", device=job.device)
    cache = ActivationCache(Path(job.input("resid")).parent)
    result = linearization(adapter, cache, model=job.model, prompt_set=job.prompt_set, params=job.params)
    return Result(
        summary=result.summary,
        tables={"metrics": result.metrics, "per_sample": result.per_sample, "per_token": result.per_token},
        figures={"gap": partial(plot_gap, result), "order": partial(plot_order, result),
                 "jacobian": partial(plot_jacobian, result)},
    )


EXPERIMENT = Experiment(
    name="linearization",
    dashboard=('attn_mean_gap', 'mlp_mean_gap', 'most_nonlinear_layer', 'gap_by_layer'),
    headlines=("attn_mean_gap", "mlp_mean_gap", "gap_by_layer"),
    family="nonlinearity",
    description="how nonlinear each block and sub-layer is",
    description_long=("Linearization gap of the update u(h) = f(h) − h of every block and of its attention and MLP "
                      "sub-layers on cached inputs of a stratified prompt sample (J·v exact by jvp), with bootstrap "
                      "intervals over prompts; orders of the gap and of the residual, the whole-block gap, transform "
                      "magnitude, Jacobian spectral norm."),
    needs="any",
    data="prompts",
    gpu=True,
    inputs=("model", "resid", "tokens"),
    run=run,
    tables=("metrics", "per_sample", "per_token"),
    figures=(Figure("gap", "gap by layer"), Figure("order", "order by layer"),
             Figure("jacobian", "magnitude and spectral norm")),
    params={'eps': {'description': "Perturbation sizes ε relative to the perturbed state's norm (‖εv‖ = ε‖h‖); the "
                               'order p is fitted over this grid.',
                'type': 'array',
                'items': {'type': 'number', 'exclusiveMinimum': 0},
                'minItems': 2,
                'uniqueItems': True,
                'default': [0.01, 0.03, 0.1, 0.3]},
        'ref_eps': {'description': 'The ε of the headline gaps (gap_by_layer, mean gaps, most linear layers); must '
                                   'be in eps.',
                    'type': 'number',
                    'exclusiveMinimum': 0,
                    'default': 0.1},
        'perturb': {'description': "'token': perturb one sampled completion token's state and measure the whole "
                                   "sequence's output; 'all': perturb every token of the sequence at once.",
                    'enum': ['token', 'all'],
                    'default': 'token'},
        'n_sequences': {'description': 'Prompts sampled from the prompt set (seeded, stratified over its '
                                       'categories); the unit of the bootstrap intervals.',
                        'type': 'integer',
                        'minimum': 1,
                        'default': 7},
        'tokens_per_sequence': {'description': 'Completion tokens sampled per prompt (prompt tokens for encoders).',
                                'type': 'integer',
                                'minimum': 1,
                                'default': 2},
        'n_directions': {'description': 'Random unit directions per sampled token.',
                         'type': 'integer',
                         'minimum': 1,
                         'default': 2},
        'power_iterations': {'description': 'Power-iteration steps (one jvp and one vjp each) for the Jacobian '
                                            'spectral norm; 0 skips it.',
                             'type': 'integer',
                             'minimum': 0,
                             'default': 5},
        'layers': {'description': 'Blocks to analyse; empty = all.',
                   'type': 'array',
                   'items': {'type': 'integer', 'minimum': 0},
                   'uniqueItems': True,
                   'default': []}},
    threads=4,
    runtime=120,
)
