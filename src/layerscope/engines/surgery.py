"""Layer surgery: the loss of the model run with any sequence of its blocks.

Knockout, swap, doubling, transplant and shuffle are all "run the model with this sequence
of blocks": skip block i = ``[0, …, i-1, i+1, …]``, swap i and j = the identity with i and
j exchanged, shuffle = a permutation, repeat = an index twice. :class:`LossEvaluator`
returns the mean next-token loss (nats) on completion tokens — pooled over all positions
that predict a completion token — for any such sequence.

Work is shared wherever the result cannot change:

* **cached prefixes** — a sequence that begins with the original blocks ``0 … k-1`` starts
  from the cached residual ``resid.k`` instead of re-running those blocks (``max_prefix=i``
  caps this when the weights of block ``i`` or later were modified);
* **shared prefixes within a sweep** — the sequences of one :meth:`LossEvaluator.losses`
  call are visited in lexicographic order, depth first, so a prefix common to several of
  them (``[0…i-1, i+1…j-1]`` of the pairwise knockouts ``skip(i, j)``, the unchanged head
  of every local move of a shuffle refiner) is computed once; a :class:`PrefixMemo` keeps
  such states across calls;
* **packed prompts** — when the architecture allows it (no sliding-window attention, an
  attention implementation that takes a prepared 4-D mask), the prompts of a group are
  packed into one row: the token prefix they all share (system message, chat template) is
  stored and computed once, each prompt's own tokens follow it with their original
  positions, and a tree-shaped causal mask lets every prompt see the shared prefix and its
  own tokens only. No padding is computed, and tokens after a prompt's last
  completion-predicting position are dropped (nothing reads them);
* **read-out** only at the positions that predict completion tokens.

Blocks are called directly through the adapter's block runner (no KV cache, each block
keeps its own attention-mask type), so reordering never trips Hugging Face's ``layer_idx``
bookkeeping. Every shortcut is checked against a plain re-run in the tests
(``use_cache=False, share_prefixes=False``, ``layout="padded"``) and against the model's
own forward with its layer list replaced (:func:`naive_losses`).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch

from layerscope import LayerscopeError
from layerscope.data.activations import ActivationCache
from layerscope.engines.sampling import sample_cache_prompts
from layerscope.model.adapter import BlockInputs, ModelAdapter
from layerscope.progress import Progress

log = logging.getLogger(__name__)

LAYOUTS = ("auto", "packed", "padded")


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


def move(order: Sequence[int], p: int, q: int) -> list[int]:
    """``order`` with the element at position p removed and re-inserted at position q."""
    out = list(order)
    out.insert(q, out.pop(p))
    return out


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    k = 0
    while k < n and a[k] == b[k]:
        k += 1
    return k


@dataclass
class _Prompt:
    prompt_id: str
    ids: list[int]  # token ids up to the last completion-predicting position (full sequence in `full_ids`)
    full_ids: list[int]
    row0: int  # cache row of position 0
    target_t: list[int]  # positions that predict completion tokens
    target_ids: list[int]
    target_order: list[int]  # index of each in the evaluator's per-token output


@dataclass
class _Group:
    prompt_ids: list[str]
    ids: torch.Tensor  # [B, T]
    mask: torch.Tensor  # [B, T] padding mask, or [1, 1, T, T] tree mask (packed)
    position_ids: torch.Tensor | None  # [1, T] when packed
    pieces: list[tuple[int, int, int, int]]  # (row, start, cache_lo, cache_hi): state[row, start:…] = resid[lo:hi]
    target_b: torch.Tensor  # row of each completion-predicting position
    target_t: torch.Tensor  # its index in the row
    target_ids: torch.Tensor  # the completion token it predicts
    target_order: np.ndarray  # index of each target in the evaluator's per-token output
    n_positions: int  # real token positions computed per block (no padding)
    inputs: BlockInputs | None = None


class PrefixMemo:
    """Residual states of block-sequence prefixes, kept across :meth:`LossEvaluator.losses` calls.

    Two pools: the prefixes of a *pinned* sequence (a refiner's current order: every local
    move starts from one of them) are kept until another sequence is pinned; any other
    prefix goes to a least-recently-used pool of at most ``capacity`` states (one state is
    one group's [rows, positions, d_model] tensor). A memo belongs to one evaluator and one
    set of weights: make a new one after modifying a block.
    """

    def __init__(self, capacity: int = 64):
        self.capacity = int(capacity)
        self._recent: OrderedDict[tuple[int, tuple[int, ...]], torch.Tensor] = OrderedDict()
        self._pinned: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}
        self._pin: tuple[int, ...] = ()
        self.hits = 0

    def __len__(self) -> int:
        return len(self._recent) + len(self._pinned)

    def _is_pinned(self, prefix: tuple[int, ...]) -> bool:
        return len(prefix) <= len(self._pin) and self._pin[: len(prefix)] == prefix

    def pin(self, sequence: Sequence[int]) -> None:
        """Keep the prefix states of ``sequence`` (those stored now or later) until the next pin."""
        self._pin = tuple(int(i) for i in sequence)
        states = {**self._pinned, **self._recent}
        self._pinned = {k: v for k, v in states.items() if self._is_pinned(k[1])}
        self._recent = OrderedDict((k, v) for k, v in self._recent.items() if not self._is_pinned(k[1]))

    def longest(self, group: int, sequence: Sequence[int], floor: int) -> tuple[int, torch.Tensor | None]:
        """Deepest stored prefix of ``sequence`` longer than ``floor``: (depth, state) or (floor, None)."""
        for depth in range(len(sequence), floor, -1):
            key = (group, tuple(sequence[:depth]))
            state = self._pinned.get(key)
            if state is None:
                state = self._recent.get(key)
                if state is not None:
                    self._recent.move_to_end(key)
            if state is not None:
                self.hits += 1
                return depth, state
        return floor, None

    def put(self, group: int, prefix: Sequence[int], state: torch.Tensor) -> None:
        key = (group, tuple(prefix))
        if self._is_pinned(key[1]):
            self._pinned[key] = state
            return
        self._recent[key] = state
        self._recent.move_to_end(key)
        while len(self._recent) > self.capacity:
            self._recent.popitem(last=False)


def tree_mask(adapter: ModelAdapter, positions: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """The [1, 1, T, T] causal mask of a packed row: token q sees token k when k's original position is
    not later than q's and k is in the shared prefix (segment 0) or in q's own segment. Boolean
    (True = attend) for sdpa, additive float for eager attention."""
    allowed = (positions[None, :] <= positions[:, None]) & ((segments[None, :] == 0) | (segments[None, :] == segments[:, None]))
    if adapter.attention_implementation == "eager":
        mask = torch.zeros(allowed.shape, dtype=adapter.dtype)
        mask.masked_fill_(~allowed, torch.finfo(adapter.dtype).min)
    else:
        mask = allowed
    return mask[None, None]


def capture_packed(adapter: ModelAdapter, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                   device: torch.device) -> tuple[BlockInputs | None, str | None]:
    """Block inputs of one packed row (``positions`` [1, T]), or (None, why) if some block is not handed
    the mask unchanged."""
    if positions.dim() != 2 or positions.shape[0] != 1:
        raise ValueError(f"packed positions must be [1, T], got {list(positions.shape)}")
    mask = mask.to(device)
    inputs = adapter.capture_block_inputs(ids.to(device), mask, position_ids=positions.to(device))
    for i in range(adapter.n_layers):
        if not any(c is mask for c in list(inputs.args[i]) + list(inputs.kwargs[i].values())):
            return None, f"block {i} is not handed the prepared 4-D mask"
    return inputs, None


class LossEvaluator:
    """Mean completion-token loss of the model under any block sequence (see module docstring)."""

    def __init__(self, adapter: ModelAdapter, cache: ActivationCache, *, batch_size: int = 8,
                 device: torch.device | str | None = None, prompt_ids: Sequence[str] | None = None,
                 max_target_tokens: int | None = None, layout: str = "auto"):
        """``prompt_ids`` evaluates only these prompts of the cache (a sample drawn with
        :func:`layerscope.engines.sampling.sample_cache_prompts`; None: all of them);
        ``max_target_tokens`` keeps the first K completion tokens of each prompt (None: all);
        ``batch_size`` prompts form one group (one packed row, or one padded batch);
        ``layout`` is ``auto`` (packed where the architecture allows it), ``packed`` or ``padded``.

        Sweeps start from cached residual states only when the cache holds them in the dtype
        the blocks run in: a bfloat16 cache (the GPU default) under float32 variants would mix
        two numerical paths into every difference, so then every sequence is computed from
        the embeddings (prefixes are still shared within a sweep)."""
        if adapter.unembed is None:
            raise LayerscopeError("layer surgery needs a decoder (its loss is next-token prediction)")
        if cache.n_layers != adapter.n_layers or cache.d_model != adapter.facts.d_model:
            raise LayerscopeError(
                f"activation cache ({cache.n_layers} layers, d={cache.d_model}) does not match the model "
                f"({adapter.n_layers} layers, d={adapter.facts.d_model})"
            )
        if layout not in LAYOUTS:
            raise LayerscopeError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
        if batch_size < 1 or (max_target_tokens is not None and max_target_tokens < 1):
            raise LayerscopeError(f"batch_size ({batch_size}) and max_target_tokens ({max_target_tokens}) must be ≥ 1")
        self.adapter = adapter
        self.cache = cache
        self.device = torch.device(device) if device is not None else adapter.device
        self.n_layers = adapter.n_layers
        self.batch_size = int(batch_size)
        self.blocks_run = 0  # block calls (one group each), for benchmarks
        self.n_evaluated = 0  # sequences evaluated
        tokens = cache.tokens
        if prompt_ids is not None:
            wanted = [str(i) for i in prompt_ids]
            unknown = sorted(set(wanted) - set(tokens["prompt_id"].astype(str)))
            if unknown or not wanted:
                raise LayerscopeError(f"{cache.directory}: no such prompts in the cache: {unknown or 'none asked'}")
            tokens = tokens[tokens["prompt_id"].astype(str).isin(wanted)]
        if max_target_tokens is not None:
            nth = tokens[tokens["is_target"]].groupby("prompt_id", sort=False)["position"].rank(method="first")
            late = nth.index[nth > int(max_target_tokens)]
            tokens = tokens.copy()
            tokens.loc[late, "is_target"] = False
        compute_dtype = next(adapter.model.parameters()).dtype
        stored = str(cache.metadata.get("storage_dtype", "float32"))
        self.cache_matches = stored == str(compute_dtype).removeprefix("torch.")
        if not self.cache_matches:
            log.info("cache stored in %s, blocks run in %s: sweeps start from the embeddings", stored, compute_dtype)
        if not tokens["is_target"].any():
            raise LayerscopeError(f"{cache.directory}: no completion tokens to evaluate a loss on")
        target_rank = np.full(cache.n_tokens, -1)
        target_rows = tokens.loc[tokens["is_target"], "row"].to_numpy()
        self.target_rows = target_rows  # cache rows of the evaluated tokens, in per-token output order
        target_rank[target_rows] = np.arange(len(target_rows))
        self.n_targets = len(target_rows)

        self.prompts: list[_Prompt] = []
        for prompt_id, g in tokens.groupby("prompt_id", sort=False):
            g = g.sort_values("position")
            targets = g[g["is_target"]]
            if targets.empty:
                continue
            if not (g["position"].to_numpy() == np.arange(len(g))).all():
                raise LayerscopeError(f"{cache.directory}: prompt {prompt_id!r} has non-contiguous positions")
            full = g["token_id"].astype(int).tolist()
            last = int(targets["position"].max())
            self.prompts.append(_Prompt(
                str(prompt_id), full[: last + 1], full, int(g["row"].iloc[0]), targets["position"].astype(int).tolist(),
                targets["target_id"].astype(int).tolist(), target_rank[targets["row"].to_numpy()].tolist(),
            ))
        max_length = max(len(p.ids) for p in self.prompts)
        problem = adapter.packing_problem(max_length)
        if layout == "packed" and problem:
            raise LayerscopeError(f"cannot pack prompts for {adapter.facts.model_type}: {problem}")
        self.layout = "padded" if layout == "padded" or problem else "packed"
        self.groups = self._packed_groups() if self.layout == "packed" else self._padded_groups()
        if self.layout == "packed":
            problem = self._check_packing(self.groups[0])
            if problem:
                if layout == "packed":
                    raise LayerscopeError(f"cannot pack prompts for {adapter.facts.model_type}: {problem}")
                log.info("packing unavailable (%s): padded batches", problem)
                self.layout = "padded"
                self.groups = self._padded_groups()
        elif problem and layout == "auto":
            log.info("packing unavailable (%s): padded batches", problem)

    def provenance(self) -> dict:
        """What the losses are computed on, for a summary: prompts, completion tokens, layout."""
        return {"n_prompts": len(self.prompts), "n_tokens": int(self.n_targets), "layout": self.layout}

    def per_prompt(self, per_token: np.ndarray) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Per-prompt sums and token counts of a per-token array (the ``per_token=True`` output).

        Returns (prompt ids, sums, counts) in the evaluator's prompt order; the token-weighted
        mean over prompts, Σ sums / Σ counts, is the pooled loss :meth:`losses` reports.
        """
        per_token = np.asarray(per_token, dtype=float)
        ids = [p.prompt_id for p in self.prompts]
        sums = np.array([per_token[p.target_order].sum() for p in self.prompts])
        counts = np.array([len(p.target_order) for p in self.prompts], dtype=float)
        return ids, sums, counts

    # ------------------------------------------------------------------ layouts

    def _padded_groups(self) -> list[_Group]:
        prompts = sorted(self.prompts, key=lambda p: (-len(p.ids), p.row0))  # similar lengths together
        groups = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start : start + self.batch_size]
            width = max(len(p.ids) for p in chunk)
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            tb, tt, tid, order, pieces = [], [], [], [], []
            for b, p in enumerate(chunk):
                n = len(p.ids)
                ids[b, :n] = torch.tensor(p.ids)
                mask[b, :n] = 1
                pieces.append((b, 0, p.row0, p.row0 + n))
                tb += [b] * len(p.target_t)
                tt += p.target_t
                tid += p.target_ids
                order += p.target_order
            groups.append(_Group([p.prompt_id for p in chunk], ids, mask, None, pieces, torch.tensor(tb),
                                 torch.tensor(tt), torch.tensor(tid), np.asarray(order),
                                 sum(len(p.ids) for p in chunk)))
        return groups

    def _packed_groups(self) -> list[_Group]:
        # prompts sorted by their tokens: those sharing the longest prefixes are packed together
        prompts = sorted(self.prompts, key=lambda p: (p.ids, p.row0))
        groups = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start : start + self.batch_size]
            shared = len(chunk[0].ids)
            for p in chunk[1:]:
                shared = min(shared, _common_prefix(chunk[0].ids, p.ids))
            ids = list(chunk[0].ids[:shared])
            positions = list(range(shared))
            segment = [0] * shared
            pieces = [(0, 0, chunk[0].row0, chunk[0].row0 + shared)]
            tt, tid, order = [], [], []
            for k, p in enumerate(chunk, start=1):
                offset = len(ids)
                ids += p.ids[shared:]
                positions += range(shared, len(p.ids))
                segment += [k] * (len(p.ids) - shared)
                if len(p.ids) > shared:
                    pieces.append((0, offset, p.row0 + shared, p.row0 + len(p.ids)))
                tt += [t if t < shared else offset + t - shared for t in p.target_t]
                tid += p.target_ids
                order += p.target_order
            pos = torch.tensor(positions)
            mask = tree_mask(self.adapter, pos, torch.tensor(segment))
            groups.append(_Group([p.prompt_id for p in chunk], torch.tensor([ids]), mask, pos[None],
                                 pieces, torch.zeros(len(tt), dtype=torch.long), torch.tensor(tt), torch.tensor(tid),
                                 np.asarray(order), len(ids)))
        return groups

    def _check_packing(self, group: _Group) -> str | None:
        """The model must hand every block our tree mask unchanged (else packing would be wrong)."""
        inputs, problem = capture_packed(self.adapter, group.ids, group.mask, group.position_ids, self.device)
        group.inputs = inputs
        return problem

    # ------------------------------------------------------------------ internals

    def _inputs(self, group: _Group) -> BlockInputs:
        if group.inputs is None:
            position_ids = group.position_ids.to(self.device) if group.position_ids is not None else None
            group.inputs = self.adapter.capture_block_inputs(group.ids.to(self.device), group.mask.to(self.device),
                                                             position_ids=position_ids)
        return group.inputs

    def _cached_state(self, group: _Group, layer: int) -> torch.Tensor:
        """resid.{layer} of the group's tokens, laid out like the group (zeros at padding)."""
        state = torch.zeros((*group.ids.shape, self.adapter.facts.d_model), dtype=self.adapter.dtype)
        for row, start, lo, hi in group.pieces:
            state[row, start : start + hi - lo] = self.cache.resid(layer, slice(lo, hi), dtype=self.adapter.dtype)
        return state.to(self.device)

    def _nll(self, group: _Group, hidden: torch.Tensor) -> torch.Tensor:
        picked = hidden[group.target_b.to(self.device), group.target_t.to(self.device)]
        logits = self.adapter.readout(picked).float()
        logp = torch.log_softmax(logits, dim=-1)
        return -logp.gather(1, group.target_ids.to(self.device)[:, None]).squeeze(1)

    @property
    def positions_per_block(self) -> int:
        """Token positions one block call computes, summed over the groups (padding excluded)."""
        return sum(g.n_positions for g in self.groups)

    # ------------------------------------------------------------------ public API

    @torch.no_grad()
    def losses(self, sequences: Iterable[Sequence[int]], *, per_token: bool = False,
               max_prefix: int | None = None, use_cache: bool = True, share_prefixes: bool = True,
               memo: PrefixMemo | None = None, progress: str | None = None) -> list:
        """Loss of each block sequence (mean NLL in nats; per-token arrays with ``per_token``).

        ``max_prefix`` caps how many cached layers a sequence may start from (set it to i when
        the weights of block i or later were changed); ``use_cache=False`` never starts from the
        activation cache; ``share_prefixes=False`` computes every sequence on its own (with
        ``use_cache=False``: the plain reference computation); ``memo`` keeps prefix states
        across calls (see :class:`PrefixMemo`); ``progress`` (a label) logs the sweep's progress in
        sequences (:mod:`layerscope.progress`): the groups of prompts are the outer loop, so each
        finished (group, sequence) counts 1/n_groups of a sequence.
        """
        sequences = [list(map(int, s)) for s in sequences]
        for seq in sequences:
            bad = [i for i in seq if not 0 <= i < self.n_layers]
            if bad:
                raise ValueError(f"block indices {bad} outside 0…{self.n_layers - 1}")
        cap = self.n_layers if max_prefix is None else max(0, min(int(max_prefix), self.n_layers))
        use_cache = use_cache and self.cache_matches
        starts = [min(cached_prefix(s, self.n_layers), cap) if use_cache else 0 for s in sequences]
        visit = sorted(range(len(sequences)), key=lambda i: sequences[i]) if share_prefixes else range(len(sequences))
        per_seq = [np.zeros(self.n_targets) for _ in sequences]
        bar = Progress(progress, len(sequences), unit="sequences") if progress else None
        for g, group in enumerate(self.groups):
            inputs = self._inputs(group)
            path: list[int] = []  # the sequence whose prefix states are on the stack
            stack: dict[int, torch.Tensor] = {0: inputs.resid0}  # depth -> state after path[:depth]
            for k, index in enumerate(visit):
                seq = sequences[index]
                common = _common_prefix(path, seq) if share_prefixes else 0
                for depth in [d for d in stack if d > common]:
                    del stack[depth]
                depth = max(stack)
                state = stack[depth]
                if memo is not None:
                    found, memo_state = memo.longest(g, seq, depth)
                    if memo_state is not None:
                        depth, state = found, memo_state
                if starts[index] > depth:
                    depth, state = starts[index], self._cached_state(group, starts[index])
                if share_prefixes:
                    stack[depth] = state
                for t in range(depth, len(seq)):
                    state = self.adapter.run_block(seq[t], state, inputs)
                    self.blocks_run += 1
                    if share_prefixes:
                        stack[t + 1] = state
                    if memo is not None:
                        memo.put(g, seq[: t + 1], state)
                path = seq
                per_seq[index][group.target_order] = self._nll(group, state).double().cpu().numpy()
                if bar:
                    bar.set((g * len(sequences) + k + 1) / len(self.groups))
        if bar:
            bar.close()
        self.n_evaluated += len(sequences)
        return per_seq if per_token else [float(x.mean()) for x in per_seq]

    def loss(self, sequence: Sequence[int], **kwargs):
        return self.losses([sequence], **kwargs)[0]

    def baseline(self, **kwargs) -> float:
        """Loss of the unmodified model (identity sequence: read out from the cached resid.L)."""
        return self.loss(list(range(self.n_layers)), **kwargs)


