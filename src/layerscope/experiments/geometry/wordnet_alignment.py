"""Does the input embedding follow WordNet's relational structure? From the weights and a WordNet database.

Words: WordNet 3.x nouns (read by :mod:`layerscope.data.wordnet` from the folder the ``wordnet``
parameter names) whose lemma is one lower-case word and is a lemma of its own first (most
frequent) sense — which leaves out proper nouns and multi-word lemmas. They are drawn in a seeded
random order and looked up as single tokens (:func:`~layerscope.experiments.geometry.
embedding_geometry.lookup_words`: leading-space form, bare form, vocabulary entry) until
``n_words`` are found; every drawn word that is not one token (or whose token another word took)
is reported as skipped. A word stands for its first sense; its category is that synset's
lexicographer file (``noun.animal``, ``noun.artifact``, …).

On the rows of the input embedding, unit-normalised:

* the pairs: every pair of distinct words (a seeded sample of ``n_pairs`` of them when there are
  more); for each its cosine and WordNet's path similarity 1 / (1 + d), d the fewest hypernym
  edges up from one sense to a common ancestor and down to the other;
* Spearman's ρ (and Pearson's r) of cosine against path similarity over the pairs;
* the mean cosine of the pairs in each band of path distance d (``bands``: lower edges);
* hypernym decay: for each word, its ancestors 1 … ``max_depth`` hypernym steps up that have a
  single-token lemma of their own; the mean cosine of word and ancestor per step, and the slope
  of cosine on steps (least squares over all word–ancestor pairs);
* lexicographer categories with at least ``min_category_words`` words: mean cosine within each
  category, and the separation — the mean cosine distance (1 − cos) between words of different
  categories over that within a category — against a null of ``n_perm`` permutations of the
  category labels among the words.

Uncertainty: every statistic is a claim about the words drawn, so the unit is the word. A
bootstrap resample draws words with replacement and recomputes each statistic from the pairs
among the drawn words (a pair of words drawn a and b times counts a·b times; two copies of one
word never pair), the hypernym pairs of the drawn words, and the drawn categorised words.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from layerscope import LayerscopeError
from layerscope.data.wordnet import WordNet
from layerscope.engines.geometry import resample_counts, unit_rows
from layerscope.engines.statistics import Bootstrap, null_summary, permutation_null
from layerscope.experiments.geometry.embedding_geometry import (
    lookup_words, single_token, skipped_words,
)
from layerscope.experiments.geometry.residual_geometry import MemoStatistic
from layerscope.experiments.registry import Experiment, Figure, Job, Result

log = logging.getLogger(__name__)

SETTING = "experiments.wordnet_alignment.wordnet"
WORD = re.compile(r"[a-z]+")
CHUNK = 25  # bootstrap resamples per pass over the pairs
MIN_BAND_PAIRS = 20
SKIPPED_SAMPLE = 50
TIE_DECIMALS = 9  # cosines equal to 1e-9 rank as ties (rounding must not break the ties of an exact function)


class WordNetAlignmentError(LayerscopeError):
    """Too few usable words or pairs."""


def candidate_nouns(wn: WordNet) -> pd.DataFrame:
    """Nouns whose lemma is one lower-case word and a lemma of its first sense: word, offset, lexname (sorted)."""
    rows = []
    for lemma, offsets in wn.index.items():
        if len(lemma) < 2 or not WORD.fullmatch(lemma) or not offsets:
            continue
        synset = wn.synsets.get(offsets[0])
        if synset is not None and lemma in synset.words:
            rows.append((lemma, synset.offset, synset.lexname))
    return pd.DataFrame(sorted(rows), columns=["word", "offset", "lexname"])


def draw_words(wn: WordNet, tokenizer, *, n_words: int, min_category_words: int, seed: int) -> pd.DataFrame:
    """Candidate nouns in a seeded random order, looked up until ``n_words`` are single tokens.

    The lookup frame of :func:`lookup_words` (category = lexname) with each word's offset."""
    candidates = candidate_nouns(wn)
    if candidates.empty:
        raise WordNetAlignmentError(f"{wn.folder}: no single-word lower-case noun lemmas")
    order = np.random.default_rng([int(seed), 0x3D]).permutation(len(candidates))
    drawn = candidates.iloc[order]
    words = lookup_words(tokenizer, zip(drawn["lexname"], drawn["word"]), min_category_words, limit=n_words)
    offsets = dict(zip(candidates["word"], candidates["offset"]))
    words.insert(2, "offset", words["word"].map(offsets).astype(np.int64))
    return words


