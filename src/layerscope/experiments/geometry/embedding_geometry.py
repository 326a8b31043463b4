"""Geometry of the token embedding (and of an untied unembedding), from the weights.

For each matrix W [vocab, d] (rows = tokens):

* row norms: mean, std, coefficient of variation, percentiles, the smallest and largest;
* pairwise cosine of ``cosine_sample`` rows drawn without replacement (seeded): mean, std,
  percentiles and a histogram;
* eigenspectrum of the covariance of all rows (accumulated in float64 by chunks of rows):
  participation ratio (Σλ)²/Σλ² and its fraction of d, entropy effective rank, the fewest
  dimensions holding 80/90/95/99 % of the variance, λ_max/Σλ;
* pentachoron geometry: the 4-volume of ``n_simplices`` random 5-token simplices by the
  Cayley–Menger determinant; its coefficient of variation (std/mean) against the same
  number of simplices from an isotropic Gaussian of the same dimension and total variance
  (``pentachoron_cv_ratio`` = CV_embedding / CV_gaussian; ``pentachoron_volume_ratio`` =
  mean volume / Gaussian mean volume);
* digit tokens 0–9: their 10×10 cosine matrix, Pearson and Spearman correlation of cosine
  with |i − j| over the 45 pairs, and mean cosine of adjacent minus non-adjacent digits;
* semantic categories from a word-list file (``resources/word_categories.json``): a word
  is used when it is a single token — its leading-space form first (how a word appears
  inside text for BPE tokenizers), then the bare word, then the bare vocabulary entry —
  and the decoded token is the word; other words are reported as skipped, and so is a
  word whose token another word already took. Per category the mean intra-category
  cosine and its lift over the global mean cosine; across categories the ratio of mean
  between- to within-category cosine distance, and the centroid cosine matrix.

Uncertainty: the norms, the spectrum and the digit geometry are exact given the weights
(the digits are all ten, not a sample). The category statistics are claims about the words
chosen for each category: they get a bootstrap over the words (resampled words, pairs of two
copies of one word left out) and the separation a null of ``n_perm`` permutations of the
category labels among the words. The pentachoron CV ratio gets a bootstrap over the
(embedding, Gaussian) simplex pairs, its Monte Carlo error. The summary's ``uncertainty`` is
the word bootstrap's; without categories the summary is marked deterministic.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
import torch

from layerscope import LayerscopeError
from layerscope.engines.geometry import (
    between_within_ratio, cayley_menger_volume, permuted_between_within, resample_counts, resampled_pair_means, unit_rows,
)
from layerscope.engines.statistics import Bootstrap, deterministic, null_summary, permutation_null
from layerscope.experiments.geometry.residual_geometry import MemoStatistic
from layerscope.experiments.registry import Experiment, Figure, Job, Result
from layerscope.engines.spectra import dims_for_variance, entropy_effective_rank, participation_ratio, single_thread

log = logging.getLogger(__name__)

DIGITS = tuple(str(i) for i in range(10))
VARIANCE_FRACTIONS = (0.8, 0.9, 0.95, 0.99)
PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
HIST_BINS = np.linspace(-1, 1, 201)


class WordListError(LayerscopeError):
    """A malformed word-category file."""


def load_word_categories(path: str | Path) -> dict[str, list[str]]:
    """``{"categories": {name: [word, …]}}`` (plus optional name/description), validated."""
    path = Path(path)
    if not path.is_file():
        raise WordListError(f"word categories {path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise WordListError(f"word categories {path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict) or not isinstance(data.get("categories"), dict):
        raise WordListError(f"word categories {path}: expected an object with a 'categories' object")
    extra = sorted(set(data) - {"name", "description", "categories"})
    if extra:
        raise WordListError(f"word categories {path}: unknown key(s) {extra}")
    categories = data["categories"]
    if len(categories) < 2:
        raise WordListError(f"word categories {path}: need at least 2 categories, got {len(categories)}")
    seen: dict[str, str] = {}
    for name, words in categories.items():
        if not isinstance(words, list) or not words or not all(isinstance(w, str) and w.strip() for w in words):
            raise WordListError(f"word categories {path}: category {name!r} must be a non-empty list of words")
        for word in words:
            if word in seen:
                raise WordListError(f"word categories {path}: {word!r} is in both {seen[word]!r} and {name!r}")
            seen[word] = name
    return {name: list(words) for name, words in categories.items()}


def _normalise(text: str) -> str:
    return text.replace("▁", " ").replace("Ġ", " ").strip().lower()


def single_token(tokenizer, word: str) -> tuple[int, str] | None:
    """(token id, variant) of ``word`` as one token — leading-space form, bare form, vocabulary entry — or None."""
    for variant, text in (("leading_space", " " + word), ("bare", word)):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) == 1 and _normalise(tokenizer.decode(ids)) == word.lower():
            return int(ids[0]), variant
    tid = tokenizer.convert_tokens_to_ids(word)
    if isinstance(tid, int) and tid != tokenizer.unk_token_id and _normalise(tokenizer.decode([tid])) == word.lower():
        return tid, "vocab"
    return None


# ---------------------------------------------------------------------------- statistics of one matrix


def covariance_eigenvalues_chunked(w: torch.Tensor, chunk: int = 8192) -> np.ndarray:
    """Covariance eigenvalues (descending) of the rows of w, accumulated in float64 by row chunks."""
    n, d = w.shape
    total = torch.zeros(d, dtype=torch.float64)
    gram = torch.zeros((d, d), dtype=torch.float64)
    for start in range(0, n, chunk):
        block = w[start : start + chunk].to(torch.float64)
        total += block.sum(dim=0)
        gram += block.T @ block
    mean = total / n
    cov = (gram - n * torch.outer(mean, mean)) / (n - 1)
    with single_thread():
        values = torch.linalg.eigvalsh(cov)
    return values.flip(0).clamp_min(0.0).numpy()


def _percentiles(values: np.ndarray) -> dict:
    return {f"p{p}": float(v) for p, v in zip(PERCENTILES, np.percentile(values, PERCENTILES))}


def pentachoron_volumes(points_fn, n_simplices: int, rng: np.random.Generator) -> np.ndarray:
    """The 4-volumes of ``n_simplices`` simplices drawn by ``points_fn(rng)`` (0 for a degenerate one)."""
    return cayley_menger_volume(np.stack([points_fn(rng) for _ in range(n_simplices)]))


def volume_cv(volumes: np.ndarray) -> np.ndarray:
    """CV (population std / mean) of the positive volumes along the last axis (NaN with fewer than 2)."""
    v = np.asarray(volumes, dtype=np.float64)
    valid = v > 0
    n = valid.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(valid, v, 0).sum(-1) / n
        var = np.where(valid, (v - mean[..., None]) ** 2, 0).sum(-1) / n
        return np.where(n >= 2, np.sqrt(var) / mean, np.nan)


def pentachoron_cv(points_fn, n_simplices: int, rng: np.random.Generator) -> tuple[float, float, int]:
    """(CV, mean volume, valid count) of the 4-volumes of ``n_simplices`` simplices drawn by ``points_fn(rng)``."""
    volumes = pentachoron_volumes(points_fn, n_simplices, rng)
    valid = volumes[volumes > 0]
    if len(valid) < 2:
        return float("nan"), float("nan"), int(len(valid))
    return float(valid.std() / valid.mean()), float(valid.mean()), int(len(valid))


def category_statistics(cosines: np.ndarray, labels: np.ndarray, names: list[str], counts: np.ndarray,
                        cosine_mean: float) -> dict[str, np.ndarray]:
    """Category statistics of words with pairwise cosines [n, n] and categories ``labels``, for resample
    counts [B, n] (ones: the words themselves): per category the mean cosine over pairs of distinct words
    (``intra_<name>``), their mean over categories, its lift over ``cosine_mean``, and the between / within
    ratio of mean cosine distance (1 − cos). Pairs of two copies of one word are left out."""
    labels = np.asarray(labels)
    same = labels[:, None] == labels[None, :]
    masks = {f"intra_{c}": same & (labels[:, None] == c) for c in names}
    out = resampled_pair_means(cosines, masks, counts)
    distances = resampled_pair_means(1.0 - cosines, {"within": same, "between": ~same}, counts)
    intra = np.stack([out[f"intra_{c}"] for c in names], axis=-1)
    finite = np.isfinite(intra)
    with np.errstate(invalid="ignore", divide="ignore"):
        out["intra_mean"] = np.where(finite.all(-1), np.where(finite, intra, 0).sum(-1) / len(names), np.nan)
        out["lift_mean"] = out["intra_mean"] - cosine_mean
        out["separation"] = np.where(distances["within"] > 0, distances["between"] / distances["within"], np.nan)
    return out


@dataclass
class MatrixGeometry:
    name: str
    scalars: dict
    norms: np.ndarray
    cosine_hist: np.ndarray
    eigenvalues: np.ndarray
    volumes_ratio: dict = field(default_factory=dict)
    digit_cos: np.ndarray | None = None
    digit_ids: list = field(default_factory=list)
    categories: pd.DataFrame | None = None  # per category: n_words, intra_cosine, lift
    centroid_cos: np.ndarray | None = None
    words: pd.DataFrame | None = None
    boot: Bootstrap | None = None  # over the category words, when categories are measured


def lookup_words(tokenizer, entries: Iterable[tuple[str, str]], min_words: int, *,
                 limit: int | None = None) -> pd.DataFrame:
    """Look up (category, word) entries, in order, as single tokens (:func:`single_token`).

    One row per entry looked at: status ``used``, ``not_single_token``, ``same_token_as_<word>``
    (another word already took the token), or ``category_too_small`` (a used word of a category
    with fewer than ``min_words`` used words). With ``limit`` the lookup stops once that many
    words are used (``category_too_small`` counts as used here); later entries get no row.
    """
    rows = []
    taken: dict[int, str] = {}
    for category, word in entries:
        if limit is not None and len(taken) >= limit:
            break
        found = single_token(tokenizer, word)
        if found is None:
            rows.append((category, word, "not_single_token", "", -1, ""))
            continue
        tid, variant = found
        if tid in taken:
            rows.append((category, word, f"same_token_as_{taken[tid]}", variant, tid, tokenizer.decode([tid])))
            continue
        taken[tid] = word
        rows.append((category, word, "used", variant, tid, tokenizer.decode([tid])))
    frame = pd.DataFrame(rows, columns=["category", "word", "status", "variant", "token_id", "token"])
    counts = frame[frame["status"] == "used"].groupby("category").size()
    small = [c for c in dict.fromkeys(frame["category"]) if counts.get(c, 0) < min_words]
    frame.loc[frame["category"].isin(small) & (frame["status"] == "used"), "status"] = "category_too_small"
    return frame


def skipped_words(words: pd.DataFrame) -> pd.DataFrame:
    """The rows of a :func:`lookup_words` frame whose word is not used (not one token, or a taken token)."""
    return words[~words["status"].isin(["used", "category_too_small"])]


def _lookup_words(tokenizer, categories: dict[str, list[str]], min_words: int) -> pd.DataFrame:
    return lookup_words(tokenizer, ((c, w) for c, words in categories.items() for w in words), min_words)


def matrix_geometry(name: str, w: torch.Tensor, tokenizer, categories: dict[str, list[str]], *, cosine_sample: int,
                    n_simplices: int, min_category_words: int, seed: int, n_perm: int = 1000,
                    n_boot: int | None = None) -> MatrixGeometry:
    w = w.detach().float().cpu()
    vocab, d = w.shape
    rng = np.random.default_rng(seed)
    s: dict = {"vocab_size": vocab, "d": d}

    norms = w.double().norm(dim=1).numpy()
    s.update(norm_mean=float(norms.mean()), norm_std=float(norms.std()), norm_cv=float(norms.std() / norms.mean()),
             norm_min=float(norms.min()), norm_max=float(norms.max()),
             **{f"norm_{k}": v for k, v in _percentiles(norms).items()})
    s["norm_min_token"] = tokenizer.decode([int(norms.argmin())])
    s["norm_max_token"] = tokenizer.decode([int(norms.argmax())])

    n_sample = min(int(cosine_sample), vocab)
    idx = np.sort(rng.choice(vocab, size=n_sample, replace=False))
    u = unit_rows(w[torch.from_numpy(idx)])
    cos = (u @ u.T).numpy()
    flat = cos[np.triu_indices(len(u), k=1)]
    s.update(cosine_mean=float(flat.mean()), cosine_std=float(flat.std()), n_cosine_pairs=int(len(flat)),
             **{f"cosine_{k}": v for k, v in _percentiles(flat).items()})
    hist = np.histogram(flat, bins=HIST_BINS)[0]
    del cos, flat

    lam = covariance_eigenvalues_chunked(w)
    pr = participation_ratio(energies=lam)
    s.update(participation_ratio=pr, participation_ratio_frac=pr / d,
             effective_rank=entropy_effective_rank(energies=lam), top_eigen_fraction=float(lam[0] / lam.sum()),
             **{f"dims_{round(f * 100)}": n for f, n in dims_for_variance(lam, VARIANCE_FRACTIONS).items()})

    w_np = w.numpy()
    sigma = float(np.sqrt(lam.sum() / d))  # isotropic Gaussian with the same total variance
    volumes = pentachoron_volumes(lambda g: w_np[g.choice(vocab, size=5, replace=False)].astype(np.float64),
                                  n_simplices, rng)
    volumes_g = pentachoron_volumes(lambda g: g.normal(0.0, sigma, size=(5, d)), n_simplices, rng)
    cv, cv_g = float(volume_cv(volumes)), float(volume_cv(volumes_g))
    valid, valid_g = volumes[volumes > 0], volumes_g[volumes_g > 0]
    mean_vol = float(valid.mean()) if len(valid) else float("nan")
    mean_vol_g = float(valid_g.mean()) if len(valid_g) else float("nan")
    s.update(pentachoron_cv=cv, pentachoron_cv_gaussian=cv_g, pentachoron_cv_ratio=cv / cv_g,
             pentachoron_volume_ratio=mean_vol / mean_vol_g, pentachoron_valid=int(len(valid)),
             pentachoron_valid_gaussian=int(len(valid_g)))
    # Monte Carlo uncertainty of the ratio: the (embedding, Gaussian) simplex pairs are i.i.d.; resample them
    simplices = Bootstrap(n_simplices, unit="simplex", seed=seed, **({"n_boot": n_boot} if n_boot else {}))
    _, s["pentachoron_cv_ratio_ci"] = simplices.interval(volumes, volumes_g,
                                                         statistic=lambda a, b: volume_cv(a) / volume_cv(b))

    result = MatrixGeometry(name, s, norms.astype(np.float32), hist, lam)

    digits = [(int(digit), single_token(tokenizer, digit)) for digit in DIGITS]
    digits = [(digit, found[0]) for digit, found in digits if found is not None]
    s["n_digit_tokens"] = len(digits)
    if len(digits) >= 3:
        values = [dv for dv, _ in digits]
        ids = [tid for _, tid in digits]
        du = unit_rows(w[torch.tensor(ids)])
        dcos = (du @ du.T).numpy()
        i, j = np.triu_indices(len(ids), k=1)
        gap = np.abs(np.array(values)[i] - np.array(values)[j])
        pair_cos = dcos[i, j]
        adjacent = pair_cos[gap == 1]
        ranks = pd.DataFrame({"gap": gap, "cos": pair_cos}).rank()  # average ranks of ties, as Spearman's ρ
        s.update(digit_distance_pearson=float(np.corrcoef(gap, pair_cos)[0, 1]),
                 digit_distance_spearman=float(np.corrcoef(ranks["gap"], ranks["cos"])[0, 1]),
                 digit_adjacent_cosine=float(adjacent.mean()) if len(adjacent) else None,
                 digit_nonadjacent_cosine=float(pair_cos[gap > 1].mean()),
                 digit_adjacent_minus_nonadjacent=float(adjacent.mean() - pair_cos[gap > 1].mean())
                 if len(adjacent) else None)
        result.digit_cos, result.digit_ids = dcos, values

    words = _lookup_words(tokenizer, categories, min_category_words)
    result.words = words
    used = words[words["status"] == "used"]
    skipped = skipped_words(words)
    s["n_category_words"] = int(len(used))
    s["n_skipped_words"] = int(len(skipped))
    s["skipped_words"] = {c: g["word"].tolist() for c, g in skipped.groupby("category", sort=False)}
    names = list(dict.fromkeys(used["category"]))
    if len(names) >= 2:
        wu = unit_rows(w[torch.tensor(used["token_id"].to_numpy())]).numpy()
        labels = used["category"].to_numpy()
        cosines = wu @ wu.T
        boot = Bootstrap(len(labels), unit="word", seed=seed, **({"n_boot": n_boot} if n_boot else {}))
        memo = MemoStatistic(lambda index: category_statistics(cosines, labels, names,
                                                       resample_counts(index, len(labels)), s["cosine_mean"]))
        units = np.arange(len(labels))
        rows = []
        centroids = []
        for c in names:
            member = wu[labels == c]
            cc = member @ member.T
            intra = float(cc[np.triu_indices(len(member), k=1)].mean())
            _, ci = boot.interval(units, statistic=lambda i, c=c: memo(i)[f"intra_{c}"])
            rows.append({"category": c, "n_words": len(member), "intra_cosine": intra,
                         "lift": intra - s["cosine_mean"], "intra_cosine_ci_low": ci[0], "intra_cosine_ci_high": ci[1]})
            centroids.append(member.mean(axis=0))
        table = pd.DataFrame(rows)
        cu = unit_rows(np.stack(centroids)).numpy()
        sep = between_within_ratio(wu, labels, metric="cosine")
        s.update(category_intra_cosine_mean=float(table["intra_cosine"].mean()),
                 category_lift_mean=float(table["lift"].mean()), category_separation=sep["ratio"],
                 n_categories=len(names))
        for key, stat in (("category_intra_cosine_mean", "intra_mean"), ("category_lift_mean", "lift_mean"),
                          ("category_separation", "separation")):
            _, s[f"{key}_ci"] = boot.interval(units, statistic=lambda i, stat=stat: memo(i)[stat])
        perms: list[np.ndarray] = []
        permutation_null(lambda perm: perms.append(np.asarray(perm)) or 0.0, labels, n_perm=n_perm, seed=seed)
        null = permuted_between_within(1.0 - cosines, perms)[:, 0]
        ns = null_summary(float(sep["ratio"]), null)
        s.update(category_separation_null_mean=ns["null_mean"], category_separation_null_q95=ns["null_q"],
                 category_separation_p_value=ns["p_value"], n_perm=int(n_perm))
        if ns["p_value"] > 0.05:
            boot.flag("category_separation is not above its word-label permutation null (p > 0.05)")
        result.categories, result.centroid_cos, result.boot = table, cu @ cu.T, boot
    else:
        s.update(category_intra_cosine_mean=None, category_lift_mean=None, category_separation=None, n_categories=0,
                 category_intra_cosine_mean_ci=None, category_lift_mean_ci=None, category_separation_ci=None,
                 category_separation_null_mean=None, category_separation_null_q95=None,
                 category_separation_p_value=None, n_perm=0)
    return result



# ---------------------------------------------------------------------------- the experiment


@dataclass
class EmbeddingGeometryResult:
    matrices: list[MatrixGeometry]
    metrics: pd.DataFrame  # tidy: model, matrix, group, metric, value
    words: pd.DataFrame
    eigenspectrum: pd.DataFrame
    summary: dict


HEADLINE = (
    "norm_mean", "norm_cv", "cosine_mean", "participation_ratio", "participation_ratio_frac", "effective_rank",
    "dims_80", "dims_90", "dims_95", "dims_99", "top_eigen_fraction", "pentachoron_cv", "pentachoron_cv_gaussian",
    "pentachoron_cv_ratio", "pentachoron_cv_ratio_ci", "pentachoron_volume_ratio", "digit_distance_pearson",
    "digit_distance_spearman", "digit_adjacent_minus_nonadjacent", "category_intra_cosine_mean",
    "category_intra_cosine_mean_ci", "category_lift_mean", "category_lift_mean_ci", "category_separation",
    "category_separation_ci", "category_separation_null_mean", "category_separation_null_q95",
    "category_separation_p_value", "n_perm", "n_category_words", "n_skipped_words",
)


def embedding_matrices(adapter) -> dict[str, torch.Tensor]:
    """The input embedding, and the unembedding when it is a separate matrix."""
    out = {"embedding": adapter.embed.weight}
    if adapter.unembed is not None and not adapter.facts.tied_embeddings:
        out["unembedding"] = adapter.unembed.weight
    return out


def embedding_geometry(adapter, tokenizer, categories: dict[str, list[str]], *, model: str, cosine_sample: int = 4000,
                       n_simplices: int = 1000, min_category_words: int = 3, seed: int = 0, n_perm: int = 1000,
                       n_boot: int | None = None) -> EmbeddingGeometryResult:
    if cosine_sample < 2 or n_simplices < 2:
        raise LayerscopeError("embedding_geometry needs cosine_sample ≥ 2 and n_simplices ≥ 2")
    matrices = []
    for name, weight in embedding_matrices(adapter).items():
        matrices.append(matrix_geometry(name, weight, tokenizer, categories, cosine_sample=cosine_sample,
                                        n_simplices=n_simplices, min_category_words=min_category_words, seed=seed,
                                        n_perm=n_perm, n_boot=n_boot))
        log.info("embedding geometry: %s done", name)

    records, words, spectra = [], [], []
    for m in matrices:
        for key, value in m.scalars.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value is not None:
                records.append((m.name, "all", key, float(value)))
        if m.categories is not None:
            for row in m.categories.itertuples(index=False):
                for key in ("n_words", "intra_cosine", "lift"):
                    records.append((m.name, row.category, key, float(getattr(row, key))))
        words.append(m.words.assign(matrix=m.name))
        lam = m.eigenvalues
        spectra.append(pd.DataFrame({"matrix": m.name, "index": np.arange(len(lam)), "eigenvalue": lam,
                                     "cumulative_fraction": np.cumsum(lam) / lam.sum()}))
    metrics = pd.DataFrame(records, columns=["matrix", "group", "metric", "value"])
    metrics.insert(0, "model", model)
    words_frame = pd.concat(words, ignore_index=True)
    words_frame.insert(0, "model", model)
    eigen = pd.concat(spectra, ignore_index=True)
    eigen.insert(0, "model", model)

    first = matrices[0].scalars
    summary = {
        "model": model,
        "kind": adapter.facts.kind,
        "vocab_size": first["vocab_size"],
        "d_model": first["d"],
        "tied_embeddings": bool(adapter.facts.tied_embeddings),
        "matrices": [m.name for m in matrices],
        "cosine_sample": cosine_sample,
        "n_simplices": n_simplices,
        **{key: first.get(key) for key in HEADLINE},
    }
    for m in matrices[1:]:
        for key in ("participation_ratio", "cosine_mean", "pentachoron_cv_ratio", "category_separation",
                    "category_separation_ci", "category_separation_p_value"):
            summary[f"{m.name}_{key}"] = m.scalars.get(key)
    summary["skipped_words"] = first["skipped_words"]
    summary["by_matrix"] = {m.name: m.scalars for m in matrices}
    boot = matrices[0].boot
    if boot is None:  # no category claims: every number is a function of the weights (and the seeded samples)
        summary.update(deterministic("the weights (and the seeded token and simplex samples)"))
    else:
        for m in matrices[1:]:
            for reason in (m.boot.reasons if m.boot is not None else []):
                boot.flag(f"{m.name}: {reason}")
        summary.update(boot.summary())
    return EmbeddingGeometryResult(matrices, metrics, words_frame, eigen, summary)


# ---------------------------------------------------------------------------- outputs


def plot_overview(result: EmbeddingGeometryResult, path: str | Path) -> None:
    from layerscope.report.plotting import PALETTE, figure, save

    s = result.summary
    centers = (HIST_BINS[:-1] + HIST_BINS[1:]) / 2
    with figure(2, 3, width=11.0, height=6.0) as (fig, axes):
        for k, m in enumerate(result.matrices):
            color = PALETTE[k]
            sc = m.scalars
            axes[0, 0].hist(m.norms, bins=120, alpha=0.6, color=color, label=f"{m.name} (CV {sc['norm_cv']:.2f})")
            density = m.cosine_hist / max(1, m.cosine_hist.sum()) / (HIST_BINS[1] - HIST_BINS[0])
            axes[0, 1].plot(centers, density, color=color, label=f"{m.name} (mean {sc['cosine_mean']:.3f})")
            lam = m.eigenvalues
            axes[0, 2].semilogy(np.arange(1, len(lam) + 1), np.maximum(lam / lam.sum(), 1e-12), color=color,
                                label=f"{m.name} (PR {sc['participation_ratio']:.1f}, 90 %: {sc['dims_90']} dims)")
            if m.digit_cos is not None:
                i, j = np.triu_indices(len(m.digit_ids), k=1)
                gap = np.abs(np.array(m.digit_ids)[i] - np.array(m.digit_ids)[j])
                axes[1, 1].scatter(gap + 0.08 * k, m.digit_cos[i, j], s=10, color=color, alpha=0.7,
                                   label=f"{m.name} (Spearman {sc['digit_distance_spearman']:.2f})")
                means = [m.digit_cos[i, j][gap == g].mean() for g in range(1, 10) if (gap == g).any()]
                axes[1, 1].plot([g for g in range(1, 10) if (gap == g).any()], means, color=color)
            if m.categories is not None:
                y = np.arange(len(m.categories)) + 0.38 * k
                lift_lo = m.categories["intra_cosine_ci_low"] - sc["cosine_mean"]
                lift_hi = m.categories["intra_cosine_ci_high"] - sc["cosine_mean"]
                xerr = np.vstack([m.categories["lift"] - lift_lo, lift_hi - m.categories["lift"]])
                axes[1, 2].barh(y, m.categories["lift"], height=0.38, color=color, label=m.name, xerr=xerr,
                                error_kw={"elinewidth": 0.8, "capsize": 2})
                axes[1, 2].set_yticks(np.arange(len(m.categories)) + 0.19 * (len(result.matrices) - 1))
                axes[1, 2].set_yticklabels([f"{c} ({n})" for c, n in zip(m.categories["category"],
                                                                             m.categories["n_words"])])
        axes[0, 0].set_xlabel("row norm")
        axes[0, 0].set_ylabel("tokens")
        axes[0, 1].set_xlabel(f"cosine of token pairs ({s['cosine_sample']} sampled tokens)")
        axes[0, 1].set_ylabel("density")
        axes[0, 2].set_xlabel("eigen-direction (descending)")
        axes[0, 2].set_ylabel("variance fraction λ/Σλ")
        axes[0, 2].set_xscale("log")
        ax = axes[1, 0]
        m = result.matrices[0]
        sc = m.scalars
        ax.bar(["embedding", "Gaussian"], [sc["pentachoron_cv"], sc["pentachoron_cv_gaussian"]],
               color=[PALETTE[0], "0.6"])
        ax.set_ylabel("CV of pentachoron volume")
        lo, hi = sc["pentachoron_cv_ratio_ci"]
        ax.set_title(f"{s['n_simplices']} random 5-token simplices (ratio {sc['pentachoron_cv_ratio']:.2f} "
                     f"[{lo:.2f}, {hi:.2f}])")
        axes[1, 1].set_xlabel("|i − j| of digit tokens i, j")
        axes[1, 1].set_ylabel("cosine")
        axes[1, 2].axvline(0, color="0.5", linewidth=0.8)
        axes[1, 2].set_xlabel("intra-category cosine − global mean cosine")
        for ax in (axes[0, 0], axes[0, 1], axes[0, 2], axes[1, 1], axes[1, 2]):
            if ax.get_legend_handles_labels()[0]:
                ax.legend(loc="best")
        fig.suptitle(f"embedding geometry — {s['model']} (vocab {s['vocab_size']}, d {s['d_model']}, "
                     f"{'tied' if s['tied_embeddings'] else 'untied'} embeddings)")
        save(fig, path)


def plot_categories(result: EmbeddingGeometryResult, path: str | Path) -> None:
    from layerscope.report.plotting import figure, save

    mats = [m for m in result.matrices if m.centroid_cos is not None]
    with figure(1, max(1, len(mats)), width=5.2 * max(1, len(mats)), height=4.4) as (fig, axes):
        axes = np.atleast_1d(axes)
        if not mats:
            axes[0].text(0.5, 0.5, "fewer than two categories with enough single-token words", ha="center")
            axes[0].set_axis_off()
        for ax, m in zip(axes, mats):
            names = m.categories["category"].tolist()
            image = ax.imshow(m.centroid_cos, vmin=-1, vmax=1, cmap="RdBu_r", interpolation="nearest")
            ax.set_xticks(range(len(names)))
            ax.set_xticklabels(names, rotation=45, ha="right")
            ax.set_yticks(range(len(names)))
            ax.set_yticklabels(names)
            ax.grid(False)
            ax.set_title(f"{m.name}: category centroid cosine (separation {m.scalars['category_separation']:.3f})")
            fig.colorbar(image, ax=ax, fraction=0.046)
        save(fig, path)


def run(job: Job) -> Result:
    """Geometry of one model's embedding (and untied unembedding) matrix, from its weights (CPU)."""
    from layerscope.model.adapter import load_model, load_tokenizer

    params = job.params
    model_dir = job.input("model")
    categories = load_word_categories(job.input("categories"))
    adapter = load_model(model_dir, dtype="float32", device="cpu")
    tokenizer = load_tokenizer(model_dir)
    result = embedding_geometry(
        adapter, tokenizer, categories, model=job.model, cosine_sample=params["cosine_sample"],
        n_simplices=params["n_simplices"], min_category_words=params["min_category_words"], seed=params["seed"],
        n_perm=params["n_perm"],
    )
    return Result(
        summary=result.summary,
        tables={"metrics": result.metrics, "words": result.words, "eigenspectrum": result.eigenspectrum},
        figures={"overview": partial(plot_overview, result), "categories": partial(plot_categories, result)},
    )


