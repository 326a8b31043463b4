"""FFN avoidance: how much of each block's MLP output lies in the attention subspace Z of its block.

For block ℓ, Z_ℓ is the z_mask basis of that block (built at every block for the sizes of
``z_mask.k`` and ``z_mask.k_sweep``). The MLP output of block ℓ at token t is what the MLP
sub-layer adds to the residual stream, m_t = mlp(u_t) − u_t with u_t the state it reads
(the attention sub-layer's output; the block input under a parallel residual), computed by
:meth:`layerscope.model.adapter.ModelAdapter.sublayers` block by block from the model's own
embedding of each prompt. Tokens: the problem text of every zh and en prompt of the pairs
(role ``prompt``, as everywhere in the suite); the forward runs over the whole prompt (system
message and template included) so the tokens see their real context.

* ``energy_z`` = Σ_t ‖P_Z m_t‖² / Σ_t ‖m_t‖²: the share of the MLP output's energy in Z
  (Z⊥: one minus it). Chance for a subspace with no preference is k/d;
  ``energy_z_over_chance`` divides by it (below 1: the MLP writes less into Z than a random
  k-subspace would receive; the study reported 0.57× at its blocks 32–33).
* Null: the same share in ``n_random_subspaces`` Haar-random k-subspaces (drawn by
  :func:`layerscope.engines.statistics.random_subspaces`). The share depends on the data only
  through the block's energy matrix C = Σ_t m_t m_tᵀ = UΛUᵀ, and for Haar Q it is distributed
  as Σ_j λ_j w_j / Σ_j λ_j with w the diagonal of the random projector QQᵀ, so one set of
  draws per k serves every block (see :func:`energy_null`). Placed by percentile and a
  two-sided empirical p-value, Holm-adjusted over blocks.
* Intervals over pairs: a seeded bootstrap of the pairs (the zh and en prompt of a pair go
  together), the share recomputed as a ratio of per-pair sums.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from layerscope import LayerscopeError
from layerscope.data.paired_states import PairedStates
from layerscope.engines import statistics as st
from layerscope.experiments.registry import Experiment, Figure, Job, Result
from layerscope.experiments.z_subspace.z_mask import ZMask
from layerscope.experiments.z_subspace.z_separation import null_position

log = logging.getLogger(__name__)

N_RANDOM_SUBSPACES = 2000  # two-sided p with Holm over 30 blocks needs > 1200 draws to reach 0.05


@torch.no_grad()
def mlp_outputs(adapter, ids: Sequence[int], positions: np.ndarray) -> list[torch.Tensor]:
    """The MLP sub-layer's output m_t of every block at ``positions`` of one sequence: [n_blocks] × [n, d] float64."""
    device = next(adapter.model.parameters()).device
    tensor = torch.tensor([list(ids)], dtype=torch.long, device=device)
    inputs = adapter.capture_block_inputs(tensor, torch.ones_like(tensor))
    hidden = inputs.resid0
    index = torch.as_tensor(positions, dtype=torch.long, device=device)
    out = []
    for layer in range(adapter.n_layers):
        sub = adapter.sublayers(layer, inputs)
        read = sub.mlp_input(hidden)
        written = sub.mlp(read)
        delta = written - read
        out.append(delta[0, index].to(torch.float64).cpu())
        hidden = sub.attn(hidden) + delta if sub.parallel else written
    return out


