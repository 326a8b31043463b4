"""Models side by side: representation similarity and embedding alignment.

**Linear CKA between layers** (``cka``), for a pair of models on a shared prompt set, from
their activation caches. Models with different tokenizers split the same text into
different tokens, so tokens cannot be matched one to one; the shared unit is the *prompt*:
each model's residual stream ``resid.l`` is mean-pooled over the prompt's own text tokens
(role ``prompt``: no system message, chat template, special tokens or the model's own
completion, which differ between models), giving one vector per prompt and layer. CKA
then compares the n_prompts × d representations of every layer of one model with every
layer of the other:

* ``cka`` — Kornblith et al.'s linear CKA, ⟨K̃, L̃⟩_F / (‖K̃‖_F ‖L̃‖_F) with K̃ = H X Xᵀ H
  (the biased HSIC estimator; equal to ‖Yᵀ X‖_F² / (‖Xᵀ X‖_F ‖Yᵀ Y‖_F) for centred X, Y);
* ``cka_debiased`` — the same with Song et al.'s unbiased HSIC estimator (features centred
  first). With few prompts relative to the width, the biased estimator is inflated
  (unrelated representations score well above 0); the debiased one is not.

Both are 1 for a representation with itself and invariant to orthogonal transforms and
isotropic scaling of either representation.

Uncertainty of the debiased headlines: a bootstrap over prompts (the pooled unit). A
resample is a vector of prompt multiplicities and every debiased CKA is recomputed on it as
the U-statistic over 4-tuples of *distinct* prompts weighted by their multiplicities
(:func:`hsic_unbiased_weighted`): copies of one prompt are never paired with each other,
just as the unbiased estimator never pairs a sample with itself. (Recomputing the plain
estimator on a resample with copies pairs them, and on unrelated representations moves the
whole distribution from ≈0 to ≈0.8.) The argmax layer pair gets its stability. The biased
estimator gets no interval: its small-sample inflation grows on a resample.

**Orthogonal Procrustes alignment of the input embeddings** (``procrustes``), for a pair
sharing a tokenizer (identical token → id maps): the rows of the shared vocabulary are split
by a seeded permutation into a train part and a held-out part; both matrices are centred
on their train means; when widths differ, the wider one is reduced by PCA (fitted on its
train rows) to the narrower width; ``scipy.linalg.orthogonal_procrustes`` fits R with
A R ≈ B on the train rows. Held-out scores: mean cosine between A_i R and B_i, k-NN
overlap@k (|k nearest held-out B rows of A_i R ∩ k nearest of B_i| / k, cosine, both among
the held-out rows other than B_i: a point is not its own neighbour) and top-1 retrieval
(B_i is the nearest row to A_i R), against a seeded random rotation (and the identity, when
no PCA was needed) in place of R. Each held-out score gets a bootstrap interval over the
held-out tokens, conditional on the fitted R and on the held-out pool.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from layerscope import LayerscopeError
from layerscope.data.activations import ActivationCache
from layerscope.engines.sampling import sample_summary
from layerscope.engines.statistics import N_BOOT, Bootstrap, contain, deterministic, mean
from layerscope.experiments.registry import Experiment, Figure, Job, Result

log = logging.getLogger(__name__)

POOLED_ROLES = {"prompt": ("prompt",), "all": None}


# ---------------------------------------------------------------------------- CKA


def _centered(x: np.ndarray | torch.Tensor) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x - x.mean(axis=0, keepdims=True)


def gram(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """Linear-kernel Gram matrix of the centred rows of x: X_c X_cᵀ (n × n)."""
    xc = _centered(x)
    return xc @ xc.T


def hsic_biased(k: np.ndarray, l: np.ndarray) -> float:
    """tr(K H L H) / (n − 1)² with H the centring matrix."""
    n = k.shape[0]
    h = np.eye(n) - 1.0 / n
    return float(np.sum((h @ k @ h) * (h @ l @ h)) / (n - 1) ** 2)


def hsic_unbiased(k: np.ndarray, l: np.ndarray) -> float:
    """Song et al. (2012)'s unbiased HSIC estimator (needs n ≥ 4)."""
    n = k.shape[0]
    if n < 4:
        raise LayerscopeError(f"the debiased CKA needs at least 4 samples, got {n}")
    kt, lt = k.copy(), l.copy()
    np.fill_diagonal(kt, 0.0)
    np.fill_diagonal(lt, 0.0)
    ones_k, ones_l = kt.sum(axis=0), lt.sum(axis=0)
    value = np.sum(kt * lt) + kt.sum() * lt.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * float(ones_k @ ones_l)
    return float(value / (n * (n - 3)))


