"""What each block writes into the residual stream: the SVD of its updates.

For block i, δ_i = resid.(i+1) − resid.i, stacked over the selected tokens of a prompt set
(``roles``; the first token of every sequence is dropped by default — it often carries
outlier activations). Per block:

* ``frobenius`` ‖δ‖_F; per-token ‖δ_t‖ mean and std (``token_norm_mean``/``_std``); the
  input norm ‖h_t‖ (``h_norm_mean``);
* ``rel_step_mean``/``_std``: mean and std of ‖δ_t‖ / ‖h_t‖ with h = resid.i;
* ``cos_delta_h_mean``: mean cos(δ_t, h_t); ``abs_cos_delta_h_mean``: mean |cos(δ_t, h_t)|;
  ``parallel_fraction``: Σ_t (δ_t·ĥ_t)² / Σ_t ‖δ_t‖², the share of the update's energy along ±h;
* singular values σ of δ (uncentred, the top ``top_k`` kept) with energies p = σ²/Σσ²:
  ``effective_rank`` exp(H(p)) (entropy effective rank), ``participation_ratio``,
  ``top1_energy``/``top3_energy``/``top10_energy`` (Σ of the leading p).

Across blocks: |cos| between the top right-singular directions v_i (``top1_abs_cos``) and the
overlap of the top-``top_k`` subspaces (‖V_iᵀV_j‖_F²/k, ``subspace_overlap``). Blocks are
grouped into phases (explicit ``phase_boundaries`` = first block of each later phase, or
``phase_fractions`` of depth, or ``phases: seed``: the named scheme A, B, C, D, E, tail of a
64-block reference model, scaled to depth — see :func:`seed_phase_boundaries`); per phase the mean |cos| of top-1 directions within the
phase and from the phase to the other blocks, and the *capture* of each block's top-1
direction by the subspace the *other* blocks of its phase share: the top-``shared_rank``
right singular vectors of their stacked top-``top_k`` directions (leave-one-out: the
block's own directions are not in the basis it is scored against). Capture is compared
with an empirical null: the same procedure on independent Haar-random orthonormal
``top_k``-frames for every block, ``n_null`` seeded draws (mean, 95th percentile, p-value
of the observed mean capture, per phase with a Holm correction). The basis with the
block's own directions in it (the old definition) captures its own direction by
construction (≈13× a random direction's capture for independent random directions at
SmolLM2's size); it is kept per block only, as ``capture_self_included``.

Uncertainty: a bootstrap over prompts (the tokens of one prompt are never resampled on
their own). Token means (relative step, cos(δ, h), parallel fraction) are recomputed from
per-prompt sums; the direction statistics (capture, |cos| of top-1 directions, top-1
energy) from per-prompt Gram matrices of δ projected on a ``ritz_dim``-dimensional span: each
resample's top directions are the Rayleigh–Ritz vectors of its Gram matrix in that span
(exact when ``ritz_dim`` ≥ d; below d the span holds the leading right singular vectors and
the directions into which reweighting prompts moves the top ones, see :func:`ritz_basis`).
No forward pass is involved.

Only two layers of the cache are held at a time; float64 work runs on blocks of rows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from layerscope import LayerscopeError
from layerscope.data.activations import ActivationCache
from layerscope.model.generate import ROLES
from layerscope.engines.geometry import leave_one_out_capture, random_frames, resample_counts, subspace_overlap
from layerscope.engines.sampling import sample_summary
from layerscope.engines.statistics import Bootstrap, holm, null_summary
from layerscope.experiments.registry import Experiment, Figure, Job, Result
from layerscope.progress import track
from layerscope.experiments.geometry.residual_geometry import MemoStatistic, read_rows, select_rows
from layerscope.engines.spectra import (
    eigh_descending, entropy_effective_rank, participation_ratio, row_chunks, single_thread, stable_rank,
)

log = logging.getLogger(__name__)

BLOCK_METRICS = (
    "frobenius", "token_norm_mean", "token_norm_std", "h_norm_mean", "rel_step_mean", "rel_step_std",
    "cos_delta_h_mean", "abs_cos_delta_h_mean", "parallel_fraction", "effective_rank", "participation_ratio",
    "stable_rank", "top1_energy", "top3_energy", "top10_energy",
)
DEFAULT_ROLES = ("prompt", "completion")  # system and template tokens repeat identically in every prompt
RITZ_DIM = 64
NULL_CHUNK = 100  # null draws / resamples processed at a time
# per-prompt sums kept for every block (exact bootstrap of the token means)
PROMPT_SUMS = ("energy", "rel_step", "cos", "parallel")


# The named phases of the delta-SVD study, as the first block of each on its 64-block reference model.
SEED_REFERENCE_BLOCKS = 64
SEED_PHASES = (("A", 0), ("B", 7), ("C", 10), ("D", 32), ("E", 47), ("tail", 59))
PHASE_SCHEMES = ("fractions", "seed")


def seed_phase_boundaries(n_blocks: int) -> tuple[list[int], list[str]]:
    """(boundaries, names) of the named phase scheme on an ``n_blocks``-block model.

    Block b of an L-block model sits at reference depth b·64/L; it belongs to the last named
    phase whose first reference block s satisfies s ≤ b·64/L, so a phase starts at block
    ceil(s·L/64) (exact integer arithmetic). On 64 blocks this is the reference itself
    (A 0–6, B 7–9, C 10–31, D 32–46, E 47–58, tail 59–63); on 28 blocks A 0–3, B 4, C 5–13,
    D 14–20, E 21–25, tail 26–27; on 30 blocks A 0–3, B 4, C 5–14, D 15–22, E 23–27, tail 28–29.
    A phase that would hold no block on a shallow model is dropped (its name with it).
    """
    if n_blocks < 1:
        raise LayerscopeError("the seed phase scheme needs at least one block")
    starts = [(name, -(-start * n_blocks // SEED_REFERENCE_BLOCKS)) for name, start in SEED_PHASES]
    kept: list[tuple[str, int]] = []
    for i, (name, first) in enumerate(starts):
        nxt = starts[i + 1][1] if i + 1 < len(starts) else n_blocks
        if first < min(nxt, n_blocks):  # the phase holds at least one block
            kept.append((name, first))
    boundaries = [first for _, first in kept[1:]]
    return boundaries, [name for name, _ in kept]


def phase_assignment(n_blocks: int, boundaries: Sequence[int] | None = None,
                     fractions: Sequence[float] = (0.25, 0.5, 0.75)) -> tuple[list[int], list[int]]:
    """(boundaries, phase index of every block). A boundary b starts a new phase at block b."""
    if boundaries is not None:
        b = [int(x) for x in boundaries]
        if any(not 1 <= x <= n_blocks - 1 for x in b) or b != sorted(set(b)):
            raise LayerscopeError(
                f"delta_svd.phase_boundaries {list(boundaries)} must be strictly increasing block indices "
                f"in 1…{n_blocks - 1} (the first block of each phase after the first)"
            )
    else:
        if any(not 0 < f < 1 for f in fractions):
            raise LayerscopeError(f"delta_svd.phase_fractions {list(fractions)} must lie strictly between 0 and 1")
        b = sorted({int(round(f * n_blocks)) for f in fractions} & set(range(1, n_blocks)))
    phase = [sum(i >= x for x in b) for i in range(n_blocks)]
    return b, phase


@dataclass
class DeltaSVDResult:
    metrics: pd.DataFrame  # tidy: model, prompt_set, block, metric, k, value
    pairs: pd.DataFrame  # block_i, block_j, top1_abs_cos, subspace_overlap
    phases: pd.DataFrame  # phase, blocks, intra/cross |cos|, capture and its null
    summary: dict
    curves: dict  # metric -> array over blocks
    singular_values: np.ndarray  # [n_blocks, top_k]
    directions: np.ndarray  # [n_blocks, top_k, d] top right singular vectors
    top1_abs_cos: np.ndarray  # [n_blocks, n_blocks]
    overlap: np.ndarray  # [n_blocks, n_blocks]
    capture: np.ndarray  # [n_blocks] leave-one-out capture
    capture_self_included: np.ndarray  # [n_blocks] capture by a basis that contains the block's own directions
    capture_null: np.ndarray  # [n_null, n_blocks] leave-one-out capture of independent random directions
    capture_ci: list  # [n_blocks] bootstrap interval of each block's capture (pairs; None where undefined)
    token_norms: np.ndarray  # [n_blocks, n_tokens] ‖δ_t‖


def _block_stats(h: torch.Tensor, nxt: torch.Tensor, top_k: int, codes: torch.Tensor, n_prompts: int,
                 ritz_dim: int):
    """Statistics of one block's update δ = nxt − h, its top singular values and right singular vectors,
    per-prompt sums of the token statistics, and per-prompt Gram matrices of δ in the span of its top
    ``ritz_dim`` right singular vectors ([n_prompts, K, K], with that basis [d, K]).

    Works on blocks of rows in float64 (δ is formed exactly from the float32 cache, a block at a time).
    """
    d = h.shape[1]
    gram = torch.zeros((d, d), dtype=torch.float64)
    tn_parts, hn_parts, dot_parts = [], [], []
    for rows in row_chunks(h.shape[0]):
        h64 = h[rows].to(torch.float64)
        delta = nxt[rows].to(torch.float64) - h64
        gram += delta.T @ delta
        tn_parts.append(delta.norm(dim=1))
        hn_parts.append(h64.norm(dim=1))
        dot_parts.append((delta * h64).sum(dim=1))
    tn, hn, dot = torch.cat(tn_parts), torch.cat(hn_parts), torch.cat(dot_parts)
    safe_h = hn.clamp_min(1e-12)
    cos = dot / (tn * hn).clamp_min(1e-12)
    energies, vectors = eigh_descending(gram)
    total = energies.sum()
    p = energies / total if total > 0 else energies
    sigma = np.sqrt(energies)
    stats = {
        "frobenius": float(np.sqrt((tn**2).sum())),
        "token_norm_mean": float(tn.mean()),
        "token_norm_std": float(tn.std(unbiased=False)),
        "h_norm_mean": float(hn.mean()),
        "rel_step_mean": float((tn / safe_h).mean()),
        "rel_step_std": float((tn / safe_h).std(unbiased=False)),
        "cos_delta_h_mean": float(cos.mean()),
        "abs_cos_delta_h_mean": float(cos.abs().mean()),
        "parallel_fraction": float(((dot / safe_h) ** 2).sum() / (tn**2).sum()) if total > 0 else float("nan"),
        "effective_rank": entropy_effective_rank(sigma),
        "participation_ratio": participation_ratio(sigma),
        "stable_rank": stable_rank(sigma),
        "top1_energy": float(p[:1].sum()),
        "top3_energy": float(p[:3].sum()),
        "top10_energy": float(p[:10].sum()),
    }
    sums = {}
    for key, per_token in (("energy", tn**2), ("rel_step", tn / safe_h), ("cos", cos), ("parallel", (dot / safe_h) ** 2)):
        sums[key] = torch.zeros(n_prompts, dtype=torch.float64).index_add_(0, codes, per_token).numpy()
    basis = torch.from_numpy(ritz_basis(h, nxt, vectors, top_k, codes, n_prompts, ritz_dim))
    projected = torch.zeros((n_prompts, ritz_dim, ritz_dim), dtype=torch.float64)
    for rows in row_chunks(h.shape[0]):
        z = (nxt[rows].to(torch.float64) - h[rows].to(torch.float64)) @ basis
        projected.index_add_(0, codes[rows], z[:, :, None] * z[:, None, :])
    return stats, sigma[:top_k], vectors[:, :top_k].T, tn.float().numpy(), sums, projected.numpy(), basis.numpy()


def ritz_basis(h: torch.Tensor, nxt: torch.Tensor, vectors: np.ndarray, top_k: int, codes: torch.Tensor,
               n_prompts: int, ritz_dim: int) -> np.ndarray:
    """An orthonormal basis [d, ritz_dim] in which bootstrap resamples recompute a block's top directions.

    All right singular vectors when ``ritz_dim`` ≥ d (exact). Otherwise the leading quarter of
    the full sample's right singular vectors (at least ``top_k``), completed by the directions
    into which resampling prompts moves the top-k ones: to first order a resample changes the
    Gram matrix by Σ_p (w_p − 1) G_p, which moves v_i along (I − VVᵀ) G_p v_i; the top left
    singular vectors of these per-prompt vectors, outside the leading ones, fill the rest
    (columns of zeros where they run out).
    """
    d = vectors.shape[0]
    if ritz_dim >= d:
        return vectors[:, :ritz_dim]
    n_leading = min(ritz_dim, max(top_k, ritz_dim // 4))
    leading = torch.from_numpy(vectors[:, :n_leading])
    top = torch.from_numpy(vectors[:, :top_k])
    moved = torch.zeros((n_prompts, d, top_k), dtype=torch.float64)  # G_p V_k, per prompt
    for rows in row_chunks(h.shape[0]):
        delta = nxt[rows].to(torch.float64) - h[rows].to(torch.float64)
        moved.index_add_(0, codes[rows], delta[:, :, None] * (delta @ top)[:, None, :])
    moved = moved.permute(1, 0, 2).reshape(d, -1)
    moved = moved - leading @ (leading.T @ moved)
    with single_thread():
        u, sv, _ = torch.linalg.svd(moved, full_matrices=False)
    n_more = min(ritz_dim - n_leading, int((sv > 1e-10 * sv.max().clamp_min(1e-300)).sum()))
    basis = torch.zeros((d, ritz_dim), dtype=torch.float64)
    basis[:, :n_leading] = leading
    basis[:, n_leading : n_leading + n_more] = u[:, :n_more]
    return basis.numpy()


def _prompt_codes(tokens: pd.DataFrame, rows: np.ndarray):
    """Prompt code (0 … n_prompts − 1, in order of appearance) of every selected row, the prompt ids and categories."""
    info = tokens.set_index("row").loc[rows]
    ids = info["prompt_id"].astype(str).to_numpy()
    order = list(dict.fromkeys(ids))
    code_of = {pid: i for i, pid in enumerate(order)}
    category_of = dict(zip(ids, info["category"].astype(str)))
    return np.array([code_of[x] for x in ids], dtype=np.int64), order, [category_of[x] for x in order]


def _phase_means(values: np.ndarray, phase: Sequence[int]) -> np.ndarray:
    """[..., n_blocks] → [..., n_phases]: mean over each phase's blocks (NaN where none is finite)."""
    phase = np.asarray(phase)
    out = []
    for p in range(int(phase.max()) + 1):
        v = values[..., phase == p]
        finite = np.isfinite(v)
        with np.errstate(invalid="ignore"):
            out.append(np.where(finite.any(-1), np.where(finite, v, 0).sum(-1) / np.maximum(finite.sum(-1), 1), np.nan))
    return np.stack(out, axis=-1)