# ---------------------------------------------------------------------------- the naive reference


@torch.no_grad()
def naive_losses(evaluator: LossEvaluator, sequences: Iterable[Sequence[int]], *,
                 batch_size: int | None = None) -> list[float]:
    """The naive sweep: for every sequence, the model's own forward with its layer list
    replaced, on the evaluator's prompts (full stored sequences, right-padded batches of
    similar length), logits and log-softmax at every position, loss on the completion tokens.

    Nothing is shared between sequences; this is the baseline the benchmark compares the
    engine with, and a second, independent computation of the same numbers.
    """
    adapter = evaluator.adapter
    batch_size = batch_size or evaluator.batch_size
    prompts = sorted(evaluator.prompts, key=lambda p: (-len(p.full_ids), p.row0))
    out = []
    for sequence in sequences:
        nll = np.zeros(evaluator.n_targets)
        with adapter.replaced_blocks(list(sequence)):
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start : start + batch_size]
                width = max(len(p.full_ids) for p in chunk)
                ids = torch.zeros((len(chunk), width), dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for b, p in enumerate(chunk):
                    ids[b, : len(p.full_ids)] = torch.tensor(p.full_ids)
                    mask[b, : len(p.full_ids)] = 1
                logits = adapter.model(input_ids=ids.to(evaluator.device), attention_mask=mask.to(evaluator.device),
                                       use_cache=False).logits
                logp = torch.log_softmax(logits.float(), dim=-1)
                for b, p in enumerate(chunk):
                    picked = logp[b, torch.tensor(p.target_t), torch.tensor(p.target_ids)]
                    nll[p.target_order] = -picked.double().cpu().numpy()
        out.append(float(nll.mean()))
    return out


# ---------------------------------------------------------------------------- the surgery experiments' evaluator

# the parameters every surgery experiment (knockout, swap, shuffle) takes for its evaluator
SURGERY_PARAMS = {
    "batch_size": {
        "description": "Prompts per group: one packed row (shared prefix computed once) or one padded batch.",
        "type": "integer",
        "minimum": 1,
        "default": 8
    },
    "layout": {
        "description": "packed: prompts of a group in one row with a tree-shaped causal mask (shared prefix once, "
                       "no padding); padded: right-padded batches; auto: packed where the architecture allows it "
                       "(no sliding-window attention, sdpa or eager attention).",
        "enum": ["auto", "packed", "padded"],
        "default": "auto"
    },
    "max_target_tokens": {
        "description": "Completion tokens per prompt the loss is evaluated on: the first K (null: all). "
                       "Tokens after them are not run, so this bounds the cost of every variant.",
        "type": ["integer", "null"],
        "minimum": 1,
        "default": None
    },
    "dtype": {
        "description": "Compute dtype of the model for the surgery runs (auto: bfloat16 on GPU, float32 on CPU).",
        "enum": ["float32", "bfloat16", "float16", "auto"],
        "default": "float32"
    },
}


def surgery_evaluator(model_dir, resid_path, *, params: dict, device="cpu") -> LossEvaluator:
    """The loss evaluator every surgery experiment runs on (model in ``params['dtype']``, cache beside resid)."""
    from pathlib import Path

    from layerscope.model.adapter import load_model

    adapter = load_model(model_dir, dtype=params["dtype"], device=device, kind="decoder")
    cache = ActivationCache(Path(resid_path).parent)
    prompt_ids, sample = sample_cache_prompts(cache.tokens, params["max_prompts"], seed=params.get("seed", 0))
    evaluator = LossEvaluator(adapter, cache, batch_size=params["batch_size"], device=device,
                              prompt_ids=prompt_ids, max_target_tokens=params.get("max_target_tokens"),
                              layout=params["layout"])
    evaluator.sample = sample  # prompt_ids, prompt_categories, n_empty_completions: for the summary
    log.info("surgery on %d prompts (%d completion tokens), %s layout, %d positions per block call",
             len(evaluator.prompts), evaluator.n_targets, evaluator.layout, evaluator.positions_per_block)
    return evaluator
