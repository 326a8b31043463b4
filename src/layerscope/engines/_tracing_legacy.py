"""Causal tracing as knockout ran it until issue 13 (kept only while knockout still imports it; delete
with knockout's tracing). The ROME-style experiment is :mod:`layerscope.engines.tracing`.

For a prompt, the *answer* is the first completion token (the model's own greedy answer,
stored in the cache) and the *answer position* t0 is the last position before it — the one
that predicts it. The clean run is the cached residual stream. The corrupted run adds
Gaussian noise to ``resid.0`` (what block 0 receives: the token embeddings, plus position
embeddings where the model adds them) at the prompt's own tokens (role ``prompt``; the
system message and chat template stay clean), with standard deviation
σ = ``noise_scale`` × the standard deviation of all ``resid.0`` entries in the cache,
drawn from a seeded generator. Restoring the clean ``resid.l`` at one position t (l = 0 … L;
``resid.l`` is the input of block l, ``resid.L`` the last block's output) and running the
corrupted model on from there gives the restored probability of the answer at t0.

Positions are addressed by their offset from the answer position (0 = t0, -1 = the token
before, …), so prompts of different lengths line up; a heatmap shows the mean restored
probability over prompts.

Properties that hold exactly (and are tested): with noise 0 every restoration gives the
clean probability; restoring every position at one layer gives the clean probability;
restoring ``resid.L`` at t0 gives the clean probability and at any other position the
corrupted one; restoring a position before the first noised token changes nothing.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from layerscope import LayerscopeError
from layerscope.data.activations import ActivationCache
from layerscope.model.adapter import ModelAdapter

log = logging.getLogger(__name__)


@dataclass
class TracePrompt:
    prompt_id: str
    ids: list[int]  # tokens 0 … t0
    row0: int  # cache row of position 0
    noised: list[int]  # positions that receive noise
    answer_id: int
    answer: str  # its text
    tokens: list[str]


@dataclass
class TraceResult:
    table: pd.DataFrame  # prompt_id, layer, offset, position, token, p_restored
    prompts: pd.DataFrame  # prompt_id, answer_id, answer, p_clean, p_corrupt, n_noised, length
    heatmap: np.ndarray  # [n_layers + 1, n_offsets] mean restored probability (NaN where no prompt reaches)
    offsets: list[int]
    noise_std: float

    def summary(self) -> dict:
        p_clean = float(self.prompts["p_clean"].mean())
        p_corrupt = float(self.prompts["p_corrupt"].mean())
        gap = p_clean - p_corrupt
        inner = self.heatmap[:-1]  # restoring resid.L matters only at t0 (trivially)
        peak = np.unravel_index(np.nanargmax(inner), inner.shape) if np.isfinite(inner).any() else (0, 0)
        return {
            "trace_prompts": int(len(self.prompts)),
            "trace_noise_std": self.noise_std,
            "trace_p_clean": p_clean,
            "trace_p_corrupt": p_corrupt,
            "trace_peak_layer": int(peak[0]),
            "trace_peak_offset": int(self.offsets[peak[1]]),
            "trace_peak_p": float(inner[peak]),
            "trace_peak_recovery": float((inner[peak] - p_corrupt) / gap) if abs(gap) > 1e-12 else None,
        }


def trace_prompts(cache: ActivationCache, n_prompts: int) -> list[TracePrompt]:
    """The first ``n_prompts`` prompts of the cache that have an answer and prompt tokens to corrupt."""
    out = []
    for prompt_id, g in cache.tokens.groupby("prompt_id", sort=False):
        g = g.sort_values("position")
        targets = g[g["is_target"]]
        if targets.empty:
            continue
        t0 = int(targets["position"].min())
        head = g[g["position"] <= t0]
        noised = head.loc[head["role"] == "prompt", "position"].astype(int).tolist()
        if not noised:
            continue
        answer = g.loc[g["position"] == t0 + 1, "token"]
        out.append(TracePrompt(str(prompt_id), head["token_id"].astype(int).tolist(), int(g["row"].iloc[0]), noised,
                               int(targets.loc[targets["position"] == t0, "target_id"].iloc[0]),
                               str(answer.iloc[0]) if len(answer) else "", head["token"].astype(str).tolist()))
        if len(out) == n_prompts:
            break
    if not out:
        raise LayerscopeError(f"{cache.directory}: no prompt with prompt-role tokens and a completion to trace")
    return out


def resid0_std(cache: ActivationCache) -> float:
    """Standard deviation of every entry of resid.0 in the cache (the noise unit)."""
    return float(cache.resid(0).double().std())


@torch.no_grad()
def restored_probabilities(adapter: ModelAdapter, cache: ActivationCache, prompt: TracePrompt,
                           restore_sets: Sequence[Sequence[int]], noise: torch.Tensor,
                           device: torch.device | str = "cpu", layout: str = "auto") -> tuple[float, float, np.ndarray]:
    """(p_clean, p_corrupt, P) for one prompt; P[l, k] = probability of the answer at t0 with the
    clean resid.l restored at the positions ``restore_sets[k]`` (mean over noise samples).

    ``noise`` is [samples, T, d]: what is added to resid.0. The tokens before the first noised
    one are identical in every run; with ``layout`` ``auto`` (where the architecture allows
    packing, see :meth:`ModelAdapter.packing_problem`) they are computed once and every
    (sample, restoration) run follows them in one packed row under a tree-shaped mask;
    ``padded`` runs each as a full row of a batch.
    """
    from layerscope.engines.surgery import capture_packed, tree_mask

    device = torch.device(device)
    dtype = adapter.dtype
    n_layers, T = adapter.n_layers, len(prompt.ids)
    answer = prompt.answer_id
    samples, n_sets = noise.shape[0], len(restore_sets)
    noise = noise.to(device=device, dtype=dtype)

    def prob(hidden_t0: torch.Tensor) -> torch.Tensor:
        return torch.softmax(adapter.readout(hidden_t0).float(), dim=-1)[:, answer].double()

    clean = [cache.resid(layer, slice(prompt.row0, prompt.row0 + T), dtype=dtype).to(device)
             for layer in range(n_layers + 1)]
    p_clean = float(prob(clean[n_layers][T - 1][None])[0])
    noised = torch.nonzero(noise.abs().sum(dim=(0, 2)) > 0).flatten()
    shared = min(int(noised[0]) if len(noised) else T - 1, T - 1)  # untouched leading tokens
    out = np.zeros((n_layers + 1, n_sets))

    if layout != "padded" and adapter.packing_problem(T) is None:
        width = T - shared

        def packed(n_segments: int):
            positions = list(range(shared)) + list(range(shared, T)) * n_segments
            segments = [0] * shared + [k + 1 for k in range(n_segments) for _ in range(width)]
            ids = torch.tensor([prompt.ids[:shared] + prompt.ids[shared:] * n_segments])
            pos = torch.tensor(positions)
            return capture_packed(adapter, ids, tree_mask(adapter, pos, torch.tensor(segments)), pos[None], device)

        (small, problem), (wide, problem_wide) = packed(samples), packed(samples * n_sets)
        if problem is None and problem_wide is None:
            ends = shared + width * torch.arange(samples * n_sets, device=device) + width - 1  # t0 of each segment
            corrupted = small.resid0.clone()
            corrupted[0, shared:] += noise[:, shared:].reshape(samples * width, -1)
            for layer in range(n_layers + 1):
                tails = corrupted[0, shared:].view(samples, width, -1).repeat_interleave(n_sets, dim=0).clone()
                for k, positions in enumerate(restore_sets):  # positions before `shared` are clean already
                    index = torch.as_tensor([t for t in positions if t >= shared], dtype=torch.long, device=device)
                    tails[k::n_sets, index - shared] = clean[layer][index]
                state = torch.cat([corrupted[:, :shared], tails.reshape(1, samples * n_sets * width, -1)], dim=1)
                hidden = adapter.run_blocks(state, range(layer, n_layers), wide)
                out[layer] = prob(hidden[0, ends]).view(samples, n_sets).mean(0).cpu().numpy()
                if layer < n_layers:
                    corrupted = adapter.run_block(layer, corrupted, small)
            ends = shared + width * torch.arange(samples, device=device) + width - 1
            return p_clean, float(prob(corrupted[0, ends]).mean()), out
        log.info("tracing in padded rows: %s", problem or problem_wide)

    ids = torch.tensor([prompt.ids], device=device)

    def inputs_for(rows: int):
        return adapter.capture_block_inputs(ids.expand(rows, T), torch.ones((rows, T), dtype=torch.long, device=device))

    small, wide = inputs_for(samples), inputs_for(samples * n_sets)
    corrupted = small.resid0 + noise
    for layer in range(n_layers + 1):
        restored = corrupted.repeat_interleave(n_sets, dim=0).clone()  # rows: (sample, set)
        for k, positions in enumerate(restore_sets):
            index = torch.as_tensor(list(positions), dtype=torch.long, device=device)
            restored[k::n_sets, index] = clean[layer][index]
        hidden = adapter.run_blocks(restored, range(layer, n_layers), wide)
        out[layer] = prob(hidden[:, T - 1]).view(samples, n_sets).mean(0).cpu().numpy()
        if layer < n_layers:
            corrupted = adapter.run_block(layer, corrupted, small)
    return p_clean, float(prob(corrupted[:, T - 1]).mean()), out


def causal_trace(adapter: ModelAdapter, cache: ActivationCache, *, n_prompts: int = 2, n_positions: int = 8,
                 noise_scale: float = 3.0, n_samples: int = 1, seed: int = 0,
                 device: torch.device | str = "cpu", layout: str = "auto") -> TraceResult:
    """The heatmap over layers 0 … L and offsets -(n_positions-1) … 0 (see module docstring)."""
    if n_positions < 1 or n_samples < 1 or noise_scale < 0:
        raise LayerscopeError("causal tracing needs n_positions ≥ 1, n_samples ≥ 1 and noise_scale ≥ 0")
    prompts = trace_prompts(cache, n_prompts)
    sigma = noise_scale * resid0_std(cache)
    offsets = list(range(-(n_positions - 1), 1))
    n_layers, d = adapter.n_layers, adapter.facts.d_model
    rows, info = [], []
    grid = np.full((len(prompts), n_layers + 1, len(offsets)), np.nan)
    for p_index, prompt in enumerate(prompts):
        T = len(prompt.ids)
        generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + p_index)
        noise = torch.zeros((n_samples, T, d), dtype=torch.float64)
        noised = torch.as_tensor(prompt.noised)
        noise[:, noised] = torch.randn((n_samples, len(prompt.noised), d), generator=generator, dtype=torch.float64)
        noise *= sigma
        kept = [(k, T - 1 + o) for k, o in enumerate(offsets) if T - 1 + o >= 0]
        p_clean, p_corrupt, probs = restored_probabilities(
            adapter, cache, prompt, [[pos] for _, pos in kept], noise, device, layout)
        for column, (k, pos) in enumerate(kept):
            grid[p_index, :, k] = probs[:, column]
            for layer in range(n_layers + 1):
                rows.append((prompt.prompt_id, layer, offsets[k], pos, prompt.tokens[pos], float(probs[layer, column])))
        info.append((prompt.prompt_id, prompt.answer_id, prompt.answer, p_clean, p_corrupt, len(prompt.noised), T))
        log.info("traced %s: p_clean %.4f, p_corrupt %.4f", prompt.prompt_id, p_clean, p_corrupt)
    table = pd.DataFrame(rows, columns=["prompt_id", "layer", "offset", "position", "token", "p_restored"])
    prompt_table = pd.DataFrame(info, columns=["prompt_id", "answer_id", "answer", "p_clean", "p_corrupt", "n_noised",
                                               "length"])
    with warnings.catch_warnings():  # offsets no prompt reaches stay NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        heatmap = np.nanmean(grid, axis=0)
    return TraceResult(table, prompt_table, heatmap, offsets, float(sigma))
