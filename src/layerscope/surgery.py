"""Layer surgery: the loss of the model run with any sequence of its blocks.

Knockout, swap, doubling, transplant and shuffle are all "run the model with this sequence
of blocks": skip block i = ``[0, …, i-1, i+1, …]``, swap i and j = the identity with i and
j exchanged, shuffle = a permutation, repeat = an index twice. :class:`LossEvaluator`
returns the mean next-token loss (nats) on completion tokens — pooled over all positions
that predict a completion token — for any such sequence.

Sequences that begin with the original blocks ``0 … k-1`` start from the cached residual
``resid.k`` instead of re-running those blocks; :meth:`LossEvaluator.losses` groups a
sweep by that shared prefix so each cached layer is read once per batch. A variant whose
weights differ from block ``i`` on (quantization, for instance) passes ``max_prefix=i``.

Blocks are called directly through the adapter's block runner (no KV cache, each block
keeps its own attention-mask type), so reordering never trips Hugging Face's ``layer_idx``
bookkeeping. Only the positions that predict completion tokens are read out.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch

from . import LayerscopeError
from .activations import ActivationCache
from .adapter import BlockInputs, ModelAdapter

log = logging.getLogger(__name__)


def cached_prefix(sequence: Sequence[int], n_layers: int) -> int:
    """Length k of the longest prefix of ``sequence`` equal to ``0 … k-1`` (at most n_layers)."""
    k = 0
    while k < len(sequence) and k < n_layers and sequence[k] == k:
        k += 1
    return k


def skip(n_layers: int, *blocks: int) -> list[int]:
    """The identity sequence without the given blocks."""
    drop = set(blocks)
    return [i for i in range(n_layers) if i not in drop]


def swap(n_layers: int, i: int, j: int) -> list[int]:
    """The identity sequence with blocks i and j exchanged."""
    seq = list(range(n_layers))
    seq[i], seq[j] = seq[j], seq[i]
    return seq


@dataclass
class _Batch:
    prompt_ids: list[str]
    ids: torch.Tensor  # [B, T] right-padded
    mask: torch.Tensor  # [B, T]
    rows: list[tuple[int, int]]  # cache rows [start, end) of each sequence
    target_b: torch.Tensor  # batch index of each completion-predicting position
    target_t: torch.Tensor  # position of each
    target_ids: torch.Tensor  # the completion token it predicts
    target_order: np.ndarray  # index of each target in the cache's target-row order
    inputs: BlockInputs | None = None


class LossEvaluator:
    """Mean completion-token loss of the model under any block sequence (see module docstring)."""

    def __init__(self, adapter: ModelAdapter, cache: ActivationCache, *, batch_size: int = 8,
                 device: torch.device | str | None = None, max_prompts: int | None = None):
        """``max_prompts`` evaluates only the cache's first N prompts (sweeps on a budget)."""
        if adapter.unembed is None:
            raise LayerscopeError("layer surgery needs a decoder (its loss is next-token prediction)")
        if cache.n_layers != adapter.n_layers or cache.d_model != adapter.facts.d_model:
            raise LayerscopeError(
                f"activation cache ({cache.n_layers} layers, d={cache.d_model}) does not match the model "
                f"({adapter.n_layers} layers, d={adapter.facts.d_model})"
            )
        self.adapter = adapter
        self.cache = cache
        self.device = torch.device(device) if device is not None else adapter.device
        self.n_layers = adapter.n_layers
        tokens = cache.tokens
        if max_prompts is not None:
            keep = list(dict.fromkeys(tokens["prompt_id"]))[: int(max_prompts)]
            tokens = tokens[tokens["prompt_id"].isin(keep)]
        if not tokens["is_target"].any():
            raise LayerscopeError(f"{cache.directory}: no completion tokens to evaluate a loss on")
        target_rank = np.full(cache.n_tokens, -1)
        target_rows = tokens.loc[tokens["is_target"], "row"].to_numpy()
        self.target_rows = target_rows  # cache rows of the evaluated tokens, in per-token output order
        target_rank[target_rows] = np.arange(len(target_rows))
        self.n_targets = len(target_rows)

        groups = [g for _, g in tokens.groupby("prompt_id", sort=False) if g["is_target"].any()]
        groups.sort(key=lambda g: (-len(g), int(g["row"].iloc[0])))  # similar lengths together
        pad_id = 0
        self.batches: list[_Batch] = []
        for start in range(0, len(groups), batch_size):
            chunk = groups[start : start + batch_size]
            width = max(len(g) for g in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            tb, tt, tid, order, rows = [], [], [], [], []
            for b, g in enumerate(chunk):
                g = g.sort_values("position")
                n = len(g)
                ids[b, :n] = torch.tensor(g["token_id"].to_numpy())
                mask[b, :n] = 1
                rows.append((int(g["row"].iloc[0]), int(g["row"].iloc[-1]) + 1))
                targets = g[g["is_target"]]
                tb += [b] * len(targets)
                tt += targets["position"].tolist()
                tid += targets["target_id"].tolist()
                order += target_rank[targets["row"].to_numpy()].tolist()
            self.batches.append(_Batch(
                [str(g["prompt_id"].iloc[0]) for g in chunk], ids, mask, rows,
                torch.tensor(tb), torch.tensor(tt), torch.tensor(tid), np.asarray(order),
            ))

    # ------------------------------------------------------------------ internals

    def _inputs(self, batch: _Batch) -> BlockInputs:
        if batch.inputs is None:
            batch.inputs = self.adapter.capture_block_inputs(batch.ids.to(self.device), batch.mask.to(self.device))
        return batch.inputs

    def _cached_state(self, batch: _Batch, layer: int) -> torch.Tensor:
        """resid.{layer} of the batch's sequences, padded like the batch."""
        state = torch.zeros((*batch.ids.shape, self.adapter.facts.d_model), dtype=self.adapter.dtype)
        for b, (lo, hi) in enumerate(batch.rows):
            state[b, : hi - lo] = self.cache.resid(layer, slice(lo, hi), dtype=self.adapter.dtype)
        return state.to(self.device)

    def _nll(self, batch: _Batch, hidden: torch.Tensor) -> torch.Tensor:
        picked = hidden[batch.target_b.to(self.device), batch.target_t.to(self.device)]
        logits = self.adapter.readout(picked).float()
        logp = torch.log_softmax(logits, dim=-1)
        return -logp.gather(1, batch.target_ids.to(self.device)[:, None]).squeeze(1)

    # ------------------------------------------------------------------ public API

    @torch.no_grad()
    def losses(self, sequences: Iterable[Sequence[int]], *, per_token: bool = False,
               max_prefix: int | None = None, use_cache: bool = True) -> list:
        """Loss of each block sequence (mean NLL in nats; per-token arrays with ``per_token``).

        ``max_prefix`` caps how many cached layers a sequence may start from (set it to i when
        the weights of block i or later were changed); ``use_cache=False`` re-runs every block
        from the embeddings (the reference computation).
        """
        sequences = [list(map(int, s)) for s in sequences]
        for seq in sequences:
            bad = [i for i in seq if not 0 <= i < self.n_layers]
            if bad:
                raise ValueError(f"block indices {bad} outside 0…{self.n_layers - 1}")
        cap = self.n_layers if max_prefix is None else max(0, min(int(max_prefix), self.n_layers))
        starts = [min(cached_prefix(s, self.n_layers), cap) if use_cache else 0 for s in sequences]
        per_seq = [np.zeros(self.n_targets) for _ in sequences]
        by_start: dict[int, list[int]] = {}
        for index, k in enumerate(starts):
            by_start.setdefault(k, []).append(index)
        for batch in self.batches:
            inputs = self._inputs(batch)
            for k in sorted(by_start):
                state = inputs.resid0 if k == 0 else self._cached_state(batch, k)
                for index in by_start[k]:
                    hidden = self.adapter.run_blocks(state, sequences[index][k:], inputs)
                    per_seq[index][batch.target_order] = self._nll(batch, hidden).double().cpu().numpy()
        return per_seq if per_token else [float(x.mean()) for x in per_seq]

    def loss(self, sequence: Sequence[int], **kwargs):
        return self.losses([sequence], **kwargs)[0]

    def baseline(self, **kwargs) -> float:
        """Loss of the unmodified model (identity sequence: read out from the cached resid.L)."""
        return self.loss(list(range(self.n_layers)), **kwargs)