# ---------------------------------------------------------------------------- statistics of resampled words


def weighted_midranks(codes: np.ndarray, n_codes: int, weights: np.ndarray) -> np.ndarray:
    """Mid-ranks [B, P] of P values (integer ``codes`` in value order, ties share a code) when value p
    occurs ``weights[b, p]`` times in resample b: the average rank of its copies in the expanded sample."""
    b = weights.shape[0]
    flat = (codes[None, :] + n_codes * np.arange(b)[:, None]).ravel()
    totals = np.bincount(flat, weights=weights.ravel(), minlength=b * n_codes).reshape(b, n_codes)
    below = np.cumsum(totals, axis=1) - totals
    return (below + (totals + 1.0) / 2.0)[:, codes]


def _pearson_from_sums(total, sx, sy, sxx, syy, sxy) -> np.ndarray:
    """Pearson correlation from weighted sums (NaN without variance)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        cov, vx, vy = sxy - sx * sy / total, sxx - sx**2 / total, syy - sy**2 / total
        return np.where((vx > 0) & (vy > 0), cov / np.sqrt(np.abs(vx * vy)), np.nan)


def pair_statistics(cosine: np.ndarray, similarity: np.ndarray, first: np.ndarray, second: np.ndarray,
                    band: np.ndarray, n_bands: int, counts: np.ndarray) -> dict[str, np.ndarray]:
    """Statistics of the pairs (first[p], second[p]) for word multiplicities ``counts`` [B, n]: each pair
    weighs counts[first]·counts[second]. Spearman (Pearson of the mid-ranks in the expanded sample) and
    Pearson of cosine against path similarity, the mean cosine of all pairs and of each band
    (``band[p]`` in 0 … n_bands − 1), and the pair weight per band."""
    sim_codes = np.unique(similarity, return_inverse=True)[1].ravel()
    cos_codes = np.unique(np.round(cosine, TIE_DECIMALS), return_inverse=True)[1].ravel()
    n_sim, n_cos = int(sim_codes.max()) + 1, int(cos_codes.max()) + 1
    onehot = np.zeros((len(band), n_bands))
    onehot[np.arange(len(band)), band] = 1.0
    design = np.column_stack([np.ones(len(cosine)), similarity, cosine, similarity**2, cosine**2,
                              similarity * cosine, onehot, onehot * cosine[:, None]])
    out = {k: [] for k in ("spearman", "pearson", "cosine_mean", "band_mean", "band_pairs")}
    for start in range(0, counts.shape[0], CHUNK):
        c = counts[start : start + CHUNK]
        w = c[:, first] * c[:, second]
        sums = w @ design
        total = sums[:, 0]
        out["pearson"].append(_pearson_from_sums(*(sums[:, k] for k in range(6))))
        with np.errstate(invalid="ignore", divide="ignore"):
            out["cosine_mean"].append(np.where(total > 0, sums[:, 2] / np.where(total > 0, total, 1), np.nan))
            pairs, band_sums = sums[:, 6 : 6 + n_bands], sums[:, 6 + n_bands :]
            out["band_mean"].append(np.where(pairs > 0, band_sums / np.where(pairs > 0, pairs, 1), np.nan))
        out["band_pairs"].append(pairs)
        rx, ry = weighted_midranks(sim_codes, n_sim, w), weighted_midranks(cos_codes, n_cos, w)
        wx, wy = w * rx, w * ry
        out["spearman"].append(_pearson_from_sums(total, wx.sum(1), wy.sum(1), np.einsum("bp,bp->b", wx, rx),
                                                  np.einsum("bp,bp->b", wy, ry), np.einsum("bp,bp->b", wx, ry)))
    return {k: np.concatenate(v) for k, v in out.items()}


def category_pair_statistics(cosines: np.ndarray, labels: np.ndarray, names: list[str],
                             counts: np.ndarray) -> dict[str, np.ndarray]:
    """Per category the mean cosine over pairs of distinct words (``intra_<name>``), their mean over the
    categories (``intra_mean``), and the separation: mean cosine distance (1 − cos) between words of
    different categories over that within a category — for word multiplicities ``counts`` [B, n] (a pair
    weighs counts_i·counts_j, two copies of one word never pair). The same definitions as
    :func:`~layerscope.experiments.geometry.embedding_geometry.category_statistics`, by block products."""
    labels = np.asarray(labels)
    off = cosines - np.diag(np.diag(cosines))
    distances = 1.0 - cosines
    np.fill_diagonal(distances, 0.0)
    counts = np.asarray(counts, dtype=np.float64)
    col = counts.sum(1)
    all_weight = col**2 - (counts**2).sum(1)
    all_distance = np.einsum("bi,bi->b", counts @ distances, counts)
    out: dict[str, np.ndarray] = {}
    within_weight = np.zeros(len(counts))
    within_distance = np.zeros(len(counts))
    intra = []
    for name in names:
        member = labels == name
        c = counts[:, member]
        weight = c.sum(1) ** 2 - (c**2).sum(1)
        cos_sum = np.einsum("bi,bi->b", c @ off[np.ix_(member, member)], c)
        within_distance += weight - cos_sum  # Σ c_i c_j (1 − cos) over the off-diagonal pairs
        within_weight += weight
        with np.errstate(invalid="ignore", divide="ignore"):
            out[f"intra_{name}"] = np.where(weight > 0, cos_sum / np.where(weight > 0, weight, 1), np.nan)
        intra.append(out[f"intra_{name}"])
    stacked = np.stack(intra, axis=-1)
    finite = np.isfinite(stacked)
    with np.errstate(invalid="ignore", divide="ignore"):
        out["intra_mean"] = np.where(finite.all(-1), np.where(finite, stacked, 0).sum(-1) / len(names), np.nan)
        between_weight = all_weight - within_weight
        within = within_distance / within_weight
        between = (all_distance - within_distance) / between_weight
        out["separation"] = np.where((within_weight > 0) & (between_weight > 0) & (within > 0), between / within,
                                     np.nan)
    return out


def permuted_separation(cosines: np.ndarray, permutations: np.ndarray) -> np.ndarray:
    """The separation (between / within mean cosine distance over pairs of distinct words) under each
    labelling [P, n] (integer labels): [P]. Computed as trace(Lᵀ D L) per one-hot labelling L."""
    distances = 1.0 - cosines
    np.fill_diagonal(distances, 0.0)
    permutations = np.asarray(permutations)
    n_labels = int(permutations.max()) + 1
    n_perm, n = permutations.shape
    total = distances.sum()
    sizes = np.bincount(permutations[0], minlength=n_labels)
    within_pairs = float((sizes * (sizes - 1)).sum())
    between_pairs = n * (n - 1) - within_pairs
    out = np.empty(n_perm)
    for start in range(0, n_perm, 100):
        block = permutations[start : start + 100]
        onehot = np.zeros((n, len(block) * n_labels))
        onehot[np.arange(n)[:, None], np.arange(len(block))[None, :] * n_labels + block.T] = 1.0
        within = ((distances @ onehot) * onehot).sum(0).reshape(len(block), n_labels).sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[start : start + len(block)] = ((total - within) / between_pairs) / (within / within_pairs)
    return out


def decay_statistics(n: np.ndarray, s: np.ndarray) -> dict[str, np.ndarray]:
    """From per-word pair counts n and cosine sums s per hypernym step ([B, words, K], step k + 1 in
    column k): the mean cosine per step [B, K] and the least-squares slope of cosine on step [B] over all
    word–ancestor pairs (the slope needs only the per-step counts and sums)."""
    steps = np.arange(1, n.shape[-1] + 1, dtype=np.float64)
    nk, sk = n.sum(1), s.sum(1)  # [B, K]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(nk > 0, sk / np.where(nk > 0, nk, 1), np.nan)
        total, sx, sxx = nk.sum(-1), nk @ steps, nk @ steps**2
        sy, sxy = sk.sum(-1), sk @ steps
        denominator = total * sxx - sx**2
        slope = np.where(denominator > 0, (total * sxy - sx * sy) / np.where(denominator > 0, denominator, 1), np.nan)
    return {"mean": mean, "slope": slope}


# ---------------------------------------------------------------------------- the measurement


@dataclass
class AlignmentResult:
    summary: dict
    words: pd.DataFrame
    pairs: pd.DataFrame
    hypernyms: pd.DataFrame
    categories: pd.DataFrame
    metrics: pd.DataFrame


def band_labels(edges: list[int]) -> list[str]:
    return [f"{lo}-{hi - 1}" if hi - 1 > lo else str(lo) for lo, hi in zip(edges[:-1], edges[1:])] + [f"{edges[-1]}+"]


def _ancestor_token(wn: WordNet, tokenizer, offset: int, cache: dict) -> tuple[int, str] | None:
    if offset not in cache:
        cache[offset] = None
        for lemma in wn.synsets[offset].words:
            if WORD.fullmatch(lemma):
                found = single_token(tokenizer, lemma)
                if found is not None:
                    cache[offset] = (found[0], lemma)
                    break
    return cache[offset]


def band_similarity(edges: list[int]) -> list[list[float]]:
    """[highest, lowest] path similarity of each distance band (the last band is open: down to 0)."""
    tops = [1.0 / (1 + lo) for lo in edges]
    return [[top, 1.0 / hi if hi is not None else 0.0] for top, hi in zip(tops, edges[1:] + [None])]


def _finite(values) -> list:
    return [float(v) if v is not None and np.isfinite(v) else None for v in values]


def _interval_pairs(ci):
    return [list(c) for c in ci]


def wordnet_alignment(embedding: torch.Tensor, tokenizer, wn: WordNet, *, model: str, n_words: int = 400,
                      n_pairs: int = 100000, bands: tuple[int, ...] = (0, 3, 5, 7, 9, 11, 13, 15),
                      max_depth: int = 6, min_category_words: int = 5, n_perm: int = 1000, n_boot: int = 1000,
                      seed: int = 0, kind: str = "") -> AlignmentResult:
    edges = sorted({int(b) for b in bands})
    if not edges or edges[0] != 0:
        raise WordNetAlignmentError(f"bands must start at 0 (lower edges of path distance), got {list(bands)}")
    words = draw_words(wn, tokenizer, n_words=n_words, min_category_words=min_category_words, seed=seed)
    used = words[words["status"].isin(["used", "category_too_small"])].reset_index(drop=True)
    skipped = skipped_words(words)
    m = len(used)
    if m < 3:
        raise WordNetAlignmentError(f"only {m} WordNet nouns are single tokens in {model}'s vocabulary")
    unit = unit_rows(embedding.detach()[torch.tensor(used["token_id"].to_numpy(), dtype=torch.long)]).numpy()
    cosines = unit @ unit.T
    boot = Bootstrap(m, unit="word", seed=seed, n_boot=n_boot)
    units = np.arange(m)
    counts_of = lambda index: resample_counts(index, m)  # noqa: E731

    # pairs and their path distances
    first, second = np.triu_indices(m, k=1)
    n_all_pairs = len(first)
    if n_all_pairs > n_pairs:
        keep = np.sort(np.random.default_rng([int(seed), 0x9A1]).choice(n_all_pairs, size=n_pairs, replace=False))
        first, second = first[keep], second[keep]
    offsets = used["offset"].to_numpy()
    distance = np.array([wn.path_distance(int(offsets[i]), int(offsets[j])) if offsets[i] != offsets[j] else 0
                         for i, j in zip(first, second)], dtype=object)
    connected = np.array([d is not None for d in distance], dtype=bool)
    first, second = first[connected], second[connected]
    distance = distance[connected].astype(np.int64)
    similarity = 1.0 / (1.0 + distance)
    pair_cos = cosines[first, second]
    band = np.searchsorted(edges, distance, side="right") - 1
    if len(first) < 3:
        raise WordNetAlignmentError(f"only {len(first)} connected word pairs")
    log.info("wordnet alignment: %d words (%d skipped), %d pairs", m, len(skipped), len(first))
    memo = MemoStatistic(lambda index: pair_statistics(pair_cos, similarity, first, second, band, len(edges),
                                                       counts_of(index)))
    labels = band_labels(edges)
    s: dict = {"model": model, "kind": kind, "wordnet": str(wn.folder), "n_candidate_nouns": int(len(candidate_nouns(wn))),
               "n_drawn_words": int(len(words)), "n_words": m, "n_skipped_words": int(len(skipped)),
               "skipped_words": skipped["word"].head(SKIPPED_SAMPLE).tolist(),
               "n_pairs": int(len(first)), "n_all_pairs": int(n_all_pairs),
               "n_unconnected_pairs": int((~connected).sum())}
    for key in ("spearman", "pearson"):
        s[f"{key}_cosine_path_similarity"], s[f"{key}_cosine_path_similarity_ci"] = boot.interval(
            units, statistic=lambda i, key=key: memo(i)[key])
    s["cosine_mean"], s["cosine_mean_ci"] = boot.interval(units, statistic=lambda i: memo(i)["cosine_mean"])
    band_mean, band_ci = boot.interval(units, statistic=lambda i: memo(i)["band_mean"])
    band_pairs = np.bincount(band, minlength=len(edges))
    s.update(band_edges=edges, band_labels=labels, band_path_similarity=band_similarity(edges),
             band_n_pairs=band_pairs.astype(int).tolist(), band_mean_cosine=_finite(band_mean),
             band_mean_cosine_ci=_interval_pairs(band_ci))
    for k, n in enumerate(band_pairs):
        if 0 < n < MIN_BAND_PAIRS:
            boot.flag(f"band d = {labels[k]} has only {int(n)} pairs (< {MIN_BAND_PAIRS})")

    # hypernym decay
    cache: dict = {}
    n_steps = np.zeros((m, max_depth))
    s_steps = np.zeros((m, max_depth))
    hyper_rows = []
    for w, row in enumerate(used.itertuples(index=False)):
        for ancestor, steps in wn.ancestors(int(row.offset)).items():
            if not 1 <= steps <= max_depth:
                continue
            found = _ancestor_token(wn, tokenizer, ancestor, cache)
            if found is None or found[0] == row.token_id:
                continue
            vector = embedding[found[0]].detach().double()
            norm = float(vector.norm())
            if norm == 0:
                continue
            c = float(unit[w] @ (vector / norm).numpy())
            n_steps[w, steps - 1] += 1
            s_steps[w, steps - 1] += c
            hyper_rows.append((row.word, ancestor, found[1], found[0], steps, c))
    hypernyms = pd.DataFrame(hyper_rows, columns=["word", "ancestor_offset", "ancestor_word", "ancestor_token_id",
                                                  "steps", "cosine"])
    decay = MemoStatistic(lambda index: decay_statistics(n_steps[index], s_steps[index]))
    s["depth_steps"] = list(range(1, max_depth + 1))
    s["depth_n_pairs"] = n_steps.sum(0).astype(int).tolist()
    depth_mean, depth_ci = boot.interval(units, statistic=lambda i: decay(i)["mean"])
    s["depth_mean_cosine"], s["depth_mean_cosine_ci"] = _finite(depth_mean), _interval_pairs(depth_ci)
    s["depth_decay_slope"], s["depth_decay_slope_ci"] = boot.interval(units, statistic=lambda i: decay(i)["slope"])
    if s["depth_decay_slope"] is not None and not np.isfinite(s["depth_decay_slope"]):
        s["depth_decay_slope"], s["depth_decay_slope_ci"] = None, None
    s["n_hypernym_pairs"] = int(len(hypernyms))

    # lexicographer categories
    categorised = (used["status"] == "used").to_numpy()
    cat_words = used[categorised]
    names = list(dict.fromkeys(cat_words["category"]))
    category_rows = []
    if len(names) >= 2:
        labels_c = cat_words["category"].to_numpy()
        cos_c = cosines[np.ix_(categorised, categorised)]
        cats = MemoStatistic(lambda index: category_pair_statistics(cos_c, labels_c, names,
                                                                    counts_of(index)[:, categorised]))
        point = cats(units[None])
        for name in names:
            _, ci = boot.interval(units, statistic=lambda i, name=name: cats(i)[f"intra_{name}"])
            category_rows.append({"category": name, "n_words": int((labels_c == name).sum()),
                                  "intra_cosine": float(point[f"intra_{name}"][0]), "intra_cosine_ci_low": ci[0],
                                  "intra_cosine_ci_high": ci[1]})
        s["category_separation"], s["category_separation_ci"] = boot.interval(
            units, statistic=lambda i: cats(i)["separation"])
        s["category_intra_cosine_mean"], s["category_intra_cosine_mean_ci"] = boot.interval(
            units, statistic=lambda i: cats(i)["intra_mean"])
        perms: list[np.ndarray] = []
        permutation_null(lambda perm: perms.append(np.asarray(perm)) or 0.0, labels_c, n_perm=n_perm, seed=seed)
        codes = {name: k for k, name in enumerate(names)}
        null = permuted_separation(cos_c, np.array([[codes[x] for x in perm] for perm in perms]))
        ns = null_summary(float(s["category_separation"]), null)
        s.update(category_separation_null_mean=ns["null_mean"], category_separation_null_q95=ns["null_q"],
                 category_separation_p_value=ns["p_value"], n_perm=int(n_perm), n_categories=len(names),
                 n_category_words=int(categorised.sum()))
        if ns["p_value"] > 0.05:
            boot.flag("category_separation is not above its word-label permutation null (p > 0.05)")
    else:
        s.update(category_separation=None, category_separation_ci=None, category_intra_cosine_mean=None,
                 category_intra_cosine_mean_ci=None, category_separation_null_mean=None,
                 category_separation_null_q95=None, category_separation_p_value=None, n_perm=0, n_categories=0,
                 n_category_words=int(categorised.sum()))
    categories = pd.DataFrame(category_rows, columns=["category", "n_words", "intra_cosine", "intra_cosine_ci_low",
                                                      "intra_cosine_ci_high"])
    s["categories"] = category_rows
    s.update(boot.summary())

    pairs = pd.DataFrame({"word_a": used["word"].to_numpy()[first], "word_b": used["word"].to_numpy()[second],
                          "path_distance": distance, "path_similarity": similarity, "band": np.array(labels)[band],
                          "cosine": pair_cos})
    records = [("all", key, float(s[key])) for key in ("spearman_cosine_path_similarity",
                                                       "pearson_cosine_path_similarity", "cosine_mean",
                                                       "depth_decay_slope", "category_separation")
               if s.get(key) is not None]
    records += [(f"band_{label}", "mean_cosine", float(v)) for label, v in zip(labels, band_mean) if v is not None]
    records += [(f"step_{k}", "mean_cosine", float(v)) for k, v in zip(s["depth_steps"], depth_mean) if v is not None]
    records += [(row["category"], "intra_cosine", row["intra_cosine"]) for row in category_rows]
    metrics = pd.DataFrame(records, columns=["group", "metric", "value"])
    metrics.insert(0, "model", model)
    words_out = words.assign(model=model)
    return AlignmentResult(s, words_out, pairs.assign(model=model), hypernyms.assign(model=model), categories, metrics)


# ---------------------------------------------------------------------------- outputs


def plot_alignment(result: AlignmentResult, path: str | Path) -> None:
    from layerscope.report.plotting import PALETTE, figure, save

    s = result.summary
    with figure(1, 2, width=11.0, height=4.2) as (fig, axes):
        ax = axes[0]
        x = np.arange(len(s["band_labels"]))
        mean = np.array([np.nan if v is None else v for v in s["band_mean_cosine"]], dtype=float)
        ci = np.array([[np.nan, np.nan] if c[0] is None else c for c in s["band_mean_cosine_ci"]], dtype=float)
        ax.errorbar(x, mean, yerr=np.vstack([mean - ci[:, 0], ci[:, 1] - mean]), fmt="o-", color=PALETTE[0],
                    capsize=3)
        ax.axhline(s["cosine_mean"], color="0.5", linewidth=0.8, linestyle="--", label="all pairs")
        ax.set_xticks(x)
        ax.set_xticklabels([f"{label}\n(n={n})" for label, n in zip(s["band_labels"], s["band_n_pairs"])], fontsize=7)
        ax.set_xlabel("WordNet path distance d (path similarity 1/(1+d))")
        ax.set_ylabel("mean cosine of the word pairs")
        lo, hi = s["spearman_cosine_path_similarity_ci"]
        ax.set_title(f"Spearman ρ = {s['spearman_cosine_path_similarity']:.3f} [{lo:.3f}, {hi:.3f}] "
                     f"over {s['n_pairs']} pairs")
        ax.legend(loc="best")
        ax = axes[1]
        steps = np.array(s["depth_steps"])
        mean = np.array([np.nan if v is None else v for v in s["depth_mean_cosine"]], dtype=float)
        ci = np.array([[np.nan, np.nan] if c[0] is None else c for c in s["depth_mean_cosine_ci"]], dtype=float)
        ax.errorbar(steps, mean, yerr=np.vstack([mean - ci[:, 0], ci[:, 1] - mean]), fmt="o-", color=PALETTE[1],
                    capsize=3)
        ax.axhline(s["cosine_mean"], color="0.5", linewidth=0.8, linestyle="--")
        ax.set_xlabel("hypernym steps from the word up to the ancestor")
        ax.set_ylabel("mean cosine of word and ancestor")
        if s["depth_decay_slope"] is not None:
            lo, hi = s["depth_decay_slope_ci"]
            ax.set_title(f"slope {s['depth_decay_slope']:.4f} [{lo:.4f}, {hi:.4f}] per step "
                         f"({s['n_hypernym_pairs']} pairs)")
        fig.suptitle(f"WordNet alignment — {s['model']} ({s['n_words']} nouns, {s['n_skipped_words']} skipped)")
        save(fig, path)


def plot_categories(result: AlignmentResult, path: str | Path) -> None:
    from layerscope.report.plotting import PALETTE, figure, save

    s = result.summary
    table = result.categories.sort_values("intra_cosine")
    with figure(1, 1, width=7.0, height=max(3.0, 0.28 * len(table) + 1.4)) as (fig, ax):
        if table.empty:
            ax.text(0.5, 0.5, "fewer than two lexicographer categories with enough words", ha="center")
            ax.set_axis_off()
        else:
            y = np.arange(len(table))
            xerr = np.vstack([table["intra_cosine"] - table["intra_cosine_ci_low"],
                              table["intra_cosine_ci_high"] - table["intra_cosine"]])
            ax.barh(y, table["intra_cosine"], color=PALETTE[2], xerr=xerr, error_kw={"elinewidth": 0.8, "capsize": 2})
            ax.set_yticks(y)
            ax.set_yticklabels([f"{c} ({n})" for c, n in zip(table["category"], table["n_words"])])
            ax.axvline(s["cosine_mean"], color="0.3", linewidth=0.8, linestyle="--", label="all word pairs")
            ax.set_xlabel("mean cosine within the category")
            ax.legend(loc="lower right")
            lo, hi = s["category_separation_ci"]
            ax.set_title(f"separation {s['category_separation']:.3f} [{lo:.3f}, {hi:.3f}]; null "
                         f"{s['category_separation_null_mean']:.3f}, p = {s['category_separation_p_value']:.3g}")
        save(fig, path)


def open_wordnet(path) -> WordNet:
    return WordNet.open(path, setting=SETTING)


def run(job: Job) -> Result:
    """WordNet relational alignment of one model's input embedding (CPU, from the weights)."""
    from layerscope.model.adapter import load_model, load_tokenizer

    params = job.params
    wn = open_wordnet(params["wordnet"])
    model_dir = job.input("model")
    adapter = load_model(model_dir, dtype="float32", device="cpu")
    tokenizer = load_tokenizer(model_dir)
    result = wordnet_alignment(
        adapter.embed.weight, tokenizer, wn, model=job.model, n_words=params["n_words"], n_pairs=params["n_pairs"],
        bands=tuple(params["bands"]), max_depth=params["max_depth"], min_category_words=params["min_category_words"],
        n_perm=params["n_perm"], n_boot=params["n_boot"], seed=params["seed"], kind=adapter.facts.kind,
    )
    return Result(
        summary=result.summary,
        tables={"metrics": result.metrics, "words": result.words, "pairs": result.pairs,
                "hypernyms": result.hypernyms},
        figures={"alignment": partial(plot_alignment, result), "categories": partial(plot_categories, result)},
    )