def null_q95(null: np.ndarray, n_blocks: int) -> np.ndarray:
    """Per block, the 95th percentile of the null capture (NaN for blocks without a capture)."""
    out = np.full(n_blocks, np.nan)
    defined = np.isfinite(null).all(axis=0) if len(null) else np.zeros(n_blocks, dtype=bool)
    if defined.any():
        out[defined] = np.quantile(null[:, defined], 0.95, axis=0)
    return out


def _nanmean_last(values: np.ndarray) -> np.ndarray:
    finite = np.isfinite(values)
    return np.where(finite.any(-1), np.where(finite, values, 0).sum(-1) / np.maximum(finite.sum(-1), 1), np.nan)


def capture_null(n_blocks: int, d: int, top_k: int, phase: Sequence[int], shared_rank: int, n_null: int,
                 seed: int) -> np.ndarray:
    """Leave-one-out capture [n_null, n_blocks] of independent Haar-random ``top_k``-frames per block:
    the same procedure as the observed capture, on directions that share nothing."""
    rng = np.random.default_rng([int(seed), 0xD5D])
    out = []
    for start in range(0, n_null, NULL_CHUNK):
        frames = random_frames((min(NULL_CHUNK, n_null - start), n_blocks), top_k, d, rng)
        out.append(leave_one_out_capture(frames, phase, shared_rank))
    return np.concatenate(out) if out else np.zeros((0, n_blocks))


