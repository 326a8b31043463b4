"""The tuned lens: a learned affine translator per residual boundary, against the logit lens.

For every boundary ``resid.l`` below the last (l = 0 … L−1) a translator
``T_l(h) = h + A_l h + b_l`` maps the residual stream into the space the model's own
read-out (final norm, unembedding, soft-cap; :class:`~layerscope.engines.readout.Readout`)
expects; the lens distribution is ``softmax(readout(T_l(h)))``. At l = L the read-out is
the model's output and no translator is used. The translators are fitted to minimise
KL(final ‖ lens) on a training split of the prompts and evaluated on the held-out prompts,
side by side with the logit lens (A_l = 0, b_l = 0) on the same tokens.

Split: the prompts with at least one completion token are split by a seeded, stratified
sample (:mod:`layerscope.engines.sampling`) into ``train_fraction`` training prompts and the
rest held out. The split is by prompt: no token of a held-out prompt is seen in training.

Fitting, in two stages (a full-vocabulary KL over many tokens and steps is beyond a small
CPU budget):

1. a closed-form ridge regression of the final stream on the layer's stream, over every
   training token of the roles ``train_roles``: with X the layer's states and
   Y = c_l · resid.L (c_l = the ratio of the two layers' root-mean-square norms over the
   training tokens, so that the two streams have the same scale; 1 for a model without a
   final norm), W = argmin ‖X_c W − Y_c‖² + λ ‖W − I‖² on centred data, i.e. shrunk towards
   the identity (the logit lens), with λ = ``ridge`` · tr(X_cᵀX_c)/d. The final norm is
   invariant to the scale of its input, so the read-out of c_l · resid.L is the model's
   output. When the layers are an exact affine function of the final stream this stage
   already recovers it (up to the ridge).
2. ``steps`` Adam steps (learning rate ``lr``) on the exact KL(final ‖ lens) over the full
   vocabulary, each on a fresh seeded sample of ``tokens_per_step`` training tokens.

Evaluation on the held-out prompts' completion-token positions (the first
``max_target_tokens`` of each completion, or all): per layer and lens, KL(final ‖ lens),
top-1 agreement with the final top-1 and the other logit-lens metrics; per token
``first_top1`` and ``crystallization`` from the same functions as the logit lens, so the two
lenses are comparable. Uncertainty: a bootstrap over the held-out prompts (per-prompt sums
and token counts, as in the logit lens); both lenses share the resamples, so the per-layer
differences are paired.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from layerscope import LayerscopeError
from layerscope.data.activations import ActivationCache
from layerscope.engines.readout import Readout
from layerscope.engines.sampling import sample_cache_prompts, sample_summary
from layerscope.engines.statistics import N_BOOT, Bootstrap, weighted_mean
from layerscope.experiments.lens.logit_lens import (
    LAYER_METRICS, LensArrays, _curve_intervals, _layer_curves, _token_stats, _token_values, _units,
    lens_arrays, per_token_table,
)
from layerscope.experiments.registry import Experiment, Figure, Job, Result
from layerscope.model.adapter import ModelAdapter

log = logging.getLogger(__name__)

TRANSLATOR_CONVENTION = "T_l(h) = h + h @ weight[l].T + bias[l] for l < n_layers; identity at l = n_layers"
LOG_EVERY_S = 5.0


# ---------------------------------------------------------------------------- translators


@dataclass
class Translators:
    """One affine translator per boundary l = 0 … L−1 (the last boundary is read as it is)."""

    weight: torch.Tensor  # [L, d, d]: A_l, torch.nn.Linear convention (out, in)
    bias: torch.Tensor  # [L, d]

    @property
    def n_layers(self) -> int:
        return int(self.weight.shape[0])

    @classmethod
    def identity(cls, n_layers: int, d: int, device="cpu") -> "Translators":
        return cls(torch.zeros(n_layers, d, d, device=device), torch.zeros(n_layers, d, device=device))

    def __call__(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        if layer >= self.n_layers:
            return hidden
        w, b = self.weight[layer], self.bias[layer]
        return hidden + hidden @ w.T.to(hidden) + b.to(hidden)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for layer in range(self.n_layers):
            out[f"translators.{layer}.weight"] = self.weight[layer].detach().float().cpu().contiguous()
            out[f"translators.{layer}.bias"] = self.bias[layer].detach().float().cpu().contiguous()
        return out

    def save(self, path: str | Path, metadata: dict | None = None) -> None:
        from safetensors.torch import save_file

        from layerscope.jobs.io import atomic_path

        meta = {"n_layers": str(self.n_layers), "d_model": str(self.weight.shape[-1]),
                "convention": TRANSLATOR_CONVENTION,
                **{k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}}
        with atomic_path(path) as tmp:
            save_file(self.tensors(), str(tmp), metadata=meta)

    @classmethod
    def load(cls, path: str | Path, device="cpu") -> "Translators":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            n = int(handle.metadata()["n_layers"])
            weight = torch.stack([handle.get_tensor(f"translators.{l}.weight") for l in range(n)])
            bias = torch.stack([handle.get_tensor(f"translators.{l}.bias") for l in range(n)])
        return cls(weight, bias)


# ---------------------------------------------------------------------------- the split


@dataclass
class Split:
    train: list[str]
    heldout: list[str]
    n_empty_completions: int
    categories: dict[str, str]  # prompt id -> category


def split_prompts(tokens: pd.DataFrame, train_fraction: float, seed: int) -> Split:
    """A seeded, category-stratified split of the prompts with a completion token."""
    per_prompt = tokens.groupby("prompt_id", sort=False).agg(category=("category", "first"),
                                                              n_targets=("is_target", "sum"))
    eligible = per_prompt[per_prompt["n_targets"] > 0]
    if len(eligible) < 2:
        raise LayerscopeError(f"the tuned lens needs at least 2 prompts with a completion token (got {len(eligible)})")
    n_train = min(len(eligible) - 1, max(1, int(round(train_fraction * len(eligible)))))
    train, info = sample_cache_prompts(tokens, n_train, seed=seed)
    chosen = set(train)
    heldout = [str(p) for p in eligible.index if str(p) not in chosen]
    return Split(train, heldout, info["n_empty_completions"],
                 {str(p): str(c) for p, c in eligible["category"].items()})


def training_rows(tokens: pd.DataFrame, prompts: list[str], roles: list[str]) -> np.ndarray:
    """Cache rows of the training prompts' tokens of the given roles (ascending)."""
    keep = tokens["prompt_id"].astype(str).isin(set(prompts)) & tokens["role"].isin(list(roles))
    return np.sort(tokens.loc[keep, "row"].to_numpy(dtype=np.int64))


