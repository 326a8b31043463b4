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
``phase_fractions`` of depth); per phase the mean |cos| of top-1 directions within the
phase and from the phase to the other blocks, and the *capture* of each block's top-1
direction by its phase's shared subspace: the top-``shared_rank`` right singular vectors
of all the phase's stacked top-``top_k`` directions; capture = ‖B v_i‖² (a random
direction gives ``shared_rank``/d). Capture is only reported for phases whose stacked
directions outnumber ``shared_rank`` (else it is trivially 1).

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
from layerscope.engines.geometry import capture, orthonormal_basis, subspace_overlap
from layerscope.experiments.registry import Experiment, Figure, Job, Result
from layerscope.experiments.geometry.residual_geometry import read_rows, select_rows
from layerscope.engines.spectra import eigh_descending, entropy_effective_rank, participation_ratio, row_chunks, stable_rank

log = logging.getLogger(__name__)

BLOCK_METRICS = (
    "frobenius", "token_norm_mean", "token_norm_std", "h_norm_mean", "rel_step_mean", "rel_step_std",
    "cos_delta_h_mean", "abs_cos_delta_h_mean", "parallel_fraction", "effective_rank", "participation_ratio",
    "stable_rank", "top1_energy", "top3_energy", "top10_energy",
)


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
    phases: pd.DataFrame  # phase, blocks, intra/cross |cos|, capture
    summary: dict
    curves: dict  # metric -> array over blocks
    singular_values: np.ndarray  # [n_blocks, top_k]
    directions: np.ndarray  # [n_blocks, top_k, d] top right singular vectors
    top1_abs_cos: np.ndarray  # [n_blocks, n_blocks]
    overlap: np.ndarray  # [n_blocks, n_blocks]
    capture: np.ndarray  # [n_blocks]
    token_norms: np.ndarray  # [n_blocks, n_tokens] ‖δ_t‖