EXPERIMENT = Experiment(
    name="wordnet_alignment",
    family="geometry",
    description="embedding cosine against WordNet's noun hierarchy",
    description_long="Does the input embedding follow WordNet's relational structure: cosine against path "
                     "similarity, by distance band, along hypernym chains and by lexicographer category, with "
                     "intervals over resampled words (decoders and encoders; needs a WordNet 3.x database, "
                     "Debian's wordnet-base).",
    needs="any",
    data="weights",
    gpu=False,
    inputs=("model",),
    run=run,
    tables=("metrics", "words", "pairs", "hypernyms"),
    figures=(Figure("alignment", "cosine by WordNet distance and hypernym step"),
             Figure("categories", "lexicographer categories")),
    headlines=("spearman_cosine_path_similarity", "depth_decay_slope", "category_separation"),
    dashboard=("spearman_cosine_path_similarity", "depth_decay_slope", "category_separation",
               "category_separation_p_value", "n_words"),
    params={'wordnet': {'description': 'Folder of a WordNet 3.x database (data.noun, index.noun), e.g. what '
                                       "Debian's wordnet-base package installs.",
                        'type': 'string', 'minLength': 1, 'default': '/usr/share/wordnet'},
            'n_words': {'description': 'Nouns drawn (seeded) until this many are single tokens of the vocabulary.',
                        'type': 'integer', 'minimum': 3, 'default': 400},
            'n_pairs': {'description': 'Word pairs compared: all pairs of the words, or a seeded sample of this '
                                       'many when there are more.',
                        'type': 'integer', 'minimum': 3, 'default': 100000},
            'bands': {'description': 'Lower edges of the WordNet path-distance bands (the first must be 0; the '
                                     'last band is open).',
                      'type': 'array', 'items': {'type': 'integer', 'minimum': 0}, 'minItems': 1,
                      'default': [0, 3, 5, 7, 9, 11, 13, 15]},
            'max_depth': {'description': 'Hypernym steps up from each word for the decay of cosine with depth.',
                          'type': 'integer', 'minimum': 2, 'default': 6},
            'min_category_words': {'description': 'A lexicographer category is measured only with at least this '
                                                  'many words.',
                                   'type': 'integer', 'minimum': 2, 'default': 5},
            'n_perm': {'description': 'Permutations of the category labels among the words for the null of the '
                                      'category separation.',
                       'type': 'integer', 'minimum': 1, 'default': 1000},
            'n_boot': {'description': 'Bootstrap resamples of the words.',
                       'type': 'integer', 'minimum': 1, 'default': 1000}},
    threads=1,
    runtime=30,
)