def evaluation_rows(tokens: pd.DataFrame, prompts: list[str], max_target_tokens: int | None) -> np.ndarray:
    """Completion-token rows of the held-out prompts: the first ``max_target_tokens`` of each (ascending)."""
    keep = tokens["prompt_id"].astype(str).isin(set(prompts)) & tokens["is_target"]
    if max_target_tokens is not None:
        keep &= tokens["target_index"] < int(max_target_tokens)
    return np.sort(tokens.loc[keep, "row"].to_numpy(dtype=np.int64))


# ---------------------------------------------------------------------------- fitting


def ridge_to_identity(x: torch.Tensor, y: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) minimising ‖x W + b − y‖² + λ‖W − I‖², λ = ridge · tr(cov-sum of x)/d; float64."""
    x, y = x.double(), y.double()
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc, yc = x - x_mean, y - y_mean
    gram = xc.T @ xc
    d = gram.shape[0]
    lam = float(ridge) * float(gram.diagonal().sum()) / d
    eye = torch.eye(d, dtype=gram.dtype, device=gram.device)
    if lam > 0:
        w = torch.linalg.solve(gram + lam * eye, xc.T @ yc + lam * eye)
    else:
        w = torch.linalg.lstsq(xc, yc).solution if x.device.type == "cpu" else torch.linalg.pinv(xc) @ yc
    return w, y_mean - x_mean @ w


def _kl(ref_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(ref ‖ lens) per row, from log-probabilities."""
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1)