def energies(outputs: list[torch.Tensor], bases: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """(Σ_t ‖V_ℓ m_t‖², Σ_t ‖m_t‖²) per block ℓ, for one prompt: two [n_blocks] arrays."""
    inside = np.array([float((m @ v.T).pow(2).sum()) for m, v in zip(outputs, bases)])
    total = np.array([float(m.pow(2).sum()) for m in outputs])
    return inside, total


def projector_diagonals(d: int, k: int, n: int, *, seed: int, chunk: int = 250) -> np.ndarray:
    """Diagonals [n, d] of ``n`` Haar-random rank-k projectors QQᵀ (squared row norms of Q), in seeded chunks
    of :func:`layerscope.engines.statistics.random_subspaces`."""
    parts, done = [], 0
    while done < n:
        c = min(chunk, n - done)
        q = st.random_subspaces(d, k, c, seed=int(np.random.SeedSequence([int(seed), k, done]).generate_state(1)[0]))
        parts.append((q**2).sum(axis=-1))
        done += c
    return np.concatenate(parts)


def energy_null(gram: np.ndarray, diagonals: np.ndarray) -> np.ndarray:
    """Shares tr(QᵀCQ)/tr(C) of the random subspaces whose projector diagonals are given, for C [d, d].

    With C = UΛUᵀ, tr(QᵀCQ) = Σ_j λ_j ‖(UᵀQ)_j‖², and UᵀQ is Haar-distributed when Q is: the
    share is distributed as Σ_j λ_j w_j / Σ_j λ_j with w the diagonal of a random projector, so
    one set of draws serves every block.
    """
    values = np.clip(np.linalg.eigvalsh(gram), 0.0, None)
    total = values.sum()
    if total <= 0:
        return np.full(diagonals.shape[0], np.nan)
    return diagonals @ values / total


@dataclass
class FfnResult:
    metrics: pd.DataFrame
    summary: dict


def ffn_avoidance(adapter, states: PairedStates, mask: ZMask, *, model: str, prompt_set: str,
                  k: Sequence[int] | None = None, n_random_subspaces: int = N_RANDOM_SUBSPACES,
                  seed: int = 0) -> FfnResult:
    cache = states.cache
    n_layers, d = adapter.n_layers, adapter.facts.d_model
    mask.check_fits(n_layers, d, f"the model {model}")
    ks = list(mask.ks[:1] if k is None else k)
    missing = [kk for kk in ks if not mask.has_every_layer(kk)]
    if missing:
        raise LayerscopeError(f"ffn_avoidance: the Z-mask has no basis at every block for k = {missing} (it has "
                              f"{mask.every_layer_ks}); add them to z_mask.k_sweep and re-run z_mask")
    if n_random_subspaces < 1:
        raise LayerscopeError("ffn_avoidance.n_random_subspaces must be at least 1")
    bases = {kk: [mask.basis(layer, kk).to(torch.float64) for layer in range(n_layers)] for kk in ks}
    n_pairs = states.n_pairs
    inside = {kk: np.zeros((n_pairs, n_layers)) for kk in ks}
    total = np.zeros((n_pairs, n_layers))
    grams = np.zeros((n_layers, d, d))
    n_tokens = 0
    started = last = time.monotonic()
    for i, pair in enumerate(states.pairs):
        for prompt in (pair.zh, pair.en):
            outputs = mlp_outputs(adapter, states.prompt_ids(prompt.id), states.positions(prompt.id))
            n_tokens += outputs[0].shape[0]
            for layer, m in enumerate(outputs):
                grams[layer] += (m.T @ m).numpy()
            for kk in ks:
                e_in, e_all = energies(outputs, bases[kk])
                inside[kk][i] += e_in
            total[i] += e_all
        if time.monotonic() - last > 5:
            last = time.monotonic()
            log.info("ffn_avoidance: %d/%d pairs (%.0f s)", i + 1, n_pairs, last - started)
    boot = st.Bootstrap(n_pairs, unit="pair", seed=seed)
    records, by_k = [], []
    blocks = list(range(n_layers))
    for kk in ks:
        chance = kk / d
        share, share_ci = boot.interval(inside[kk], total, statistic=st.weighted_mean)
        share = np.asarray(share, dtype=float)
        ratio = (share / chance).tolist()
        ratio_ci = [[lo / chance, hi / chance] for lo, hi in share_ci]
        perp_ratio = ((1 - share) / (1 - chance)).tolist() if kk < d else [float("nan")] * n_layers
        positions = []
        diagonals = projector_diagonals(d, kk, n_random_subspaces, seed=seed)
        for layer in blocks:
            null = energy_null(grams[layer], diagonals)
            positions.append(null_position(float(share[layer]), null))
        p = [pos["p_value"] for pos in positions]
        holm = st.holm(p)
        low_block, low_stability = boot.stability(inside[kk], total, statistic=st.weighted_mean,
                                                  pick=lambda v: int(np.nanargmin(v)))
        boot.check_stability(f"the block with the lowest MLP energy in Z (k={kk})", low_stability)
        row = {
            "k": kk,
            "chance": chance,
            "energy_z": share.tolist(),
            "energy_z_ci": [list(c) for c in share_ci],
            "energy_z_over_chance": ratio,
            "energy_z_over_chance_ci": ratio_ci,
            "energy_z_perp_over_chance": perp_ratio,
            "null_mean": [pos["null_mean"] for pos in positions],
            "null_range": [[pos["null_lo"], pos["null_hi"]] for pos in positions],
            "percentile": [pos["percentile"] for pos in positions],
            "p_value": p,
            "p_holm": holm,
            "n_blocks_below_null": int(sum(q < 0.05 and pos["percentile"] < 50 for q, pos in zip(holm, positions))),
            "n_blocks_above_null": int(sum(q < 0.05 and pos["percentile"] > 50 for q, pos in zip(holm, positions))),
            "min_block": int(low_block),
            "min_block_stability": low_stability,
            "min_over_chance": float(ratio[low_block]),
            "min_over_chance_ci": ratio_ci[low_block],
        }
        by_k.append(row)
        for layer in blocks:
            records += [
                (layer, kk, "energy_z", share[layer], *share_ci[layer]),
                (layer, kk, "energy_z_over_chance", ratio[layer], *ratio_ci[layer]),
                (layer, kk, "energy_z_perp_over_chance", perp_ratio[layer], np.nan, np.nan),
                (layer, kk, "null_mean", positions[layer]["null_mean"], positions[layer]["null_lo"],
                 positions[layer]["null_hi"]),
                (layer, kk, "percentile", positions[layer]["percentile"], np.nan, np.nan),
                (layer, kk, "p_holm", holm[layer], np.nan, np.nan),
            ]
    frame = pd.DataFrame(records, columns=["block", "k", "metric", "value", "ci_lo", "ci_hi"])
    frame.insert(0, "prompt_set", prompt_set)
    frame.insert(0, "model", model)
    first = by_k[0]
    summary = {
        "model": model,
        "prompt_set": prompt_set,
        "n_pairs": n_pairs,
        **states.sample,
        "n_tokens": int(n_tokens),
        "tokens": "problem text (role 'prompt') of every zh and en prompt; the forward runs over the whole prompt",
        "definition": "energy_z = sum_t |P_Z m_t|^2 / sum_t |m_t|^2 with m_t the MLP sub-layer's output of block l and "
                      "Z the z_mask basis of block l; chance k/d",
        "blocks": blocks,
        "k": ks,
        "d_model": d,
        "n_random_subspaces": int(n_random_subspaces),
        # the first k's curve at the top level (its intervals are checked element by element)
        "energy_z_over_chance": first["energy_z_over_chance"],
        "energy_z_over_chance_ci": first["energy_z_over_chance_ci"],
        "min_over_chance": first["min_over_chance"],
        "min_over_chance_ci": first["min_over_chance_ci"],
        "min_block": first["min_block"],
        "min_block_stability": first["min_block_stability"],
        "n_blocks_below_null": first["n_blocks_below_null"],
        "n_blocks_above_null": first["n_blocks_above_null"],
        "by_k": by_k,
        **boot.summary(),
    }
    return FfnResult(frame, summary)


def plot_energy(result: FfnResult, path: str | Path) -> None:
    from layerscope.report.plotting import PALETTE, figure, layer_axis, save

    s = result.summary
    x = np.asarray(s["blocks"])
    with figure(1, 1, width=7.5, height=3.8) as (fig, ax):
        for i, row in enumerate(s["by_k"]):
            color = PALETTE[i % 10]
            ci = np.asarray(row["energy_z_over_chance_ci"], dtype=float)
            ax.plot(x, row["energy_z_over_chance"], marker="o", markersize=3, color=color, label=f"Z, k={row['k']}")
            ax.fill_between(x, ci[:, 0], ci[:, 1], color=color, alpha=0.25, linewidth=0)
            null = np.asarray(row["null_range"], dtype=float) / row["chance"]
            ax.plot(x, null[:, 0], color=color, linestyle=":", linewidth=0.8)
            ax.plot(x, null[:, 1], color=color, linestyle=":", linewidth=0.8,
                    label=f"random k-subspaces, 95 % (k={row['k']})")
        ax.axhline(1.0, color="0.4", linestyle="--", linewidth=0.8, label="chance k/d")
        layer_axis(ax, len(x) - 1, label="block l (its MLP output against its own Z)")
        ax.set_ylabel("MLP energy in Z / chance")
        ax.legend(loc="best", fontsize=7)
        fig.suptitle(f"does the MLP avoid the attention subspace? — {s['model']} on {s['prompt_set']} "
                     f"({s['n_pairs']} pairs, {s['n_tokens']} tokens; bands: 95 % over pairs)")
        save(fig, path)


def run(job: Job) -> Result:
    """MLP output energy in each block's Z, from forwards of the prompts (CPU is enough for small models)."""
    from layerscope.model.adapter import load_model

    params = job.params
    adapter = load_model(job.input("model"), dtype="float32", device=job.device, kind="decoder")
    states = PairedStates.open(Path(job.input("resid")).parent, job.input("prompts"), max_pairs=params["max_pairs"],
                               seed=params["seed"])
    result = ffn_avoidance(adapter, states, ZMask.load(job.input("mask")), model=job.model,
                           prompt_set=job.prompt_set, k=params["k"], n_random_subspaces=params["n_random_subspaces"],
                           seed=params["seed"])
    return Result(summary=result.summary, tables={"metrics": result.metrics},
                  figures={"energy": partial(plot_energy, result)})


EXPERIMENT = Experiment(
    name="ffn_avoidance",
    headlines=("min_over_chance",),
    dashboard=("min_over_chance", "min_block", "n_blocks_below_null"),
    family="z_subspace",
    description="MLP output energy in each block's Z vs chance",
    description_long="z_subspace: per block, the share of the MLP sub-layer's output energy (problem-text tokens of "
                     "the zh/en pairs) in that block's attention subspace Z, against chance k/d and a null of random "
                     "k-subspaces, with intervals over pairs.",
    needs="decoder",
    data="paired",
    gpu=False,
    inputs=("model", "mask", "resid", "tokens", "prompts"),
    run=run,
    tables=("metrics",),
    figures=(Figure("energy", "MLP energy in Z"),),
    params={
        "k": {
            "description": "Subspace sizes (each must be built at every block by z_mask: in z_mask.k or "
                           "z_mask.k_sweep); null = the first of z_mask.k.",
            "type": ["array", "null"],
            "items": {"type": "integer", "minimum": 1},
            "minItems": 1,
            "default": None,
        },
        "max_pairs": {
            "description": "Pairs used (a seeded sample stratified by category); null = all.",
            "type": ["integer", "null"],
            "minimum": 2,
            "default": None,
        },
        "n_random_subspaces": {
            "description": "Haar-random k-subspaces whose share of the MLP energy makes the null (shared by the "
                           "blocks; a two-sided p below 0.05 after Holm over 30 blocks needs more than 1200).",
            "type": "integer",
            "minimum": 1,
            "default": N_RANDOM_SUBSPACES,
        },
    },
    threads=2,
    runtime=30,
    section="z_subspace",
)
