"""What the surgery experiments share: per-prompt loss sums, intervals around exact point values, the sample.

Every surgery loss is the mean next-token loss pooled over the completion tokens of the
evaluated prompts. Its per-prompt decomposition — the loss sum and the token count of each
prompt — is what the bootstrap resamples (the prompt is the unit; tokens are never
resampled on their own), so the statistic of a loss is the token-weighted mean
Σ sums / Σ counts (:func:`layerscope.engines.statistics.weighted_mean`) and a ratio of two
losses is the ratio of their weighted means on the same resample.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from layerscope.engines.sampling import sample_summary
from layerscope.engines.statistics import Bootstrap, contain
from layerscope.engines.surgery import LossEvaluator

# the sample every loss-sweep experiment (knockout, swap, shuffle, layer_repeat) evaluates on
MAX_PROMPTS_PARAM = {
    "description": "Evaluate the loss on a seeded, category-stratified sample of N prompts of the prompt "
                   "set (every category first, the rest in proportion; null: all). Every variant re-runs "
                   "blocks on these prompts, so this sets the cost.",
    "type": ["integer", "null"],
    "minimum": 1,
    "default": 7
}


def prompt_sums(evaluator: LossEvaluator, per_token: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-prompt loss sums of several per-token arrays, [n_prompts, n_arrays], and the token counts [n_prompts]."""
    columns, counts = [], None
    for values in per_token:
        _, sums, counts = evaluator.per_prompt(values)
        columns.append(sums)
    if counts is None:
        counts = np.array([len(p.target_order) for p in evaluator.prompts], dtype=float)
    return (np.stack(columns, axis=1) if columns else np.zeros((len(counts), 0))), counts


def loss_ratios(sums: np.ndarray, baseline: np.ndarray) -> np.ndarray:
    """Bootstrap statistic: loss ratio of each variant to the baseline on the same resample.

    ``sums`` [n_boot, P, ...] are the variants' per-prompt loss sums, ``baseline`` [n_boot, P]
    the baseline's; the token counts cancel. Returns [n_boot, ...].
    """
    total = baseline.sum(1)
    return sums.sum(1) / total.reshape(total.shape + (1,) * (sums.ndim - 2))


def interval(boot: Bootstrap, point, *arrays, statistic: Callable[..., np.ndarray]):
    """The bootstrap interval of ``statistic`` (pairs for a vector), widened where needed to contain ``point``.

    ``point`` is the number the summary reports, computed as before from the pooled per-token
    losses; the statistic's own value on the sample (Σ sums / Σ counts) equals it up to the
    order of summation, so the widening is at most a rounding step.
    """
    _, ci = boot.interval(*arrays, statistic=statistic)
    return contain(ci, point)


def sample_fragment(evaluator: LossEvaluator) -> dict:
    """``prompt_ids``, ``prompt_categories`` and ``n_empty_completions`` of the evaluated prompts.

    The evaluator of a job (:func:`~layerscope.engines.surgery.surgery_evaluator`) carries the
    fragment of the stratified sample it was built on; an evaluator built directly on given
    prompts gets it from the cache's token table.
    """
    sample = getattr(evaluator, "sample", None)
    if sample is not None:
        return dict(sample)
    tokens = evaluator.cache.tokens
    per_prompt = tokens.groupby("prompt_id", sort=False).agg(category=("category", "first"),
                                                              n_targets=("is_target", "sum"))
    ids = [str(i) for i in per_prompt.index]
    evaluated = {p.prompt_id for p in evaluator.prompts}
    out = sample_summary(ids, per_prompt["category"].astype(str).tolist(), [i for i in ids if i in evaluated])
    out["n_empty_completions"] = int((per_prompt["n_targets"] == 0).sum())
    return out