@dataclass
class Fit:
    translators: Translators
    train_kl_init: np.ndarray  # [L] in-sample KL of the least-squares stage on a sample of training tokens
    train_kl: np.ndarray  # [L] the same after the KL steps
    scale: np.ndarray  # [L] c_l
    n_train_tokens: int
    seconds: float


class _FrozenReadout:
    """The read-out with the model's parameters frozen (gradients reach the translators only)."""

    def __init__(self, adapter: ModelAdapter):
        self.readout = Readout(adapter)
        modules = [m for m in (adapter.final_norm, adapter.unembed, self.readout) if m is not None]
        self.params = list({id(p): p for m in modules for p in m.parameters() if p.requires_grad}.values())

    def __enter__(self):
        for p in self.params:
            p.requires_grad_(False)
        return self.readout

    def __exit__(self, *exc):
        for p in self.params:
            p.requires_grad_(True)


def fit_translators(adapter: ModelAdapter, cache: ActivationCache, rows: np.ndarray, *, ridge: float = 0.03,
                    steps: int = 8, lr: float = 3e-4, tokens_per_step: int = 64, seed: int = 0) -> Fit:
    """Least-squares translators towards the final stream, then ``steps`` Adam steps on KL(final ‖ lens)."""
    start = time.perf_counter()
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) < 2:
        raise LayerscopeError(f"the tuned lens needs training tokens (got {len(rows)})")
    n_layers, device = adapter.n_layers, adapter.device
    final = cache.resid(n_layers, rows).to(device)
    states = [cache.resid(layer, rows).to(device) for layer in range(n_layers)]
    d = final.shape[1]
    weight = torch.zeros(n_layers, d, d, device=device)
    bias = torch.zeros(n_layers, d, device=device)
    scale = np.ones(n_layers)
    final_ms = float(final.double().pow(2).mean())
    for layer, x in enumerate(states):
        if adapter.final_norm is not None and final_ms > 0:
            scale[layer] = float(np.sqrt(float(x.double().pow(2).mean()) / final_ms))
        w, b = ridge_to_identity(x, scale[layer] * final, ridge)
        eye = torch.eye(d, dtype=w.dtype, device=w.device)
        weight[layer] = (w - eye).T.float()
        bias[layer] = b.float()
    translators = Translators(weight, bias)
    log.info("tuned lens: least-squares translators for %d layers from %d tokens (%.1fs)", n_layers, len(rows),
             time.perf_counter() - start)

    generator = torch.Generator().manual_seed(int(seed))
    n_batch = min(int(tokens_per_step), len(rows))

    def batch() -> torch.Tensor:
        return torch.randperm(len(rows), generator=generator)[:n_batch].sort().values.to(device)

    monitor = batch()  # one fixed sample of training tokens: in-sample KL before and after the steps
    with _FrozenReadout(adapter) as readout:
        train_kl_init = _batch_kl(readout, translators, states, final, monitor)
        if steps > 0:
            weight.requires_grad_(True)
            bias.requires_grad_(True)
            optimizer = torch.optim.Adam([weight, bias], lr=float(lr))
            last = time.perf_counter()
            for step in range(int(steps)):
                idx = batch()
                with torch.no_grad():
                    ref = torch.log_softmax(readout(final[idx]), dim=-1)
                optimizer.zero_grad(set_to_none=True)
                for layer in range(n_layers):
                    logp = torch.log_softmax(readout(translators(layer, states[layer][idx])), dim=-1)
                    _kl(ref, logp).mean().backward()
                optimizer.step()
                if time.perf_counter() - last > LOG_EVERY_S:
                    log.info("tuned lens: KL step %d/%d", step + 1, steps)
                    last = time.perf_counter()
            weight.requires_grad_(False)
            bias.requires_grad_(False)
        train_kl = _batch_kl(readout, translators, states, final, monitor)
    seconds = time.perf_counter() - start
    log.info("tuned lens: %d KL steps of %d tokens done (%.1fs)", steps, n_batch, seconds)
    return Fit(Translators(weight.detach(), bias.detach()), train_kl_init, train_kl, scale, len(rows), seconds)