def _block_stats(h: torch.Tensor, nxt: torch.Tensor, top_k: int):
    """Statistics of one block's update δ = nxt − h, its top singular values and right singular vectors.

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
    energies, vectors = eigh_descending(gram, n_vectors=top_k)
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
    return stats, sigma[:top_k], vectors.T, tn.float().numpy()


def delta_svd(
    cache: ActivationCache,
    *,
    model: str,
    prompt_set: str,
    roles=ROLES,
    drop_first_token: bool = True,
    top_k: int = 8,
    shared_rank: int = 8,
    phase_boundaries: Sequence[int] | None = None,
    phase_fractions: Sequence[float] = (0.25, 0.5, 0.75),
) -> DeltaSVDResult:
    n_blocks, d = cache.n_layers, cache.d_model
    if n_blocks < 1:
        raise LayerscopeError(f"{cache.directory}: the cache has no blocks")
    if not 1 <= top_k <= d:
        raise LayerscopeError(f"delta_svd.top_k must be in 1…{d} (d_model), got {top_k}")
    if not 1 <= shared_rank <= d:
        raise LayerscopeError(f"delta_svd.shared_rank must be in 1…{d} (d_model), got {shared_rank}")
    boundaries, phase = phase_assignment(n_blocks, phase_boundaries, phase_fractions)
    rows = select_rows(cache.tokens, roles, drop_first_token)
    if len(rows) < 2:
        raise LayerscopeError(f"{cache.directory}: fewer than 2 tokens with roles {list(roles)}; nothing to decompose")

    curves = {m: np.zeros(n_blocks) for m in BLOCK_METRICS}
    singular = np.zeros((n_blocks, top_k))
    directions = np.zeros((n_blocks, top_k, d))
    token_norms = np.zeros((n_blocks, len(rows)), dtype=np.float32)
    h = read_rows(cache, 0, rows)
    for block in range(n_blocks):
        nxt = read_rows(cache, block + 1, rows)  # at most two layers are held
        stats, sigma, vecs, tn = _block_stats(h, nxt, top_k)
        for key, value in stats.items():
            curves[key][block] = value
        singular[block, : len(sigma)] = sigma
        directions[block, : len(vecs)] = vecs
        token_norms[block] = tn
        h = nxt
        log.info("delta svd: block %d/%d", block, n_blocks - 1)
    del h

    top1 = directions[:, 0, :]
    abs_cos = np.abs(top1 @ top1.T)
    overlap = np.array([[subspace_overlap(directions[i].T, directions[j].T) for j in range(n_blocks)]
                        for i in range(n_blocks)])

    captured = np.full(n_blocks, np.nan)
    phase_rows = []
    n_phases = max(phase) + 1
    for p in range(n_phases):
        members = [i for i in range(n_blocks) if phase[i] == p]
        others = [i for i in range(n_blocks) if phase[i] != p]
        iu = np.triu_indices(len(members), k=1)
        intra = float(abs_cos[np.ix_(members, members)][iu].mean()) if len(members) > 1 else float("nan")
        cross = float(abs_cos[np.ix_(members, others)].mean()) if others else float("nan")
        intra_overlap = float(overlap[np.ix_(members, members)][iu].mean()) if len(members) > 1 else float("nan")
        if len(members) * top_k > shared_rank:
            basis = orthonormal_basis(directions[members].reshape(-1, d), shared_rank)
            for i in members:
                captured[i] = capture(basis, top1[i])
        phase_rows.append({
            "phase": p, "first_block": members[0], "last_block": members[-1], "n_blocks": len(members),
            "intra_top1_abs_cos": intra, "cross_top1_abs_cos": cross, "intra_subspace_overlap": intra_overlap,
            "capture_mean": float(np.nanmean(captured[members])) if np.isfinite(captured[members]).any()
            else float("nan"),
        })
    phases = pd.DataFrame(phase_rows)

    records = [(b, metric, -1, float(values[b])) for metric, values in curves.items() for b in range(n_blocks)]
    records += [(b, "singular_value", k, float(singular[b, k])) for b in range(n_blocks) for k in range(top_k)]
    records += [(b, "capture", -1, float(captured[b])) for b in range(n_blocks)]
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
    adjacent = np.array([abs_cos[i, i + 1] for i in range(n_blocks - 1)])
    finite_phases = phases.dropna(subset=["intra_top1_abs_cos"])
    summary = {
        "model": model,
        "prompt_set": prompt_set,
        "n_blocks": n_blocks,
        "d_model": d,
        "n_tokens": len(rows),
        "roles": list(roles),
        "drop_first_token": drop_first_token,
        "top_k": top_k,
        "shared_rank": shared_rank,
        "effective_rank_mean": float(curves["effective_rank"].mean()),
        "effective_rank_min": er_min,
        "effective_rank_min_block": er_min_block,
        "effective_rank_max": er_max,
        "effective_rank_max_block": er_max_block,
        "top1_energy_max": t1_max,
        "top1_energy_max_block": t1_max_block,
        "rel_step_mean": float(curves["rel_step_mean"].mean()),
        "rel_step_max": rs_max,
        "rel_step_max_block": rs_max_block,
        "parallel_fraction_mean": float(curves["parallel_fraction"].mean()),
        "cos_delta_h_mean": float(curves["cos_delta_h_mean"].mean()),
        "adjacent_top1_abs_cos_mean": float(adjacent.mean()) if len(adjacent) else None,
        "random_abs_cos": float(np.sqrt(2 / (np.pi * d))),
        "phase_boundaries": boundaries,
        "intra_phase_abs_cos": float(finite_phases["intra_top1_abs_cos"].mean()) if len(finite_phases) else None,
        "cross_phase_abs_cos": float(phases["cross_top1_abs_cos"].mean()) if n_phases > 1 else None,
        "capture_mean": float(np.nanmean(captured)) if np.isfinite(captured).any() else None,
        "capture_random": shared_rank / d,
        "phases": phases.to_dict(orient="records"),
    }
    return DeltaSVDResult(metrics, pairs, phases, summary, curves, singular, directions, abs_cos, overlap, captured,
                          token_norms)


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
        ax.plot(x, result.capture, marker="o", markersize=2.5, label="top-1 direction in phase subspace")
        ax.axhline(s["capture_random"], color="0.5", linestyle=":", label="random direction")
        ax.set_ylim(0, 1.02)
        ax.set_ylabel(f"capture by phase top-{s['shared_rank']}")
        ax.legend(loc="best")
        for a in axes.flat:
            _block_axis(a, n)
            mark_boundaries(a, s["phase_boundaries"])
        fig.suptitle(f"block updates δ — {s['model']} on {s['prompt_set']} ({s['n_tokens']} tokens; "
                     f"dashed lines: phase boundaries)")
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
    )
    return Result(
        summary=result.summary,
        tables={"metrics": result.metrics, "pairs": result.pairs},
        figures={"curves": partial(plot_curves, result), "directions": partial(plot_directions, result)},
    )


EXPERIMENT = Experiment(
    name="delta_svd",
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
    params={'roles': {'description': 'Token roles whose updates are stacked (system, template, prompt, completion).',
                      'type': 'array',
                      'items': {'enum': ['system', 'template', 'prompt', 'completion']},
                      'minItems': 1,
                      'uniqueItems': True,
                      'default': ['system', 'template', 'prompt', 'completion']},
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
                                'default': [0.25, 0.5, 0.75]}},
    threads=1,
    runtime=60,
)
