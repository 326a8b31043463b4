"""The paired zh/en prompts of an activation cache: their token rows and pooled states.

Every z_subspace analysis of activations reads the cache through :class:`PairedStates`:
the pairs come from the prompt file (validated: one ``zh`` and one ``en`` prompt per pair,
the same answer), restricted to the prompts present in the cache, and each prompt's
states are those of its **problem text** — the tokens whose role is ``prompt``, without the
system message, the chat-template tokens or the completion. Mean pooling averages over
exactly these tokens; token clouds (ARD-MMD, optimal transport) are exactly these tokens.

A subset of the pairs (``max_pairs``) is a seeded sample stratified by category
(:func:`layerscope.engines.sampling.stratified_sample` on the pair ids), never the first N of
the file; :attr:`PairedStates.sample` is the summary fragment that lists it (``prompt_ids``
are pair ids, ``prompt_categories`` counts pairs per category).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from layerscope import LayerscopeError
from layerscope.data.activations import ActivationCache
from layerscope.data.prompts import PromptPair, load_prompt_set, zh_en_pairs
from layerscope.engines.sampling import sample_summary, stratified_sample

POOLINGS = {"mean": "mean over the problem-text tokens", "last": "the last problem-text token"}
POOLED_ROLE = "prompt"
POOLING = "mean over the tokens of the problem text (role 'prompt': no system, template or completion tokens)"


@dataclass
class PairedStates:
    cache: ActivationCache
    pairs: list[PromptPair]
    rows: dict[str, np.ndarray]  # prompt id -> cache rows of its problem-text tokens, in position order
    sample: dict = field(default_factory=dict)  # prompt_ids (pair ids), prompt_categories, n_pairs_available

    @classmethod
    def open(cls, cache_dir: str | Path, prompt_file: str | Path, *, max_pairs: int | None = None,
             seed: int = 0) -> "PairedStates":
        """The pairs of the cache; with ``max_pairs``, a seeded category-stratified sample of them."""
        cache = ActivationCache(cache_dir)
        tokens = cache.tokens
        ids = list(dict.fromkeys(tokens["prompt_id"]))
        every = zh_en_pairs(load_prompt_set(prompt_file), ids=ids)
        pair_ids = [p.pair for p in every]
        categories = [p.category for p in every]
        chosen = set(stratified_sample(pair_ids, categories, None if max_pairs is None else int(max_pairs), seed=seed))
        pairs = [p for p in every if p.pair in chosen]  # file order
        sample = {**sample_summary(pair_ids, categories, [p.pair for p in pairs]), "n_pairs_available": len(every)}
        pooled = tokens[tokens["role"] == POOLED_ROLE].sort_values(["prompt_id", "position"])
        by_prompt = {pid: g["row"].to_numpy() for pid, g in pooled.groupby("prompt_id", sort=False)}
        rows = {}
        for pair in pairs:
            for p in (pair.zh, pair.en):
                r = by_prompt.get(p.id)
                if r is None or len(r) == 0:
                    raise LayerscopeError(f"{cache.directory}: prompt {p.id!r} has no problem-text tokens in the cache")
                rows[p.id] = r
        return cls(cache, pairs, rows, sample)

    @property
    def n_pairs(self) -> int:
        return len(self.pairs)

    def layer_states(self, layer: int) -> dict[str, torch.Tensor]:
        """Problem-text states of every prompt at resid.{layer}, float64, by prompt id."""
        ids = list(self.rows)
        block = self.cache.resid(layer, rows=np.concatenate([self.rows[i] for i in ids]), dtype=torch.float64)
        parts = torch.split(block, [len(self.rows[i]) for i in ids])
        return dict(zip(ids, parts))

    def clouds(self, layer: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(zh tokens [n_i, d], en tokens [m_i, d]) per pair at resid.{layer}."""
        states = self.layer_states(layer)
        return [(states[p.zh.id], states[p.en.id]) for p in self.pairs]

    def pooled(self, layer: int, pooling: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled states (zh [N, d], en [N, d]) at resid.{layer}, float64: ``mean`` over each prompt's
        problem-text tokens, or ``last``, the state of its last problem-text token."""
        if pooling not in POOLINGS:
            raise LayerscopeError(f"unknown pooling {pooling!r}; known: {list(POOLINGS)}")
        states = self.layer_states(layer)
        pick = (lambda x: x.mean(dim=0)) if pooling == "mean" else (lambda x: x[-1])
        zh = torch.stack([pick(states[p.zh.id]) for p in self.pairs])
        en = torch.stack([pick(states[p.en.id]) for p in self.pairs])
        return zh, en

    def pooled_all_layers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean-pooled states at every boundary: (zh, en), each [L + 1, N, d] float64."""
        zh, en = zip(*(self.pooled(layer) for layer in range(self.cache.n_layers + 1)))
        return torch.stack(zh), torch.stack(en)

    def prompt_ids(self, prompt_id: str) -> list[int]:
        """The token ids the model was given for a prompt (system, template, problem text), from the cache."""
        tokens = self.cache.tokens
        seq = tokens[(tokens["prompt_id"] == prompt_id) & (tokens["role"] != "completion")].sort_values("position")
        return [int(t) for t in seq["token_id"]]

    def positions(self, prompt_id: str) -> np.ndarray:
        """Positions (within the prompt's sequence) of its problem-text tokens."""
        tokens = self.cache.tokens
        sel = tokens[(tokens["prompt_id"] == prompt_id) & (tokens["role"] == POOLED_ROLE)].sort_values("position")
        return np.array(sel["position"].to_numpy(), dtype=np.int64)

    def cached_completion(self, prompt_id: str) -> list[int]:
        tokens = self.cache.tokens
        seq = tokens[(tokens["prompt_id"] == prompt_id) & (tokens["role"] == "completion")].sort_values("position")
        return [int(t) for t in seq["token_id"]]