@torch.no_grad()
def _batch_kl(readout, translators: Translators, states, final, idx) -> np.ndarray:
    ref = torch.log_softmax(readout(final[idx]), dim=-1)
    return np.array([float(_kl(ref, torch.log_softmax(readout(translators(layer, x[idx])), dim=-1)).mean())
                     for layer, x in enumerate(states)])


# ---------------------------------------------------------------------------- evaluation


@dataclass
class TunedLensResult:
    metrics: pd.DataFrame
    per_token: pd.DataFrame
    summary: dict
    curves: dict  # lens -> metric -> array over layers ("tuned", "logit", "logit_minus_tuned")
    curve_ci: dict  # lens -> metric -> [n_layers + 1, 2]
    translators: Translators
    split: Split


def _prefixed(stats: dict, prefix: str) -> dict:
    return {f"{prefix}{k}": v for k, v in stats.items() if k not in ("n_tokens", "n_prompts")}


def tuned_lens(
    adapter: ModelAdapter,
    cache: ActivationCache,
    *,
    model: str,
    prompt_set: str,
    train_fraction: float = 0.5,
    train_roles: tuple[str, ...] = ("prompt", "completion"),
    ridge: float = 0.03,
    steps: int = 8,
    lr: float = 3e-4,
    tokens_per_step: int = 64,
    max_target_tokens: int | None = 16,
    topk: int = 10,
    chunk_tokens: int = 256,
    seed: int = 0,
    n_boot: int = N_BOOT,
) -> TunedLensResult:
    if adapter.unembed is None:
        raise LayerscopeError("the tuned lens needs a decoder with an unembedding")
    if cache.n_layers != adapter.n_layers or cache.d_model != adapter.facts.d_model:
        raise LayerscopeError(
            f"activation cache ({cache.n_layers} layers, d={cache.d_model}) does not match the model "
            f"({adapter.n_layers} layers, d={adapter.facts.d_model})")
    tokens = cache.tokens
    split = split_prompts(tokens, train_fraction, seed)
    train_rows = training_rows(tokens, split.train, list(train_roles))
    fit = fit_translators(adapter, cache, train_rows, ridge=ridge, steps=steps, lr=lr,
                          tokens_per_step=tokens_per_step, seed=seed)
    rows = evaluation_rows(tokens, split.heldout, max_target_tokens)
    log.info("tuned lens: evaluating %d tokens of %d held-out prompts", len(rows), len(split.heldout))
    logit = lens_arrays(adapter, cache, chunk_tokens=chunk_tokens, rows=rows)
    tuned = lens_arrays(adapter, cache, chunk_tokens=chunk_tokens, rows=rows, transform=fit.translators)
    return _evaluate(tuned, logit, tokens, split, fit, model=model, prompt_set=prompt_set, topk=topk, seed=seed,
                     n_boot=n_boot, params={"train_fraction": train_fraction, "train_roles": list(train_roles),
                                            "ridge": ridge, "steps": steps, "lr": lr,
                                            "tokens_per_step": tokens_per_step,
                                            "max_target_tokens": max_target_tokens, "topk": topk},
                     device=str(adapter.device))