def cka_from_grams(k: np.ndarray, l: np.ndarray, *, debiased: bool = False) -> float:
    """CKA of two Gram matrices of centred features (see :func:`gram`)."""
    hsic = hsic_unbiased if debiased else hsic_biased
    denom = hsic(k, k) * hsic(l, l)
    if denom <= 0:
        return float("nan")
    return float(hsic(k, l) / np.sqrt(denom))


def linear_cka(x, y, *, debiased: bool = False) -> float:
    """Linear CKA between representations x [n, d1] and y [n, d2] of the same n samples."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape[0] != y.shape[0]:
        raise LayerscopeError(f"CKA needs the same samples in both representations: {x.shape[0]} vs {y.shape[0]} rows")
    return cka_from_grams(gram(x), gram(y), debiased=debiased)


def cka_matrix(grams_a: list[np.ndarray], grams_b: list[np.ndarray], *, debiased: bool = False) -> np.ndarray:
    """CKA between every layer of a (rows) and every layer of b (columns), from per-layer Grams."""
    hsic = hsic_unbiased if debiased else hsic_biased
    self_a = np.array([hsic(k, k) for k in grams_a])
    self_b = np.array([hsic(l, l) for l in grams_b])
    out = np.full((len(grams_a), len(grams_b)), np.nan)
    for i, k in enumerate(grams_a):
        for j, l in enumerate(grams_b):
            denom = self_a[i] * self_b[j]
            if denom > 0:
                out[i, j] = hsic(k, l) / np.sqrt(denom)
    return out


def _zero_diagonal(grams: list[np.ndarray]) -> np.ndarray:
    g = np.array(grams, dtype=np.float64)
    idx = np.arange(g.shape[1])
    g[:, idx, idx] = 0.0
    return g


def hsic_unbiased_weighted(ka: np.ndarray, kb: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Song et al.'s unbiased HSIC on a resample given by unit multiplicities ``w``, for every layer pair.

    ``ka`` [La, n, n], ``kb`` [Lb, n, n]: Gram matrices with a zero diagonal. The estimator is
    the U-statistic over 4-tuples of *distinct units*, each weighted by the product of their
    multiplicities, so copies of one prompt never pair with each other (the resample's
    analogue of leaving out i = j); with w = 1 it is :func:`hsic_unbiased` exactly. Returns
    (HSIC(a_i, b_j) [La, Lb], HSIC(a_i, a_i) [La], HSIC(b_j, b_j) [Lb]); NaN with fewer than 4
    distinct units.
    """
    keep = np.asarray(w) > 0
    w = np.asarray(w, dtype=np.float64)[keep]
    ka, kb = ka[:, keep][:, :, keep], kb[:, keep][:, :, keep]
    p1, p2, p3, p4 = (float(np.sum(w**e)) for e in (1, 2, 3, 4))
    tuples = p1**4 - 6 * p1**2 * p2 + 3 * p2**2 + 8 * p1 * p3 - 6 * p4  # Σ over distinct 4-tuples of Π w
    if w.size < 4 or tuples <= 0:
        nan = np.full((ka.shape[0], kb.shape[0]), np.nan)
        return nan, np.full(ka.shape[0], np.nan), np.full(kb.shape[0], np.nan)
    w2, w3 = w**2, w**3
    # Σ_{ij} M_ij K_ij L_ij collects the pair terms; the rest are sums over i of products of K w, L w, K w²
    m = np.outer(w, w) * ((p1 - w[:, None] - w[None, :]) ** 2 - p2 + w2[:, None] + w2[None, :])
    m += 2 * np.outer(w2, w2) + 2 * np.outer(w * (p1 - w), w2) - 4 * np.outer(w, w3)
    m = (m + m.T) / 2
    c = -4 * w2 - 2 * w * (p1 - w)
    va, vb, ua, ub = ka @ w, kb @ w, ka @ w2, kb @ w2  # [L, n']
    sa, sb = va @ w, vb @ w
    kam = (ka * m).reshape(ka.shape[0], -1)
    cross = (kam @ kb.reshape(kb.shape[0], -1).T + np.outer(sa, sb) + (va * c) @ vb.T
             + 2 * ((w * ua) @ vb.T + (w * va) @ ub.T))

    def self_terms(k, km, v, u, s):
        return (km * k.reshape(k.shape[0], -1)).sum(1) + s**2 + ((v * c) * v).sum(1) + 4 * ((w * u) * v).sum(1)

    self_a = self_terms(ka, kam, va, ua, sa)
    self_b = self_terms(kb, (kb * m).reshape(kb.shape[0], -1), vb, ub, sb)
    return cross / tuples, self_a / tuples, self_b / tuples