def direction_statistics(directions: np.ndarray, phase: Sequence[int], shared_rank: int) -> dict[str, np.ndarray]:
    """The direction headlines of ``directions`` [..., n_blocks, k, d]: per-block leave-one-out capture,
    their mean, the mean |cos| of top-1 directions within phases, across phases and of adjacent blocks."""
    phase = np.asarray(phase)
    n_blocks = directions.shape[-3]
    top1 = directions[..., :, 0, :]
    abs_cos = np.abs(top1 @ np.swapaxes(top1, -1, -2))  # [..., n, n]
    captured = leave_one_out_capture(directions, phase, shared_rank)
    intra, cross = [], []
    for p in range(int(phase.max()) + 1):
        members = np.nonzero(phase == p)[0]
        others = np.nonzero(phase != p)[0]
        if len(members) > 1:
            iu = np.triu_indices(len(members), k=1)
            intra.append(abs_cos[..., members[:, None], members[None, :]][..., iu[0], iu[1]].mean(-1))
        if len(others):
            cross.append(abs_cos[..., members[:, None], others[None, :]].mean((-1, -2)))
    nan = np.full(abs_cos.shape[:-2], np.nan)
    adjacent = np.arange(n_blocks - 1)
    return {
        "capture": captured,
        "capture_mean": _nanmean_last(captured),
        "intra_phase_abs_cos": np.mean(intra, axis=0) if intra else nan,
        "cross_phase_abs_cos": np.mean(cross, axis=0) if cross else nan,
        "adjacent_top1_abs_cos_mean": abs_cos[..., adjacent, adjacent + 1].mean(-1) if n_blocks > 1 else nan,
    }