def _evaluate(tuned: LensArrays, logit: LensArrays, tokens: pd.DataFrame, split: Split, fit: Fit, *, model: str,
              prompt_set: str, topk: int, seed: int, n_boot: int, params: dict, device: str) -> TunedLensResult:
    n_layers = fit.translators.n_layers
    table_t = per_token_table(tuned, tokens, topk)
    table_l = per_token_table(logit, tokens, topk)
    every = np.ones(len(table_t), dtype=bool)
    units = _units(table_t, every)
    boot = Bootstrap(units.n, unit="prompt", n_boot=n_boot, seed=seed)

    values = {"tuned": _token_values(tuned, topk), "logit": _token_values(logit, topk)}
    values["logit_minus_tuned"] = {m: values["logit"][m] - values["tuned"][m] for m in LAYER_METRICS}
    curves = {"tuned": _layer_curves(tuned, every, topk), "logit": _layer_curves(logit, every, topk)}
    curves["logit_minus_tuned"] = {m: curves["logit"][m] - curves["tuned"][m] for m in LAYER_METRICS}
    curve_ci = {lens: _curve_intervals(values[lens], curves[lens], units, boot) for lens in curves}

    records = [(lens, layer, metric, float(x), *map(float, curve_ci[lens][metric][layer]))
               for lens, metrics in curves.items() for metric, v in metrics.items() for layer, x in enumerate(v)]
    frame = pd.DataFrame(records, columns=["lens", "layer", "metric", "value", "ci_lo", "ci_hi"])
    frame.insert(0, "prompt_set", prompt_set)
    frame.insert(0, "model", model)

    per_token = table_t.copy()
    for key in ("first_top1", "crystallization", "gap", "first_topk", "crystallization_topk", "gap_topk"):
        per_token[f"logit_lens_{key}"] = table_l[key].to_numpy()

    def token_interval(per_tok: np.ndarray) -> tuple[float, list]:
        point, ci = boot.interval(units.sums(per_tok), units.counts(), statistic=weighted_mean)
        return point, ci

    # a mean over the boundaries with a translator (0 … L−1) per token, then over tokens
    kl_mean, kl_mean_ci = token_interval(tuned.kl[:n_layers].mean(axis=0))
    logit_kl_mean, logit_kl_mean_ci = token_interval(logit.kl[:n_layers].mean(axis=0))
    cryst_diff, cryst_diff_ci = token_interval(
        (table_l["crystallization"] - table_t["crystallization"]).to_numpy(dtype=float))
    first_diff, first_diff_ci = token_interval((table_l["first_top1"] - table_t["first_top1"]).to_numpy(dtype=float))
    kl_diff_ci = curve_ci["logit_minus_tuned"]["kl_final"]
    below = [layer for layer in range(n_layers) if kl_diff_ci[layer][0] > 0]
    stats_t = _token_stats(table_t, units, boot)
    stats_l = _token_stats(table_l, units, boot)

    def per_layer(lens: str, metric: str) -> tuple[list, list]:
        return [float(x) for x in curves[lens][metric]], np.asarray(curve_ci[lens][metric], dtype=float).tolist()

    kl, kl_ci = per_layer("tuned", "kl_final")
    lkl, lkl_ci = per_layer("logit", "kl_final")
    dkl, dkl_ci = per_layer("logit_minus_tuned", "kl_final")
    top1, top1_ci = per_layer("tuned", "top1_agreement")
    ltop1, ltop1_ci = per_layer("logit", "top1_agreement")
    heldout_sample = sample_summary(list(split.categories), list(split.categories.values()), split.heldout)
    train_sample = sample_summary(list(split.categories), list(split.categories.values()), split.train)
    if not below:
        boot.flag("the tuned lens's KL is not below the logit lens's at any layer (paired interval)")
    summary = {
        "model": model,
        "prompt_set": prompt_set,
        "n_layers": n_layers,
        "device": device,
        **params,
        "seed": int(seed),
        "heldout_prompts": list(split.heldout),
        "train_prompts": list(split.train),
        "n_heldout_prompts": len(split.heldout),
        "n_train_prompts": len(split.train),
        "prompt_ids": heldout_sample["prompt_ids"],
        "prompt_categories": heldout_sample["prompt_categories"],
        "train_prompt_categories": train_sample["prompt_categories"],
        "n_empty_completions": split.n_empty_completions,
        "n_train_tokens": fit.n_train_tokens,
        "n_tokens": stats_t["n_tokens"],
        "kl_by_layer": kl,
        "kl_by_layer_ci": kl_ci,
        "logit_lens_kl_by_layer": lkl,
        "logit_lens_kl_by_layer_ci": lkl_ci,
        "kl_difference_by_layer": dkl,
        "kl_difference_by_layer_ci": dkl_ci,
        "layers_tuned_below_logit": below,
        "kl_mean": kl_mean,
        "kl_mean_ci": kl_mean_ci,
        "logit_lens_kl_mean": logit_kl_mean,
        "logit_lens_kl_mean_ci": logit_kl_mean_ci,
        "top1_agreement_by_layer": top1,
        "top1_agreement_by_layer_ci": top1_ci,
        "logit_lens_top1_agreement_by_layer": ltop1,
        "logit_lens_top1_agreement_by_layer_ci": ltop1_ci,
        **_prefixed(stats_t, ""),
        **_prefixed(stats_l, "logit_lens_"),
        "crystallization_difference": cryst_diff,
        "crystallization_difference_ci": cryst_diff_ci,
        "first_top1_difference": first_diff,
        "first_top1_difference_ci": first_diff_ci,
        "train_kl_init_by_layer": fit.train_kl_init.tolist(),
        "train_kl_by_layer": fit.train_kl.tolist(),
        "stream_scale_by_layer": fit.scale.tolist(),
        "train_seconds": round(fit.seconds, 2),
        **boot.summary(),
    }
    return TunedLensResult(frame, per_token, summary, curves, curve_ci, fit.translators, split)