def debiased_cka_resampled(ka: np.ndarray, kb: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The debiased CKA matrix on the resample with unit multiplicities ``w`` (see :func:`hsic_unbiased_weighted`)."""
    cross, self_a, self_b = hsic_unbiased_weighted(ka, kb, w)
    denom = np.outer(self_a, self_b)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, cross / np.sqrt(np.where(denom > 0, denom, 1.0)), np.nan)


def _argmax_pair(matrix: np.ndarray, tie: float = 1e-12):
    """(row, column) of the largest finite entry; among entries within ``tie`` of it (rounding), the first."""
    finite = np.where(np.isfinite(matrix), matrix, -np.inf)
    if not np.isfinite(finite).any():
        return None
    i, j = np.unravel_index(int(np.argmax(finite >= finite.max() - tie)), matrix.shape)
    return int(i), int(j)


def debiased_cka_uncertainty(grams_a: list[np.ndarray], grams_b: list[np.ndarray], debiased: np.ndarray,
                             boot: Bootstrap) -> dict:
    """Bootstrap over prompts of the debiased CKA headlines: resample prompts, recompute every CKA.

    A resample is a vector of prompt multiplicities; the Grams are not recomputed (the
    unbiased HSIC is invariant to re-centring the features), only reweighted.
    """
    ka, kb = _zero_diagonal(grams_a), _zero_diagonal(grams_b)
    n = ka.shape[1]
    memo: dict = {}

    def matrices(idx: np.ndarray) -> np.ndarray:  # [n_resamples, n] resampled prompt indices
        key = (idx.shape, idx.tobytes())
        if key not in memo:
            memo[key] = np.stack([debiased_cka_resampled(ka, kb, np.bincount(row.astype(np.int64), minlength=n))
                                  for row in idx])
        return memo[key]

    def headline(reduce):
        def statistic(idx):
            with np.errstate(invalid="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                return reduce(matrices(idx))
        return statistic

    units = np.arange(n)
    out = {}
    points = {"max": float(np.nanmax(debiased)), "final": float(debiased[-1, -1]), "mean": float(np.nanmean(debiased))}
    reducers = {"max": lambda m: np.nanmax(m, axis=(1, 2)), "final": lambda m: m[:, -1, -1],
                "mean": lambda m: np.nanmean(m, axis=(1, 2))}
    for name, reduce in reducers.items():
        if not np.isfinite(points[name]):
            continue
        _, ci = boot.interval(units, statistic=headline(reduce))
        out[f"cka_debiased_{name}_ci"] = contain(ci, points[name])
    _, stability = boot.stability(units, statistic=headline(lambda m: m), pick=_argmax_pair)
    out["cka_debiased_max_pair_stability"] = stability
    boot.check_stability("cka_debiased_max_pair (the best-matching layer pair)", stability)
    for side, axis in (("a", 0), ("b", 1)):
        _, side_stability = boot.stability(units, statistic=headline(lambda m: m),
                                           pick=lambda m, axis=axis: (_argmax_pair(m) or (None, None))[axis])
        out[f"cka_debiased_max_layer_{side}_stability"] = side_stability
    return out


def pooled_grams(cache: ActivationCache, prompt_ids: list[str], tokens: str = "prompt") -> list[np.ndarray]:
    """Per layer: the Gram matrix of the prompts' mean-pooled residual stream (prompt order as given)."""
    table = cache.tokens
    roles = POOLED_ROLES[tokens]
    selected = table[table["prompt_id"].isin(prompt_ids)]
    if roles is not None:
        selected = selected[selected["role"].isin(roles)]
    missing = sorted(set(prompt_ids) - set(selected["prompt_id"]))
    if missing:
        raise LayerscopeError(f"{cache.directory}: no {tokens!r} tokens for prompt(s) {missing[:5]}")
    position = {pid: k for k, pid in enumerate(prompt_ids)}
    group = torch.tensor(selected["prompt_id"].map(position).to_numpy(dtype=np.int64))
    rows = selected["row"].to_numpy()
    counts = torch.bincount(group, minlength=len(prompt_ids)).to(torch.float64)[:, None]
    grams = []
    for layer in range(cache.n_layers + 1):
        h = cache.resid(layer, rows).to(torch.float64)
        pooled = torch.zeros((len(prompt_ids), h.shape[1]), dtype=torch.float64).index_add_(0, group, h) / counts
        grams.append(gram(pooled.numpy()))
    return grams


def shared_prompts(cache_a: ActivationCache, cache_b: ActivationCache) -> list[str]:
    ids_b = set(cache_b.tokens["prompt_id"])
    return [p for p in dict.fromkeys(cache_a.tokens["prompt_id"]) if p in ids_b]


@dataclass
class CkaResult:
    cka: np.ndarray  # [layers_a + 1, layers_b + 1]
    cka_debiased: np.ndarray
    table: pd.DataFrame
    summary: dict


def _headline(matrix: np.ndarray, prefix: str) -> dict:
    from scipy.stats import spearmanr

    la, lb = matrix.shape
    if np.all(np.isnan(matrix)):
        return {f"{prefix}_final": None, f"{prefix}_max": None}
    i, j = _argmax_pair(matrix)
    best = np.nanargmax(np.where(np.isnan(matrix), -np.inf, matrix), axis=1)
    rel = [matrix[a, int(round(a * (lb - 1) / max(1, la - 1)))] for a in range(la)]
    rho = spearmanr(np.arange(la), best).statistic if la > 2 and len(set(best)) > 1 else float("nan")
    return {
        f"{prefix}_final": float(matrix[-1, -1]),
        f"{prefix}_max": float(matrix[i, j]),
        f"{prefix}_max_layer_a": int(i),
        f"{prefix}_max_layer_b": int(j),
        f"{prefix}_mean": float(np.nanmean(matrix)),
        f"{prefix}_relative_depth_mean": float(np.nanmean(rel)),
        f"{prefix}_depth_alignment_spearman": float(rho),
        f"{prefix}_best_layer_b": [int(b) for b in best],
    }


def cross_model_cka(cache_a: ActivationCache, cache_b: ActivationCache, *, model_a: str, model_b: str,
                    prompt_set: str, tokens: str = "prompt", seed: int = 0, n_boot: int = N_BOOT) -> CkaResult:
    if tokens not in POOLED_ROLES:
        raise LayerscopeError(f"unknown token selection {tokens!r}; choose one of {sorted(POOLED_ROLES)}")
    prompts = shared_prompts(cache_a, cache_b)
    if len(prompts) < 4:
        raise LayerscopeError(
            f"CKA of {model_a} and {model_b} on {prompt_set}: only {len(prompts)} prompt(s) in both activation "
            "caches; at least 4 are needed")
    log.info("CKA %s vs %s on %d prompts", model_a, model_b, len(prompts))
    grams_a = pooled_grams(cache_a, prompts, tokens)
    grams_b = pooled_grams(cache_b, prompts, tokens)
    biased = cka_matrix(grams_a, grams_b)
    debiased = cka_matrix(grams_a, grams_b, debiased=True)
    la, lb = biased.shape
    table = pd.DataFrame({
        "model_a": model_a, "model_b": model_b, "prompt_set": prompt_set,
        "layer_a": np.repeat(np.arange(la), lb), "layer_b": np.tile(np.arange(lb), la),
        "cka": biased.ravel(), "cka_debiased": debiased.ravel(),
    })
    boot = Bootstrap(len(prompts), unit="prompt", n_boot=n_boot, seed=seed)
    uncertainty = debiased_cka_uncertainty(grams_a, grams_b, debiased, boot)
    categories = cache_a.tokens.drop_duplicates("prompt_id").set_index("prompt_id")["category"]
    summary = {
        "model_a": model_a, "model_b": model_b, "prompt_set": prompt_set, "n_prompts": len(prompts),
        **{k: v for k, v in sample_summary(prompts, categories.loc[prompts].tolist(), prompts).items()
           if k == "prompt_categories"},
        "pooled_tokens": tokens, "layers_a": la - 1, "layers_b": lb - 1,
        **_headline(biased, "cka"), **_headline(debiased, "cka_debiased"), **uncertainty,
        **boot.summary(),
        "definitions": {
            "unit": f"one vector per prompt: resid.l mean-pooled over the prompt's {tokens!r} tokens",
            "cka": "linear CKA, biased HSIC (Kornblith et al. 2019)",
            "cka_debiased": "linear CKA with the unbiased HSIC estimator (Song et al. 2012)",
            "relative_depth_mean": "mean CKA of layer a with the layer of b at the same relative depth",
            "depth_alignment_spearman": "Spearman correlation of layer a with its best-matching layer of b",
            "cka_debiased_*_ci": "95% percentile bootstrap over prompts: each resample reweights the prompts and "
                                 "recomputes every debiased CKA (copies of one prompt are never paired, as the "
                                 "unbiased estimator never pairs a sample with itself)",
            "cka_debiased_max_pair_stability": "fraction of resamples whose largest debiased CKA is at the same "
                                               "(layer_a, layer_b)",
            "cka (biased)": "no interval: a resample with repeated prompts is a smaller sample, and the biased "
                            "estimator's small-sample inflation would move the whole bootstrap distribution",
        },
    }
    return CkaResult(biased, debiased, table, summary)


def plot_cka(result: CkaResult, path: str | Path) -> None:
    from layerscope.report.plotting import figure, save

    s = result.summary
    with figure(1, 2, width=10.5, height=4.4) as (fig, axes):
        for ax, matrix, title in ((axes[0], result.cka, "linear CKA"),
                                  (axes[1], result.cka_debiased, "debiased linear CKA")):
            image = ax.imshow(matrix, origin="lower", aspect="auto", interpolation="nearest", cmap="magma",
                              vmin=min(0.0, float(np.nanmin(matrix))) if np.isfinite(matrix).any() else 0, vmax=1)
            ax.set_xlabel(f"{s['model_b']} residual boundary (0 = embeddings)")
            ax.set_ylabel(f"{s['model_a']} residual boundary")
            pair = _argmax_pair(matrix)
            if pair is not None:
                ax.plot(pair[1], pair[0], marker="o", markersize=7, markerfacecolor="none", color="cyan")
            if matrix is result.cka_debiased and "cka_debiased_max_ci" in s:
                lo, hi = s["cka_debiased_max_ci"]
                title += (f"\nmax {s['cka_debiased_max']:.2f} [{lo:.2f}, {hi:.2f}] at the circle, "
                          f"same pair in {s['cka_debiased_max_pair_stability']:.0%} of resamples")
            ax.set_title(title, fontsize="medium")
            ax.grid(False)
            fig.colorbar(image, ax=ax)
        fig.suptitle(f"CKA between layers on '{s['prompt_set']}' ({s['n_prompts']} prompts, mean-pooled over "
                     f"{s['pooled_tokens']} tokens)")
        save(fig, path)


def run_cka(job: Job) -> Result:
    cache_a = ActivationCache(Path(job.input("resid_a")).parent)
    cache_b = ActivationCache(Path(job.input("resid_b")).parent)
    result = cross_model_cka(cache_a, cache_b, model_a=job.wildcards["model_a"], model_b=job.wildcards["model_b"],
                             prompt_set=job.prompt_set, tokens=job.params["pooled_tokens"], seed=job.params["seed"])
    return Result(summary=result.summary, tables={"cka": result.table}, figures={"cka": partial(plot_cka, result)})


# ---------------------------------------------------------------------------- Procrustes


def shared_vocabulary(tokenizer_a, tokenizer_b) -> dict:
    """Whether two tokenizers share their vocabulary, and the shared token ids."""
    va, vb = tokenizer_a.get_vocab(), tokenizer_b.get_vocab()
    shared = sorted(set(va) & set(vb), key=lambda t: va[t])
    return {
        "same_tokenizer": va == vb,
        "vocab_a": len(va),
        "vocab_b": len(vb),
        "n_shared_tokens": len(shared),
        "ids_a": np.array([va[t] for t in shared], dtype=np.int64),
        "ids_b": np.array([vb[t] for t in shared], dtype=np.int64),
    }


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(1e-300)


def retrieval_scores(mapped: np.ndarray, target: np.ndarray, k: int, chunk: int = 1024) -> dict:
    """Row-wise cosine of mapped vs target, k-NN overlap@k and top-1 retrieval among the target rows.

    The k-NN overlap of row i compares the k nearest target rows of mapped_i with the k
    nearest of target_i, both among the target rows *other than target_i*: a point is not
    its own neighbour (counting it would add 1/k to every row whose retrieval succeeds,
    and retrieval is scored separately by ``top1``).
    """
    m = _unit(torch.as_tensor(mapped, dtype=torch.float64))
    t = _unit(torch.as_tensor(target, dtype=torch.float64))
    n = m.shape[0]
    k = max(1, min(k, n - 1))
    cosine = (m * t).sum(dim=1).numpy()
    overlap = np.zeros(n)
    top1 = np.zeros(n, dtype=bool)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        own = torch.arange(start, stop)
        local = torch.arange(stop - start)
        sim_mapped = m[start:stop] @ t.T
        sim_true = t[start:stop] @ t.T
        top1[start:stop] = (sim_mapped.argmax(dim=1) == own).numpy()
        sim_mapped[local, own] = -torch.inf
        sim_true[local, own] = -torch.inf
        near_mapped = sim_mapped.topk(k, dim=1).indices.numpy()
        near_true = sim_true.topk(k, dim=1).indices.numpy()
        for r in range(stop - start):
            overlap[start + r] = len(np.intersect1d(near_mapped[r], near_true[r], assume_unique=True)) / k
    return {"cosine": cosine, "knn_overlap": overlap, "top1": top1, "k": k}


def _relative_residual(sq_residual: np.ndarray, sq_target: np.ndarray) -> np.ndarray:
    """‖A R − B‖_F / ‖B‖_F from per-row squared norms (units on axis 1)."""
    return np.sqrt(sq_residual.sum(axis=1) / sq_target.sum(axis=1))


def procrustes_alignment(emb_a, emb_b, *, train_fraction: float = 0.5, seed: int = 0, knn: int = 10,
                         max_eval_tokens: int = 4000, n_boot: int = N_BOOT) -> tuple[dict, pd.DataFrame]:
    """Fit an orthogonal map of embedding rows a → b on a train split, score it on held-out rows.

    Held-out scores get 95 % bootstrap intervals over the held-out tokens (the unit): they
    are conditional on the fitted map and on the held-out pool the neighbours are drawn from.
    """
    from scipy.linalg import orthogonal_procrustes
    from scipy.stats import ortho_group

    a = np.asarray(torch.as_tensor(emb_a).detach().to(torch.float64))
    b = np.asarray(torch.as_tensor(emb_b).detach().to(torch.float64))
    if a.shape[0] != b.shape[0]:
        raise LayerscopeError(f"Procrustes needs matched rows: {a.shape[0]} vs {b.shape[0]}")
    n = a.shape[0]
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    n_train = int(round(train_fraction * n))
    train, test = perm[:n_train], perm[n_train:][:max_eval_tokens]
    dim = min(a.shape[1], b.shape[1])
    if n_train < 2 or len(test) < 2:
        raise LayerscopeError(f"Procrustes: {n} shared rows are too few for a train/held-out split")
    a = a - a[train].mean(axis=0)
    b = b - b[train].mean(axis=0)
    reduced, retained = None, 1.0
    if a.shape[1] != b.shape[1]:
        reduced = "a" if a.shape[1] > b.shape[1] else "b"
        wide = a if reduced == "a" else b
        cov = wide[train].T @ wide[train]
        eigval, eigvec = np.linalg.eigh(cov)
        order = np.argsort(eigval)[::-1]
        basis = eigvec[:, order[:dim]]
        retained = float(eigval[order[:dim]].sum() / eigval.sum())
        if reduced == "a":
            a = a @ basis
        else:
            b = b @ basis
    rotation, _ = orthogonal_procrustes(a[train], b[train])
    maps = {"procrustes": rotation,
            "random_rotation": ortho_group.rvs(dim, random_state=seed) if dim > 1 else np.ones((1, 1))}
    if reduced is None:
        maps["identity"] = np.eye(dim)
    boot = Bootstrap(len(test), unit="held-out token", n_boot=n_boot, seed=seed)
    sq_target = (b[test] ** 2).sum(axis=1)
    rows, summary = [], {}
    for method, r in maps.items():
        scores = retrieval_scores(a[test] @ r, b[test], knn)
        train_cos = retrieval_scores(a[train[:max_eval_tokens]] @ r, b[train[:max_eval_tokens]], 1)["cosine"]
        sq_residual = ((a[test] @ r - b[test]) ** 2).sum(axis=1)
        # per held-out token: the arrays each score is a statistic of (bootstrap units on axis 0)
        per_token = {"heldout_cosine_mean": ((scores["cosine"],), mean),
                     f"heldout_knn_overlap_at_{knn}": ((scores["knn_overlap"],), mean),
                     "heldout_top1_retrieval": ((scores["top1"].astype(float),), mean),
                     "heldout_relative_residual": ((sq_residual, sq_target), _relative_residual)}
        values, intervals = {}, {}
        for metric, (arrays, statistic) in per_token.items():
            values[metric], intervals[metric] = boot.interval(*arrays, statistic=statistic)
        values["heldout_cosine_median"] = float(np.median(scores["cosine"]))
        values["train_cosine_mean"] = float(train_cos.mean())
        prefix = "" if method == "procrustes" else f"{method}_"
        for metric in ("heldout_cosine_mean", "heldout_cosine_median", f"heldout_knn_overlap_at_{knn}",
                       "heldout_top1_retrieval", "heldout_relative_residual", "train_cosine_mean"):
            lo, hi = intervals.get(metric, (np.nan, np.nan))
            rows.append((method, metric, values[metric], lo, hi))
            summary[f"{prefix}{metric}"] = values[metric]
            if metric in intervals:
                summary[f"{prefix}{metric}_ci"] = intervals[metric]
    summary.update({
        "n_shared": int(n), "n_train": int(n_train), "n_heldout": int(len(test)), "knn_k": int(knn),
        "width_a": int(emb_a.shape[1]), "width_b": int(emb_b.shape[1]), "common_width": int(dim),
        "pca_reduced": reduced, "pca_variance_retained": retained,
        **boot.summary(),
    })
    return summary, pd.DataFrame(rows, columns=["method", "metric", "value", "ci_lo", "ci_hi"])


def run_procrustes(job: Job) -> Result:
    from layerscope.model.adapter import load_model, load_tokenizer

    params, seed = job.params, job.params["seed"]
    model_dir_a, model_dir_b = job.input("model_a"), job.input("model_b")
    model_a, model_b = job.wildcards["model_a"], job.wildcards["model_b"]
    vocab = shared_vocabulary(load_tokenizer(model_dir_a), load_tokenizer(model_dir_b))
    summary = {"model_a": model_a, "model_b": model_b,
               **{k: vocab[k] for k in ("same_tokenizer", "vocab_a", "vocab_b", "n_shared_tokens")}}
    frame = pd.DataFrame({"method": pd.Series(dtype=str), "metric": pd.Series(dtype=str),
                          "value": pd.Series(dtype=float), "ci_lo": pd.Series(dtype=float),
                          "ci_hi": pd.Series(dtype=float)})
    if not vocab["same_tokenizer"]:
        summary.update(applicable=False, reason="the models do not share a tokenizer (different token → id maps)",
                       **deterministic("the tokenizers (nothing is measured: they differ)"))
        log.info("%s / %s: %s", model_a, model_b, summary["reason"])
    else:
        emb = []
        for model_dir in (model_dir_a, model_dir_b):
            adapter = load_model(model_dir, dtype="float32", device="cpu")
            emb.append(adapter.embed.weight.detach().clone())
            del adapter
        ids = vocab["ids_a"]
        ids = ids[(ids < emb[0].shape[0]) & (ids < emb[1].shape[0])]
        result, frame = procrustes_alignment(
            emb[0][torch.as_tensor(ids)], emb[1][torch.as_tensor(ids)], train_fraction=params["train_fraction"],
            seed=seed, knn=params["knn"], max_eval_tokens=params["max_eval_tokens"])
        summary.update(applicable=True, **result)
    summary["definitions"] = {
        "heldout_cosine_mean": "mean over held-out tokens of cos(A_i R, B_i), both centred on train means",
        "heldout_knn_overlap_at_k": "|kNN_B(A_i R) ∩ kNN_B(B_i)| / k among the held-out rows of B other than "
                                    "B_i (cosine; a point is not its own neighbour)",
        "heldout_top1_retrieval": "fraction of held-out tokens whose nearest B row to A_i R is B_i",
        "*_ci": "95% percentile bootstrap over held-out tokens, given the fitted R and the held-out pool",
        "random_rotation_*": "the same scores with a seeded random orthogonal matrix in place of R",
        "identity_*": "the same scores with no rotation (only when the widths match)",
    }
    frame.insert(0, "model_b", model_b)
    frame.insert(0, "model_a", model_a)
    return Result(summary=summary, tables={"metrics": frame})


_DESCRIPTION = 'For every pair of the models: linear CKA between all layers on each prompt set (from the activation caches, one mean-pooled vector per prompt), and orthogonal Procrustes alignment of the input embeddings for pairs sharing a tokenizer.'

EXPERIMENT = [
    Experiment(
        name="cross_model_cka",
        dashboard=('cka_debiased_max', 'cka_debiased_max_layer_a', 'cka_debiased_max_layer_b', 'cka_debiased_depth_alignment_spearman'),
        headlines=("cka_debiased_max",),
        family="cross_model",
        description="CKA between the layers of two models on a shared prompt set",
        description_long=_DESCRIPTION,
        needs="any",
        data="model_pairs",
        gpu=False,
        inputs=("resid_a", "tokens_a", "resid_b", "tokens_b"),
        run=run_cka,
        tables=("cka",),
        figures=(Figure("cka", "CKA heatmap"),),
        params={'pooled_tokens': {'description': "Tokens mean-pooled per prompt for CKA: 'prompt' = the prompt's own text "
                                          "tokens (the same text in every model), 'all' = every cached token of the "
                                          "sequence (system message, template and the model's own completion "
                                          'included).',
                           'enum': ['prompt', 'all'],
                           'default': 'prompt'},
         'train_fraction': {'description': 'Fraction of the shared vocabulary (seeded permutation) on which the '
                                           'Procrustes rotation is fitted; the rest is held out.',
                            'type': 'number',
                            'exclusiveMinimum': 0,
                            'exclusiveMaximum': 1,
                            'default': 0.5},
         'knn': {'description': 'k of the held-out k-NN overlap.', 'type': 'integer', 'minimum': 1, 'default': 10},
         'max_eval_tokens': {'description': 'At most this many held-out tokens are scored (k-NN needs their pairwise '
                                            'similarities).',
                             'type': 'integer',
                             'minimum': 10,
                             'default': 4000}},
        threads=1,
        runtime=30,
        config_key="cross_model",
        folder="cka",
    ),
    Experiment(
        name="cross_model_procrustes",
        dashboard=('applicable', 'n_shared_tokens', 'heldout_cosine_mean', 'heldout_knn_overlap_at_k'),
        family="cross_model",
        description="Procrustes alignment of two models' input embeddings (pairs sharing a tokenizer)",
        needs="any",
        data="model_pairs",
        gpu=False,
        inputs=("model_a", "model_b"),
        run=run_procrustes,
        tables=("metrics",),
        threads=2,
        runtime=30,
        config_key="cross_model",
        folder="procrustes",
        uses_prompt_sets=False,
    ),
]