def delta_svd(
    cache: ActivationCache,
    *,
    model: str,
    prompt_set: str,
    roles=DEFAULT_ROLES,
    drop_first_token: bool = True,
    top_k: int = 8,
    shared_rank: int = 8,
    phase_boundaries: Sequence[int] | None = None,
    phase_fractions: Sequence[float] = (0.25, 0.5, 0.75),
    phase_scheme: str = "fractions",
    n_null: int = 1000,
    ritz_dim: int = RITZ_DIM,
    seed: int = 0,
    n_boot: int | None = None,
) -> DeltaSVDResult:
    n_blocks, d = cache.n_layers, cache.d_model
    if n_blocks < 1:
        raise LayerscopeError(f"{cache.directory}: the cache has no blocks")
    if not 1 <= top_k <= d:
        raise LayerscopeError(f"delta_svd.top_k must be in 1…{d} (d_model), got {top_k}")
    if not 1 <= shared_rank <= d:
        raise LayerscopeError(f"delta_svd.shared_rank must be in 1…{d} (d_model), got {shared_rank}")
    if n_null < 1:
        raise LayerscopeError(f"delta_svd.n_null must be at least 1, got {n_null}")
    ritz_dim = int(min(d, max(top_k, ritz_dim)))
    if phase_scheme not in PHASE_SCHEMES:
        raise LayerscopeError(f"delta_svd.phases must be one of {PHASE_SCHEMES}, got {phase_scheme!r}")
    if phase_scheme == "seed":
        if phase_boundaries is not None:
            raise LayerscopeError("delta_svd: phases 'seed' sets the boundaries itself; leave phase_boundaries null")
        seed_boundaries, phase_names = seed_phase_boundaries(n_blocks)
        boundaries, phase = phase_assignment(n_blocks, seed_boundaries)
    else:
        boundaries, phase = phase_assignment(n_blocks, phase_boundaries, phase_fractions)
        phase_names = [str(p) for p in range(len(boundaries) + 1)]
    rows = select_rows(cache.tokens, roles, drop_first_token)
    if len(rows) < 2:
        raise LayerscopeError(f"{cache.directory}: fewer than 2 tokens with roles {list(roles)}; nothing to decompose")
    codes_np, prompt_ids, prompt_categories = _prompt_codes(cache.tokens, rows)
    n_prompts = len(prompt_ids)
    codes = torch.from_numpy(codes_np)

    curves = {m: np.zeros(n_blocks) for m in BLOCK_METRICS}
    singular = np.zeros((n_blocks, top_k))
    directions = np.zeros((n_blocks, top_k, d))
    token_norms = np.zeros((n_blocks, len(rows)), dtype=np.float32)
    sums = {key: np.zeros((n_prompts, n_blocks)) for key in PROMPT_SUMS}
    projected = np.zeros((n_blocks, n_prompts, ritz_dim, ritz_dim))
    bases = np.zeros((n_blocks, d, ritz_dim))
    h = read_rows(cache, 0, rows)
    for block in track(range(n_blocks), "delta svd", unit="blocks"):
        nxt = read_rows(cache, block + 1, rows)  # at most two layers are held
        stats, sigma, vecs, tn, block_sums, block_projected, basis = _block_stats(h, nxt, top_k, codes, n_prompts,
                                                                                  ritz_dim)
        for key, value in stats.items():
            curves[key][block] = value
        singular[block, : len(sigma)] = sigma
        directions[block, : len(vecs)] = vecs
        token_norms[block] = tn
        for key in PROMPT_SUMS:
            sums[key][:, block] = block_sums[key]
        projected[block], bases[block] = block_projected, basis
        h = nxt
    del h
    counts = np.bincount(codes_np, minlength=n_prompts).astype(np.float64)

    top1 = directions[:, 0, :]
    abs_cos = np.abs(top1 @ top1.T)
    overlap = np.array([[subspace_overlap(directions[i].T, directions[j].T) for j in range(n_blocks)]
                        for i in range(n_blocks)])
    observed = direction_statistics(directions, phase, shared_rank)
    captured = observed["capture"]
    self_included = leave_one_out_capture(directions, phase, shared_rank, include_self=True)
    self_included[~np.isfinite(captured)] = np.nan
    has_capture = bool(np.isfinite(captured).any())
    null = capture_null(n_blocks, d, top_k, phase, shared_rank, n_null, seed) if has_capture \
        else np.zeros((0, n_blocks))
    log.info("delta svd: capture null from %d draws of random directions", len(null))

    # ---- bootstrap over prompts
    projected_flat = torch.from_numpy(projected.transpose(1, 0, 2, 3).reshape(n_prompts, -1).copy())
    basis_t = torch.from_numpy(bases)
    boot = Bootstrap(n_prompts, unit="prompt", seed=seed, **({"n_boot": n_boot} if n_boot else {}))
    units = np.arange(n_prompts)

    def resampled_directions(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(top-k Ritz directions [c, n_blocks, k, d], top-1 energy share [c, n_blocks]) of resampled Grams."""
        c = len(weights)
        gram = (torch.from_numpy(weights) @ projected_flat).reshape(c, n_blocks, ritz_dim, ritz_dim)
        with single_thread():
            values, vectors = torch.linalg.eigh(gram)  # ascending
            vectors = vectors.flip(-1)[..., :top_k]  # [c, b, K, k]
            stacked = vectors.permute(1, 2, 0, 3).reshape(n_blocks, ritz_dim, c * top_k)
            dirs = (basis_t @ stacked).reshape(n_blocks, d, c, top_k).permute(2, 0, 3, 1).numpy()  # [c, b, k, d]
        total = weights @ sums["energy"]  # [c, b] exact Σ‖δ‖² of the resample
        with np.errstate(invalid="ignore", divide="ignore"):
            top1_share = np.where(total > 0, values[..., -1].numpy() / np.where(total > 0, total, 1.0), np.nan)
        return dirs, top1_share

    direction_keys = ("capture_mean", "intra_phase_abs_cos", "cross_phase_abs_cos", "adjacent_top1_abs_cos_mean")

    def direction_stat(index: np.ndarray) -> np.ndarray:
        """[B, 4 + 2·n_blocks]: the direction headlines, per-block capture and top-1 energy of each resample."""
        weights_all = resample_counts(index, n_prompts)
        out = []
        for start in range(0, len(weights_all), NULL_CHUNK):
            dirs, share = resampled_directions(weights_all[start : start + NULL_CHUNK])
            st = direction_statistics(dirs, phase, shared_rank)
            out.append(np.concatenate([np.stack([st[k] for k in direction_keys], axis=-1), st["capture"], share],
                                      axis=-1))
        return np.concatenate(out)

    memo = MemoStatistic(direction_stat)
    column = {key: i for i, key in enumerate(direction_keys)}
    summary_ci = {}
    for key in direction_keys:
        summary_ci[f"{key}_ci"] = _ci(boot, units, lambda i, j=column[key]: memo(i)[:, j])
    capture_ci = boot.interval(units, statistic=lambda i: memo(i)[:, 4 : 4 + n_blocks])[1]
    capture_ci = [pair if np.isfinite(captured[b]) else None for b, pair in enumerate(capture_ci)]
    share = lambda i: memo(i)[:, 4 + n_blocks :]  # noqa: E731
    t1_block, t1_stability = boot.stability(units, statistic=share, pick=lambda v: int(np.nanargmax(v)))
    boot.check_stability("top1_energy_max_block", t1_stability)
    summary_ci["top1_energy_max_ci"] = _ci(boot, units, lambda i: np.nanmax(share(i), axis=-1))

    def token_mean(s, n):  # mean over blocks of the token mean of each block
        return (s.sum(1) / n.sum(1)[:, None]).mean(-1)

    summary_ci["rel_step_mean_ci"] = boot.interval(sums["rel_step"], counts, statistic=token_mean)[1]
    summary_ci["cos_delta_h_mean_ci"] = boot.interval(sums["cos"], counts, statistic=token_mean)[1]
    summary_ci["parallel_fraction_mean_ci"] = boot.interval(
        sums["parallel"], sums["energy"], statistic=lambda a, e: (a.sum(1) / e.sum(1)).mean(-1))[1]

    # ---- phases
    phase_capture = _phase_means(captured, phase)
    phase_null = _phase_means(null, phase) if len(null) else None
    phase_rows = []
    n_phases = max(phase) + 1
    for p in range(n_phases):
        members = [i for i in range(n_blocks) if phase[i] == p]
        others = [i for i in range(n_blocks) if phase[i] != p]
        iu = np.triu_indices(len(members), k=1)
        intra = float(abs_cos[np.ix_(members, members)][iu].mean()) if len(members) > 1 else float("nan")
        cross = float(abs_cos[np.ix_(members, others)].mean()) if others else float("nan")
        intra_overlap = float(overlap[np.ix_(members, members)][iu].mean()) if len(members) > 1 else float("nan")
        row = {"phase": p, "name": phase_names[p], "first_block": members[0], "last_block": members[-1], "n_blocks": len(members),
               "intra_top1_abs_cos": intra, "cross_top1_abs_cos": cross, "intra_subspace_overlap": intra_overlap,
               "capture_mean": float(phase_capture[p]), "capture_null_mean": float("nan"),
               "capture_null_q95": float("nan"), "capture_p_value": float("nan")}
        if np.isfinite(phase_capture[p]) and phase_null is not None:
            ns = null_summary(float(phase_capture[p]), phase_null[:, p])
            row.update(capture_null_mean=ns["null_mean"], capture_null_q95=ns["null_q"],
                       capture_p_value=ns["p_value"])
        phase_rows.append(row)
    phases = pd.DataFrame(phase_rows)
    tested = phases["capture_p_value"].notna()
    phases["capture_p_holm"] = float("nan")
    if tested.any():
        phases.loc[tested, "capture_p_holm"] = holm(phases.loc[tested, "capture_p_value"].tolist())

    records = [(b, metric, -1, float(values[b])) for metric, values in curves.items() for b in range(n_blocks)]
    records += [(b, "singular_value", k, float(singular[b, k])) for b in range(n_blocks) for k in range(top_k)]
    records += [(b, "capture", -1, float(captured[b])) for b in range(n_blocks)]
    records += [(b, "capture_ci_low", -1, float(capture_ci[b][0]) if capture_ci[b] else float("nan"))
                for b in range(n_blocks)]
    records += [(b, "capture_ci_high", -1, float(capture_ci[b][1]) if capture_ci[b] else float("nan"))
                for b in range(n_blocks)]
    null_q = null_q95(null, n_blocks)
    records += [(b, "capture_null_q95", -1, float(null_q[b])) for b in range(n_blocks)]
    records += [(b, "capture_self_included", -1, float(self_included[b])) for b in range(n_blocks)]
    records += [(b, "phase", -1, float(phase[b])) for b in range(n_blocks)]
    metrics = pd.DataFrame(records, columns=["block", "metric", "k", "value"])
    metrics.insert(0, "prompt_set", prompt_set)
    metrics.insert(0, "model", model)
    bi, bj = np.meshgrid(np.arange(n_blocks), np.arange(n_blocks), indexing="ij")
    pairs = pd.DataFrame({"block_i": bi.ravel(), "block_j": bj.ravel(), "top1_abs_cos": abs_cos.ravel(),
                          "subspace_overlap": overlap.ravel()})

    def at(metric, fn):
        index = int(fn(curves[metric]))
        return float(curves[metric][index]), index

    er_min, er_min_block = at("effective_rank", np.argmin)
    er_max, er_max_block = at("effective_rank", np.argmax)
    t1_max, t1_max_block = at("top1_energy", np.argmax)
    rs_max, rs_max_block = at("rel_step_mean", np.argmax)
    finite = lambda x: float(x) if np.isfinite(x) else None  # noqa: E731
    capture_mean = finite(observed["capture_mean"])
    capture_keys: dict = {"capture_mean": capture_mean, "capture_mean_ci": None, "capture_null_mean": None,
                          "capture_null_q95": None, "capture_percentile": None, "capture_p_value": None}
    if capture_mean is not None:
        ns = null_summary(capture_mean, _nanmean_last(null))
        capture_keys.update(capture_mean_ci=summary_ci["capture_mean_ci"], capture_null_mean=ns["null_mean"],
                            capture_null_q95=ns["null_q"], capture_percentile=ns["percentile"],
                            capture_p_value=ns["p_value"])
    summary = {
        "model": model,
        "prompt_set": prompt_set,
        "n_blocks": n_blocks,
        "d_model": d,
        "n_tokens": len(rows),
        "n_prompts": n_prompts,
        **sample_summary(prompt_ids, prompt_categories, prompt_ids),
        "roles": list(roles),
        "drop_first_token": drop_first_token,
        "top_k": top_k,
        "shared_rank": shared_rank,
        "ritz_dim": ritz_dim,
        "effective_rank_mean": float(curves["effective_rank"].mean()),
        "effective_rank_min": er_min,
        "effective_rank_min_block": er_min_block,
        "effective_rank_max": er_max,
        "effective_rank_max_block": er_max_block,
        "top1_energy_max": t1_max,
        "top1_energy_max_ci": summary_ci["top1_energy_max_ci"],
        "top1_energy_max_block": t1_max_block,
        "top1_energy_max_block_stability": t1_stability,
        "rel_step_mean": float(curves["rel_step_mean"].mean()),
        "rel_step_mean_ci": summary_ci["rel_step_mean_ci"],
        "rel_step_max": rs_max,
        "rel_step_max_block": rs_max_block,
        "parallel_fraction_mean": float(curves["parallel_fraction"].mean()),
        "parallel_fraction_mean_ci": summary_ci["parallel_fraction_mean_ci"],
        "cos_delta_h_mean": float(curves["cos_delta_h_mean"].mean()),
        "cos_delta_h_mean_ci": summary_ci["cos_delta_h_mean_ci"],
        "adjacent_top1_abs_cos_mean": finite(observed["adjacent_top1_abs_cos_mean"]),
        "adjacent_top1_abs_cos_mean_ci": summary_ci["adjacent_top1_abs_cos_mean_ci"] if n_blocks > 1 else None,
        "random_abs_cos": float(np.sqrt(2 / (np.pi * d))),
        "phase_scheme": phase_scheme,
        "phase_boundaries": boundaries,
        "phase_names": phase_names,
        "intra_phase_abs_cos": finite(observed["intra_phase_abs_cos"]),
        "intra_phase_abs_cos_ci": summary_ci["intra_phase_abs_cos_ci"]
        if np.isfinite(observed["intra_phase_abs_cos"]) else None,
        "cross_phase_abs_cos": finite(observed["cross_phase_abs_cos"]),
        "cross_phase_abs_cos_ci": summary_ci["cross_phase_abs_cos_ci"] if n_phases > 1 else None,
        **capture_keys,
        "n_null": int(len(null)),
        "phases": phases.to_dict(orient="records"),
        **boot.summary(),
    }
    if t1_block != t1_max_block:  # the Ritz point estimate picks another block than the exact spectrum
        log.warning("delta svd: top-1 energy argmax %d (Ritz) differs from %d (exact)", t1_block, t1_max_block)
    return DeltaSVDResult(metrics, pairs, phases, summary, curves, singular, directions, abs_cos, overlap, captured,
                          self_included, null, capture_ci, token_norms)


def _ci(boot: Bootstrap, units: np.ndarray, statistic) -> list | None:
    """The interval of a scalar statistic of the resample index (None when the point value is undefined)."""
    point, interval = boot.interval(units, statistic=statistic)
    return interval if point is not None and np.isfinite(point) else None


# ---------------------------------------------------------------------------- outputs


def _block_axis(ax, n_blocks: int) -> None:
    ax.set_xlabel("block i (δ = resid.(i+1) − resid.i)")
    ax.set_xlim(-0.5, n_blocks - 0.5)
    step = max(1, round(n_blocks / 10))
    ax.set_xticks(range(0, n_blocks, step))


def plot_curves(result: DeltaSVDResult, path: str | Path) -> None:
    from layerscope.report.plotting import figure, mark_boundaries, save

    s = result.summary
    n = s["n_blocks"]
    x = np.arange(n)
    c = result.curves
    with figure(2, 3, width=11.0, height=5.8) as (fig, axes):
        ax = axes[0, 0]
        ax.plot(x, c["token_norm_mean"], marker="o", markersize=2.5, label="mean ‖δ_t‖")
        ax.plot(x, c["h_norm_mean"], linestyle="--", label="mean ‖h_t‖ (block input)")
        ax.set_yscale("log")
        ax.set_ylabel("norm")
        ax.legend(loc="upper left")
        ax = axes[0, 1]
        ax.plot(x, c["rel_step_mean"], marker="o", markersize=2.5)
        ax.set_yscale("log")
        ax.set_ylabel("relative step ‖δ‖/‖h‖ (mean)")
        ax = axes[0, 2]
        ax.plot(x, c["cos_delta_h_mean"], marker="o", markersize=2.5, label="mean cos(δ, h)")
        ax.plot(x, c["parallel_fraction"], linestyle="--", label="energy along ±h")
        ax.axhline(0, color="0.5", linewidth=0.8)
        ax.legend(loc="best")
        ax.set_ylabel("alignment with the stream")
        ax = axes[1, 0]
        ax.plot(x, c["effective_rank"], marker="o", markersize=2.5, label="entropy effective rank")
        ax.plot(x, c["participation_ratio"], linestyle="--", label="participation ratio")
        ax.set_yscale("log")
        ax.set_ylabel("dimensions of δ")
        ax.legend(loc="best")
        ax = axes[1, 1]
        for key, label in (("top1_energy", "top-1"), ("top3_energy", "top-3"), ("top10_energy", "top-10")):
            ax.plot(x, c[key], marker="o", markersize=2, label=label)
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("energy fraction σ²/Σσ²")
        ax.legend(loc="best")
        ax = axes[1, 2]
        ax.plot(x, result.capture, marker="o", markersize=2.5, label="top-1 direction in the others' subspace")
        lo = np.array([pair[0] if pair else np.nan for pair in result.capture_ci], dtype=float)
        hi = np.array([pair[1] if pair else np.nan for pair in result.capture_ci], dtype=float)
        ax.fill_between(x, lo, hi, alpha=0.25, label="95 % interval (prompts)")
        if len(result.capture_null):
            ax.plot(x, null_q95(result.capture_null, n), color="0.4", linestyle=":",
                    label="null: 95th percentile, random directions")
        ax.set_ylim(0, 1.02)
        ax.set_ylabel(f"capture by the phase's other blocks (top-{s['shared_rank']})")
        ax.legend(loc="best")
        for a in axes.flat:
            _block_axis(a, n)
            mark_boundaries(a, s["phase_boundaries"])
        if s.get("phase_scheme") == "seed":  # name the phases along the top of the first panel
            starts = [0, *s["phase_boundaries"]]
            ends = [*s["phase_boundaries"], n]
            for name, a0, a1 in zip(s["phase_names"], starts, ends):
                axes[0, 0].text((a0 + a1 - 1) / 2, 1.0, name, transform=axes[0, 0].get_xaxis_transform(),
                                ha="center", va="bottom", fontsize=7)
        scheme = "named phases " + ", ".join(s["phase_names"]) if s.get("phase_scheme") == "seed" else "phases"
        fig.suptitle(f"block updates δ — {s['model']} on {s['prompt_set']} ({s['n_tokens']} tokens; "
                     f"dashed lines: {scheme} boundaries)")
        save(fig, path)


def plot_directions(result: DeltaSVDResult, path: str | Path) -> None:
    from layerscope.report.plotting import figure, save

    s = result.summary
    n = s["n_blocks"]
    with figure(1, 2, width=10.0, height=4.4) as (fig, axes):
        for ax, matrix, title in ((axes[0], result.top1_abs_cos, "|cos| of top-1 update directions"),
                                  (axes[1], result.overlap, f"overlap of top-{s['top_k']} update subspaces")):
            image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
            for b in s["phase_boundaries"]:
                ax.axhline(b - 0.5, color="w", linewidth=0.8)
                ax.axvline(b - 0.5, color="w", linewidth=0.8)
            ax.set_xlabel("block")
            ax.set_ylabel("block")
            ax.grid(False)
            ax.set_title(title)
            fig.colorbar(image, ax=ax, fraction=0.046)
        fig.suptitle(f"shared vs specialised update directions — {s['model']} ({n} blocks; white lines: phases)")
        save(fig, path)


def run(job: Job) -> Result:
    """The SVD of every block's residual update of one model on one prompt set, from its activation cache (CPU)."""
    params = job.params
    cache = ActivationCache(Path(job.input("resid")).parent)
    result = delta_svd(
        cache, model=job.model, prompt_set=job.prompt_set, roles=params["roles"],
        drop_first_token=params["drop_first_token"], top_k=params["top_k"], shared_rank=params["shared_rank"],
        phase_boundaries=params["phase_boundaries"], phase_fractions=params["phase_fractions"],
        phase_scheme=params["phases"], n_null=params["n_null"], ritz_dim=params["ritz_dim"], seed=params["seed"],
    )
    return Result(
        summary=result.summary,
        tables={"metrics": result.metrics, "pairs": result.pairs},
        figures={"curves": partial(plot_curves, result), "directions": partial(plot_directions, result)},
    )


EXPERIMENT = Experiment(
    name="delta_svd",
    dashboard=('capture_mean', 'capture_p_value', 'effective_rank_mean', 'top1_energy_max_block'),
    headlines=("capture_mean",),
    family="geometry",
    description="the SVD of each block's residual update",
    description_long="SVD of each block's update δ = resid.(i+1) − resid.i over the activation cache (decoders).",
    needs="decoder",
    data="prompts",
    gpu=False,
    inputs=("resid", "tokens"),
    run=run,
    tables=("metrics", "pairs"),
    figures=(Figure("curves", "per-block updates"), Figure("directions", "update directions")),
    params={'roles': {'description': 'Token roles whose updates are stacked (system, template, prompt, completion). '
                                     "System and template tokens repeat identically in every prompt of a chat "
                                     'template: including them stacks as many copies of the same updates.',
                      'type': 'array',
                      'items': {'enum': ['system', 'template', 'prompt', 'completion']},
                      'minItems': 1,
                      'uniqueItems': True,
                      'default': list(DEFAULT_ROLES)},
            'drop_first_token': {'description': 'Leave out the first token of every sequence (outlier updates).',
                                 'type': 'boolean',
                                 'default': True},
            'top_k': {'description': 'Singular values and right singular vectors kept per block (the directions '
                                     'compared across blocks).',
                      'type': 'integer',
                      'minimum': 1,
                      'default': 8},
            'shared_rank': {'description': "Rank of each phase's shared subspace (top right singular vectors of the "
                                           "phase's stacked top-k directions).",
                            'type': 'integer',
                            'minimum': 1,
                            'default': 8},
            'phase_boundaries': {'description': 'First block of each phase after the first (strictly increasing, in '
                                                '1…L−1); null uses phase_fractions.',
                                 'type': ['array', 'null'],
                                 'items': {'type': 'integer', 'minimum': 1},
                                 'default': None},
            'phase_fractions': {'description': 'Phase boundaries as fractions of depth, used when phase_boundaries is '
                                               'null.',
                                'type': 'array',
                                'items': {'type': 'number', 'exclusiveMinimum': 0, 'exclusiveMaximum': 1},
                                'minItems': 1,
                                'default': [0.25, 0.5, 0.75]},
            'phases': {'description': "How blocks are grouped into phases: 'fractions' (phase_boundaries, or "
                                      "phase_fractions of depth) or 'seed' (the delta-SVD study's named phases A, B, "
                                      "C, D, E and tail, defined on a 64-block model as A 0-6, B 7-9, C 10-31, D "
                                      "32-46, E 47-58, tail 59-63, scaled to depth: a phase starts at block "
                                      "ceil(s*L/64) for its reference start s; phase_boundaries must then be null).",
                       'enum': list(PHASE_SCHEMES),
                       'default': 'fractions'},
            'n_null': {'description': 'Draws of independent random directions (one orthonormal top_k-frame per '
                                      'block) for the null distribution of the leave-one-out capture.',
                       'type': 'integer',
                       'minimum': 1,
                       'default': 1000},
            'ritz_dim': {'description': "Dimension of the span (the full sample's top right singular vectors of "
                                        "each block's update) in which bootstrap resamples recompute their top "
                                        'directions; d_model makes the bootstrap exact.',
                         'type': 'integer',
                         'minimum': 1,
                         'default': RITZ_DIM}},
    threads=1,
    runtime=60,
)