# ---------------------------------------------------------------------------- outputs


def plot_curves(result: TunedLensResult, path: str | Path) -> None:
    from layerscope.report.plotting import figure, layer_axis, save

    s = result.summary
    n_layers = s["n_layers"]
    x = np.arange(n_layers + 1)
    lenses = (("tuned", "tuned lens", "-"), ("logit", "logit lens", "--"))
    with figure(1, 2, width=9.0, height=3.6) as (fig, axes):
        for lens, label, style in lenses:
            # KL is 0 for both lenses at layer L (the model's output): drawn below L only, on a log axis
            for ax, metric, upto in ((axes[0], "kl_final", n_layers), (axes[1], "top1_agreement", n_layers + 1)):
                ci = np.asarray(result.curve_ci[lens][metric], dtype=float)[:upto]
                line, = ax.plot(x[:upto], result.curves[lens][metric][:upto], linestyle=style, marker="o",
                                markersize=2.5, label=label)
                ax.fill_between(x[:upto], ci[:, 0], ci[:, 1], color=line.get_color(), alpha=0.2, linewidth=0)
        axes[0].plot(x[:n_layers], s["train_kl_by_layer"], linestyle=":", color="0.4",
                     label="tuned lens, training tokens (in-sample)")
        kl_all = np.concatenate([result.curves[lens]["kl_final"][:n_layers] for lens, _, _ in lenses])
        if np.all(kl_all > 0) and np.all(np.asarray(s["train_kl_by_layer"]) > 0):
            axes[0].set_yscale("log")
        axes[0].set_ylabel(f"KL(final ‖ lens) (nats; 0 at layer {n_layers})")
        axes[1].set_ylabel("top-1 = final top-1 (fraction)")
        for ax in axes:
            layer_axis(ax, n_layers)
        axes[0].legend(loc="lower left")
        fig.suptitle(f"tuned vs logit lens — {s['model']} on {s['prompt_set']}: {s['n_tokens']} completion tokens of "
                     f"{s['n_heldout_prompts']} held-out prompts (trained on {s['n_train_prompts']})\n"
                     "bands: 95% bootstrap over held-out prompts")
        save(fig, path)


def _save_translators(result: TunedLensResult, metadata: dict, path: Path) -> None:
    result.translators.save(path, metadata)


