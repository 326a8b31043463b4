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

**Orthogonal Procrustes alignment of the input embeddings** (``procrustes``), for a pair
sharing a tokenizer (identical token → id maps): the rows of the shared vocabulary are split
by a seeded permutation into a train part and a held-out part; both matrices are centred
on their train means; when widths differ, the wider one is reduced by PCA (fitted on its
train rows) to the narrower width; ``scipy.linalg.orthogonal_procrustes`` fits R with
A R ≈ B on the train rows. Held-out scores: mean cosine between A_i R and B_i, k-NN
overlap@k (|k nearest held-out B rows of A_i R ∩ k nearest of B_i| / k, cosine) and top-1
retrieval (B_i is the nearest row to A_i R), against a seeded random rotation (and the
identity, when no PCA was needed) in place of R.
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
    i, j = np.unravel_index(np.nanargmax(matrix), matrix.shape)
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
                    prompt_set: str, tokens: str = "prompt") -> CkaResult:
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
    summary = {
        "model_a": model_a, "model_b": model_b, "prompt_set": prompt_set, "n_prompts": len(prompts),
        "pooled_tokens": tokens, "layers_a": la - 1, "layers_b": lb - 1,
        **_headline(biased, "cka"), **_headline(debiased, "cka_debiased"),
        "definitions": {
            "unit": f"one vector per prompt: resid.l mean-pooled over the prompt's {tokens!r} tokens",
            "cka": "linear CKA, biased HSIC (Kornblith et al. 2019)",
            "cka_debiased": "linear CKA with the unbiased HSIC estimator (Song et al. 2012)",
            "relative_depth_mean": "mean CKA of layer a with the layer of b at the same relative depth",
            "depth_alignment_spearman": "Spearman correlation of layer a with its best-matching layer of b",
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
            ax.set_title(title)
            ax.grid(False)
            fig.colorbar(image, ax=ax)
        fig.suptitle(f"CKA between layers on '{s['prompt_set']}' ({s['n_prompts']} prompts, mean-pooled over "
                     f"{s['pooled_tokens']} tokens)")
        save(fig, path)


def run_cka(job: Job) -> Result:
    cache_a = ActivationCache(Path(job.input("resid_a")).parent)
    cache_b = ActivationCache(Path(job.input("resid_b")).parent)
    result = cross_model_cka(cache_a, cache_b, model_a=job.wildcards["model_a"], model_b=job.wildcards["model_b"],
                             prompt_set=job.prompt_set, tokens=job.params["pooled_tokens"])
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
    """Row-wise cosine of mapped vs target, k-NN overlap@k and top-1 retrieval among the target rows."""
    m = _unit(torch.as_tensor(mapped, dtype=torch.float64))
    t = _unit(torch.as_tensor(target, dtype=torch.float64))
    n = m.shape[0]
    k = min(k, n)
    cosine = (m * t).sum(dim=1).numpy()
    overlap = np.zeros(n)
    top1 = np.zeros(n, dtype=bool)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        near_mapped = (m[start:stop] @ t.T).topk(k, dim=1).indices.numpy()
        near_true = (t[start:stop] @ t.T).topk(k, dim=1).indices.numpy()
        for r in range(stop - start):
            overlap[start + r] = len(np.intersect1d(near_mapped[r], near_true[r], assume_unique=True)) / k
        top1[start:stop] = near_mapped[:, 0] == np.arange(start, stop)
    return {"cosine": cosine, "knn_overlap": overlap, "top1": top1}


def procrustes_alignment(emb_a, emb_b, *, train_fraction: float = 0.5, seed: int = 0, knn: int = 10,
                         max_eval_tokens: int = 4000) -> tuple[dict, pd.DataFrame]:
    """Fit an orthogonal map of embedding rows a → b on a train split, score it on held-out rows."""
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
    rows, summary = [], {}
    for method, r in maps.items():
        scores = retrieval_scores(a[test] @ r, b[test], knn)
        train_cos = retrieval_scores(a[train[:max_eval_tokens]] @ r, b[train[:max_eval_tokens]], 1)["cosine"]
        residual = float(np.linalg.norm(a[test] @ r - b[test]) / np.linalg.norm(b[test]))
        values = {"heldout_cosine_mean": float(scores["cosine"].mean()),
                  "heldout_cosine_median": float(np.median(scores["cosine"])),
                  f"heldout_knn_overlap_at_{knn}": float(scores["knn_overlap"].mean()),
                  "heldout_top1_retrieval": float(scores["top1"].mean()),
                  "heldout_relative_residual": residual,
                  "train_cosine_mean": float(train_cos.mean())}
        for metric, value in values.items():
            rows.append((method, metric, value))
        prefix = "" if method == "procrustes" else f"{method}_"
        summary.update({f"{prefix}{k}": v for k, v in values.items()})
    summary.update({
        "n_shared": int(n), "n_train": int(n_train), "n_heldout": int(len(test)), "knn_k": int(knn),
        "width_a": int(emb_a.shape[1]), "width_b": int(emb_b.shape[1]), "common_width": int(dim),
        "pca_reduced": reduced, "pca_variance_retained": retained,
    })
    return summary, pd.DataFrame(rows, columns=["method", "metric", "value"])


def run_procrustes(job: Job) -> Result:
    from layerscope.model.adapter import load_model, load_tokenizer

    params, seed = job.params, job.params["seed"]
    model_dir_a, model_dir_b = job.input("model_a"), job.input("model_b")
    model_a, model_b = job.wildcards["model_a"], job.wildcards["model_b"]
    vocab = shared_vocabulary(load_tokenizer(model_dir_a), load_tokenizer(model_dir_b))
    summary = {"model_a": model_a, "model_b": model_b,
               **{k: vocab[k] for k in ("same_tokenizer", "vocab_a", "vocab_b", "n_shared_tokens")}}
    frame = pd.DataFrame({"method": pd.Series(dtype=str), "metric": pd.Series(dtype=str),
                          "value": pd.Series(dtype=float)})
    if not vocab["same_tokenizer"]:
        summary.update(applicable=False, reason="the models do not share a tokenizer (different token → id maps)")
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
        "heldout_knn_overlap_at_k": "|kNN_B(A_i R) ∩ kNN_B(B_i)| / k among held-out rows of B (cosine)",
        "heldout_top1_retrieval": "fraction of held-out tokens whose nearest B row to A_i R is B_i",
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
