"""Seeded, category-stratified samples of prompts (or of prompt pairs).

Every experiment that works on a subset of a prompt set draws it here, never as the first
N of the file: the file is ordered by category, so its head is one category.

Allocation: when ``n`` is at least the number of categories, every category gets one unit
and the rest is shared in proportion to category size (largest remainder, ties broken by a
seeded order), never more than a category holds. When ``n`` is smaller, ``n`` categories
are drawn at random and get one unit each. Inside a category the units are a seeded random
choice. The sample is returned in the order of the input, so it does not depend on how the
draw visited the categories.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from layerscope import LayerscopeError


def stratified_sample(ids: Sequence[str], categories: Sequence[str], n: int | None, *, seed: int = 0) -> list[str]:
    """A seeded, category-stratified sample of ``n`` of ``ids`` (all of them when ``n`` is None or ≥ len)."""
    ids = [str(i) for i in ids]
    categories = [str(c) for c in categories]
    if len(ids) != len(categories):
        raise LayerscopeError(f"stratified_sample: {len(ids)} ids but {len(categories)} categories")
    if len(set(ids)) != len(ids):
        raise LayerscopeError("stratified_sample: ids must be unique")
    if n is None or n >= len(ids):
        return list(ids)
    if n < 1:
        raise LayerscopeError(f"a sample needs at least one unit (asked for {n})")
    rng = np.random.default_rng(seed)
    order = list(dict.fromkeys(categories))  # categories in order of first appearance
    members = {c: [i for i, cat in zip(ids, categories) if cat == c] for c in order}
    tie_break = {c: r for c, r in zip(order, rng.permutation(len(order)))}
    if n < len(order):
        chosen = [order[i] for i in sorted(rng.choice(len(order), size=n, replace=False))]
        quota = {c: (1 if c in chosen else 0) for c in order}
    else:
        quota = {c: 1 for c in order}
        left = n - len(order)
        spare = {c: len(members[c]) - 1 for c in order}
        total_spare = sum(spare.values())
        exact = {c: left * spare[c] / total_spare for c in order} if total_spare else {c: 0.0 for c in order}
        extra = {c: min(int(np.floor(exact[c])), spare[c]) for c in order}
        remaining = left - sum(extra.values())
        by_remainder = sorted(order, key=lambda c: (-(exact[c] - np.floor(exact[c])), tie_break[c]))
        while remaining > 0:
            progressed = False
            for c in by_remainder:
                if remaining and extra[c] < spare[c]:
                    extra[c] += 1
                    remaining -= 1
                    progressed = True
            if not progressed:
                break
        quota = {c: quota[c] + extra[c] for c in order}
    keep: set[str] = set()
    for c in order:
        if quota[c]:
            keep.update(rng.choice(members[c], size=quota[c], replace=False).tolist())
    return [i for i in ids if i in keep]


def sample_summary(ids: Sequence[str], categories: Sequence[str], sample: Sequence[str]) -> dict:
    """``prompt_ids`` (the sample, in file order) and ``prompt_categories`` (units per category)."""
    category = dict(zip(map(str, ids), map(str, categories)))
    counts = Counter(category[str(i)] for i in sample)
    order = list(dict.fromkeys(map(str, categories)))
    return {"prompt_ids": [str(i) for i in sample],
            "prompt_categories": {c: int(counts[c]) for c in order if counts[c]}}


def sample_cache_prompts(tokens, n: int | None, *, seed: int = 0, need_targets: bool = True) -> tuple[list[str], dict]:
    """A stratified sample of the prompts of an activation cache's token table.

    With ``need_targets`` only prompts with at least one completion token are eligible; the
    others (the model stopped at once) are counted in ``n_empty_completions``. Returns the
    sampled ids and the summary fragment (``prompt_ids``, ``prompt_categories``,
    ``n_empty_completions``).
    """
    per_prompt = tokens.groupby("prompt_id", sort=False).agg(category=("category", "first"),
                                                              n_targets=("is_target", "sum"))
    eligible = per_prompt[per_prompt["n_targets"] > 0] if need_targets else per_prompt
    n_empty = int(len(per_prompt) - len(eligible)) if need_targets else 0
    if eligible.empty:
        raise LayerscopeError("no prompt of the cache has a completion token to evaluate")
    ids = [str(i) for i in eligible.index]
    cats = eligible["category"].astype(str).tolist()
    sample = stratified_sample(ids, cats, n, seed=seed)
    out = sample_summary(ids, cats, sample)
    out["n_empty_completions"] = n_empty
    return sample, out