EXPERIMENT = Experiment(
    name="embedding_geometry",
    dashboard=('participation_ratio_frac', 'effective_rank', 'category_separation', 'category_separation_p_value', 'digit_distance_spearman'),
    family="geometry",
    description="geometry of the (un)embedding matrix",
    description_long="Geometry of the input embedding (and of an untied unembedding), from the weights (decoders "
                     "and encoders).",
    needs="any",
    data="weights",
    gpu=False,
    inputs=("model", "param:categories"),
    run=run,
    tables=("metrics", "words", "eigenspectrum"),
    figures=(Figure("overview", "overview"), Figure("categories", "semantic categories")),
    params={'categories': {'description': 'Word-category file: JSON {"categories": {name: [word, ...]}}.',
                           'type': 'string',
                           'minLength': 1,
                           'default': 'resources/word_categories.json'},
            'cosine_sample': {'description': 'Tokens sampled (seeded, without replacement) for the pairwise cosine '
                                             'distribution.',
                              'type': 'integer',
                              'minimum': 2,
                              'default': 4000},
            'n_simplices': {'description': 'Random 5-token simplices for the pentachoron volume statistics (and as '
                                           'many Gaussian ones).',
                            'type': 'integer',
                            'minimum': 2,
                            'default': 1000},
            'min_category_words': {'description': 'A category is measured only with at least this many single-token '
                                                  'words.',
                                   'type': 'integer',
                                   'minimum': 2,
                                   'default': 3},
            'n_perm': {'description': 'Permutations of the category labels among the words for the null of the '
                                      'category separation.',
                       'type': 'integer',
                       'minimum': 1,
                       'default': 1000}},
    threads=1,
    runtime=60,
)
