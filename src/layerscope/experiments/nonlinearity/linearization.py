"""How nonlinear is each layer: the linearization gap on real cached inputs.

For a function f of the residual stream (a whole block, or its attention or MLP sub-layer,
see :class:`layerscope.model.adapter.SubLayers`) at a real input h and a direction v:

* residual r(ε) = ‖f(h + εv) − f(h) − J_f(h)·εv‖, with J_f(h)·v computed exactly by
  forward-mode AD (``torch.func.jvp``), not by finite differences;
* gap(ε) = r(ε) / ‖f(h + εv) − f(h)‖: the fraction of the actual change that the
  linearization misses (0 for an affine f);
* order p: the slope of log r against log ε (least squares over the ε grid). A smooth f
  has p = 2 for small ε (then gap ∝ ε^(p−1)); p < 2 means the residual grows more slowly
  than quadratically over the grid (curvature saturating, e.g. norms or softmax);
* transform magnitude ‖f(h) − h‖ / ‖h‖ at the sampled token;
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
from layerscope.experiments.registry import Experiment, Figure, Job, Result
from layerscope.model.adapter import ModelAdapter

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
    """Linearization residuals of N (input, direction) items over an ε grid."""

    eps: np.ndarray  # [E]
    residual: np.ndarray  # [N, E]  ‖f(x+εv) − f(x) − εJv‖
    delta: np.ndarray  # [N, E]  ‖f(x+εv) − f(x)‖
    fx: torch.Tensor  # f(x), [N, ...]

    @property
    def gap(self) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.residual / self.delta

    def order(self) -> np.ndarray:
        """Per item, the slope p of log r(ε) against log ε (NaN where some r is 0 or not finite)."""
        return fit_order(self.eps, self.residual)


@torch.no_grad()
def linearization_gap(f: Fn, x: torch.Tensor, v: torch.Tensor, eps: Sequence[float]) -> GapCurves:
    """Residuals of the first-order expansion of ``f`` at ``x`` along ``v`` for each ε.

    ``x`` and ``v`` are batches [N, ...] whose items ``f`` treats independently (copies of a
    sequence, or rows of a toy input); ``v`` carries its own scale (the perturbation at
    ε = 1). J·v comes from ``torch.func.jvp``: exact up to floating-point rounding.
    """
    if x.shape != v.shape:
        raise ValueError(f"input {tuple(x.shape)} and direction {tuple(v.shape)} differ in shape")
    eps = np.asarray(list(eps), dtype=float)
    if eps.size == 0 or (eps <= 0).any():
        raise ValueError(f"ε grid must be non-empty and positive, got {eps.tolist()}")
    x, v = x.contiguous(), v.contiguous()  # forward AD refuses expanded (aliased) inputs
    fx, jv = jvp(f, (x,), (v,))
    residual = np.zeros((x.shape[0], eps.size))
    delta = np.zeros_like(residual)
    for k, e in enumerate(eps):
        change = f(x + float(e) * v) - fx
        delta[:, k] = _item_norms(change).cpu().numpy()
        residual[:, k] = _item_norms(change - float(e) * jv).cpu().numpy()
    return GapCurves(eps, residual, delta, fx)


def fit_order(eps: np.ndarray, residual: np.ndarray) -> np.ndarray:
    """Least-squares slope of log residual against log ε, per row of ``residual`` [N, E]."""
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
                     role: str = "completion") -> list[SampledSequence]:
    """Seeded sample of sequences and, in each, of tokens with the given role."""
    tokens = cache.tokens
    eligible = [pid for pid, g in tokens.groupby("prompt_id", sort=False) if (g["role"] == role).any()]
    if not eligible:
        raise LayerscopeError(f"{cache.directory}: no tokens with role '{role}' to sample inputs from")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(eligible), size=min(n_sequences, len(eligible)), replace=False)
    out = []
    for index in sorted(chosen.tolist()):
        g = tokens[tokens["prompt_id"] == eligible[index]].sort_values("position")
        candidates = g.loc[g["role"] == role, "position"].to_numpy()
        picks = rng.choice(candidates, size=min(tokens_per_sequence, len(candidates)), replace=False)
        out.append(SampledSequence(
            str(eligible[index]), (int(g["row"].iloc[0]), int(g["row"].iloc[-1]) + 1),
            [int(i) for i in g["token_id"]], sorted(int(p) for p in picks),
        ))
    return out


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
    orders = curves.order()
    with torch.no_grad():
        fx = curves.fx[0]
    samples = []
    for item, (position, k) in enumerate(labels):
        for e_index, e in enumerate(curves.eps):
            samples.append((position, k, float(e), curves.residual[item, e_index], curves.delta[item, e_index],
                            curves.gap[item, e_index], orders[item]))
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
    sampled = sample_sequences(cache, n_sequences=p["n_sequences"], tokens_per_sequence=p["tokens_per_sequence"],
                               seed=p["seed"], role=role)
    dtype = adapter.dtype
    sample_rows, token_rows = [], []
    batched = {s.prompt_id: _BatchedInputs(adapter, s.ids) for s in sampled}
    for layer in p["layers"]:
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
        log.info("linearization: block %d done", layer)
    per_sample = pd.DataFrame(sample_rows, columns=["layer", "sublayer", "prompt_id", "position", "direction", "eps",
                                                    "residual", "delta", "gap", "order"])
    per_token = pd.DataFrame(token_rows, columns=["layer", "sublayer", "prompt_id", "position",
                                                  "transform_magnitude", "spectral_norm", "spectral_change"])
    return _summarise(per_sample, per_token, p, adapter, model=model, prompt_set=prompt_set,
                      n_tokens=sum(len(s.positions) for s in sampled), n_sequences=len(sampled), role=role)


def _summarise(per_sample, per_token, p, adapter, *, model, prompt_set, n_tokens, n_sequences, role):
    records = []
    gap_means = per_sample.groupby(["layer", "sublayer", "eps"])["gap"].agg(["mean", "std"]).reset_index()
    for row in gap_means.itertuples(index=False):
        records.append((row.layer, row.sublayer, row.eps, "gap", float(row.mean)))
        records.append((row.layer, row.sublayer, row.eps, "gap_std", float(row.std)))
    item_orders = per_sample.drop_duplicates(["layer", "sublayer", "prompt_id", "position", "direction"])
    orders = item_orders.groupby(["layer", "sublayer"])["order"].mean()
    token_means = per_token.groupby(["layer", "sublayer"])[["transform_magnitude", "spectral_norm"]].mean()
    spectral_max = per_token.groupby(["layer", "sublayer"])["spectral_norm"].max()
    for (layer, sub), value in orders.items():
        records.append((layer, sub, np.nan, "order", float(value)))
    for (layer, sub), row in token_means.iterrows():
        records.append((layer, sub, np.nan, "transform_magnitude", float(row["transform_magnitude"])))
        records.append((layer, sub, np.nan, "spectral_norm", float(row["spectral_norm"])))
        records.append((layer, sub, np.nan, "spectral_norm_max", float(spectral_max[(layer, sub)])))
    metrics = pd.DataFrame(records, columns=["layer", "sublayer", "eps", "metric", "value"])
    metrics.insert(0, "prompt_set", prompt_set)
    metrics.insert(0, "model", model)
    metrics = metrics.sort_values(["metric", "sublayer", "layer", "eps"], kind="stable").reset_index(drop=True)

    layers = p["layers"]
    ref = p["ref_eps"]

    def curve(sub: str, metric: str, eps: float | None = None) -> list[float]:
        sel = (metrics["sublayer"] == sub) & (metrics["metric"] == metric)
        sel &= metrics["eps"].isna() if eps is None else np.isclose(metrics["eps"], eps)
        values = metrics[sel].set_index("layer")["value"]
        return [float(values.get(i, np.nan)) for i in layers]

    gap = {sub: curve(sub, "gap", ref) for sub in SUBLAYERS}
    order = {sub: curve(sub, "order") for sub in SUBLAYERS}
    block_gap = np.asarray(gap["block"])
    ranked = [layers[i] for i in np.argsort(block_gap, kind="stable")]
    finite_orders = [o for o in order["block"] if np.isfinite(o)]
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
        "n_sequences": n_sequences,
        "n_tokens": n_tokens,
        "n_directions": p["n_directions"],
        "power_iterations": p["power_iterations"],
        "dtype": str(adapter.dtype).removeprefix("torch."),
        "block_mean_gap": float(np.nanmean(block_gap)),
        "attn_mean_gap": float(np.nanmean(gap["attn"])),
        "mlp_mean_gap": float(np.nanmean(gap["mlp"])),
        "most_nonlinear_layer": int(layers[int(np.nanargmax(block_gap))]),
        "most_linear_layers": [int(i) for i in ranked[:3]],
        "order_range": [float(min(finite_orders)), float(max(finite_orders))] if finite_orders else [None, None],
        "order_mean": float(np.mean(finite_orders)) if finite_orders else None,
        "max_transform_magnitude_layer": int(layers[int(np.nanargmax(magnitude))]),
        "max_spectral_norm": float(np.nanmax(spectral_arr)) if has_spectral else None,
        "max_spectral_norm_layer": int(layers[int(np.nanargmax(spectral_arr))]) if has_spectral else None,
        "spectral_max_relative_change": (float(np.nanmax(per_token["spectral_change"]))
                                         if per_token["spectral_change"].notna().any() else None),
        "gap_by_layer": gap["block"],
        "attn_gap_by_layer": gap["attn"],
        "mlp_gap_by_layer": gap["mlp"],
        "order_by_layer": order["block"],
        "attn_order_by_layer": order["attn"],
        "mlp_order_by_layer": order["mlp"],
        "transform_magnitude_by_layer": magnitude,
        "spectral_norm_by_layer": spectral,
    }
    return LinearizationResult(metrics, per_sample, per_token, summary)


# ---------------------------------------------------------------------------- outputs

_LABELS = {"block": "block", "attn": "attention sub-layer", "mlp": "MLP sub-layer"}


def plot_gap(result: LinearizationResult, path: str | Path) -> None:
    from layerscope.report.plotting import figure, save

    s = result.summary
    m = result.metrics
    with figure(1, 2, width=10.0, height=3.8) as (fig, axes):
        for sub in SUBLAYERS:
            axes[0].plot(s["layers"], s[{"block": "gap_by_layer", "attn": "attn_gap_by_layer",
                                         "mlp": "mlp_gap_by_layer"}[sub]], marker="o", markersize=2.5,
                         label=_LABELS[sub])
        axes[0].set_ylabel(f"linearization gap at ε = {s['ref_eps']:g}")
        axes[0].set_title("gap by layer")
        axes[0].legend()
        block = m[(m["sublayer"] == "block") & (m["metric"] == "gap")]
        for e, group in block.groupby("eps"):
            axes[1].plot(group["layer"], group["value"], marker="o", markersize=2, label=f"ε = {e:g}")
        axes[1].set_yscale("log")
        axes[1].set_ylabel("block gap (log scale)")
        axes[1].set_title("block gap over the ε grid")
        axes[1].legend(ncol=2)
        for ax in axes:
            ax.set_xlabel("block")
        fig.suptitle(f"linearization gap ‖f(h+εv) − f(h) − J·εv‖ / ‖f(h+εv) − f(h)‖ — {s['model']} on "
                     f"{s['prompt_set']} ({s['n_tokens']} tokens × {s['n_directions']} directions, "
                     f"perturb={s['perturb']})")
        save(fig, path)


def plot_order(result: LinearizationResult, path: str | Path) -> None:
    from layerscope.report.plotting import figure, save

    s = result.summary
    with figure(width=6.4, height=3.6) as (fig, ax):
        for sub, key in (("block", "order_by_layer"), ("attn", "attn_order_by_layer"), ("mlp", "mlp_order_by_layer")):
            ax.plot(s["layers"], s[key], marker="o", markersize=2.5, label=_LABELS[sub])
        ax.axhline(2.0, color="0.5", linestyle="--", linewidth=0.8, label="smooth (quadratic) limit")
        ax.set_xlabel("block")
        ax.set_ylabel("order p (residual ∝ ε^p)")
        ax.set_title(f"nonlinearity order by layer (ε ∈ {s['eps']})")
        ax.legend()
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
    family="nonlinearity",
    description="how nonlinear each block and sub-layer is",
    description_long=("Linearization gap of every block and of its attention and MLP sub-layers on sampled cached "
                      "inputs (J·v exact by jvp), order of nonlinearity, transform magnitude, Jacobian spectral norm."),
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
        'ref_eps': {'description': 'The ε of the headline gap (gap_by_layer, mean gaps, most linear layers); must '
                                   'be in eps.',
                    'type': 'number',
                    'exclusiveMinimum': 0,
                    'default': 0.1},
        'perturb': {'description': "'token': perturb one sampled completion token's state and measure the whole "
                                   "sequence's output; 'all': perturb every token of the sequence at once.",
                    'enum': ['token', 'all'],
                    'default': 'token'},
        'n_sequences': {'description': 'Prompts sampled (seeded) from the prompt set.',
                        'type': 'integer',
                        'minimum': 1,
                        'default': 2},
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