def run(job: Job) -> Result:
    """Fit the tuned lens on the training prompts and compare it with the logit lens on the held-out ones."""
    from layerscope.model.adapter import load_model

    params = job.params
    adapter = load_model(job.input("model"), dtype="float32", device=job.device, kind="decoder")
    cache = ActivationCache(Path(job.input("resid")).parent)
    result = tuned_lens(
        adapter, cache, model=job.model, prompt_set=job.prompt_set, train_fraction=params["train_fraction"],
        train_roles=tuple(params["train_roles"]), ridge=params["ridge"], steps=params["steps"], lr=params["lr"],
        tokens_per_step=params["tokens_per_step"], max_target_tokens=params["max_target_tokens"],
        topk=params["topk"], chunk_tokens=params["chunk_tokens"], seed=params["seed"])
    metadata = {"model": job.model, "prompt_set": job.prompt_set, "train_prompts": result.split.train,
                "heldout_prompts": result.split.heldout,
                "params": {k: result.summary[k] for k in ("train_fraction", "train_roles", "ridge", "steps", "lr",
                                                          "tokens_per_step", "seed")}}
    return Result(
        summary=result.summary,
        tables={"metrics": result.metrics, "per_token": result.per_token},
        figures={"curves": partial(plot_curves, result)},
        files={"translators.safetensors": partial(_save_translators, result, metadata)},
    )


EXPERIMENT = Experiment(
    name="tuned_lens",
    headlines=("kl_mean", "logit_lens_kl_mean", "crystallization_mean", "logit_lens_crystallization_mean"),
    family="lens",
    description="a learned affine lens per layer against the logit lens, on held-out prompts",
    description_long="The tuned lens: per residual boundary an affine translator (identity at the start) fitted "
                     "to minimise KL(final ‖ lens) on a seeded training split of the prompts, evaluated on the "
                     "held-out prompts side by side with the logit lens.",
    needs="decoder",
    data="prompts",
    gpu=True,
    inputs=("model", "resid", "tokens"),
    run=run,
    tables=("metrics", "per_token"),
    figures=(Figure("curves", "KL and top-1 agreement by layer, tuned vs logit lens"),),
    files=("translators.safetensors",),
    params={
        "train_fraction": {
            "description": "Fraction of the prompts (with a completion token) the translators are fitted on: a "
                           "seeded sample stratified by category; the rest are held out for evaluation.",
            "type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1, "default": 0.5,
        },
        "train_roles": {
            "description": "Token roles of the training prompts used as training positions (system and template "
                           "tokens repeat identically in every prompt).",
            "type": "array", "items": {"type": "string", "enum": ["system", "template", "prompt", "completion"]},
            "minItems": 1, "default": ["prompt", "completion"],
        },
        "ridge": {
            "description": "Strength of the shrinkage of the least-squares translator towards the identity (the "
                           "logit lens), relative to the mean variance of the layer's stream.",
            "type": "number", "minimum": 0, "default": 0.03,
        },
        "steps": {
            "description": "Adam steps on KL(final ‖ lens) after the least-squares stage (0: least squares only).",
            "type": "integer", "minimum": 0, "default": 8,
        },
        "lr": {"description": "Adam learning rate of the KL steps.", "type": "number", "exclusiveMinimum": 0,
               "default": 3e-4},
        "tokens_per_step": {
            "description": "Training tokens per KL step (a fresh seeded sample each step; full-vocabulary KL).",
            "type": "integer", "minimum": 1, "default": 64,
        },
        "max_target_tokens": {
            "description": "Evaluate the first N completion tokens of each held-out prompt (null: all).",
            "type": ["integer", "null"], "minimum": 1, "default": 16,
        },
        "topk": {
            "description": "k of the top-k variant of first/crystallization layer (as in logit_lens).",
            "type": "integer", "minimum": 1, "default": 10,
        },
        "chunk_tokens": {
            "description": "Tokens projected through the unembedding at once in the evaluation (memory, not "
                           "results).",
            "type": "integer", "minimum": 1, "default": 256,
        },
    },
    threads=2,
    runtime=60,
)
