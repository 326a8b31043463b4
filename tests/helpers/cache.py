"""Activation caches for the geometry tests: a real one of stories260K, and synthetic ones with planted structure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file

from layerscope.data.activations import ActivationCache, TokenSequence, extract_activations, sequences_from_completions
from layerscope.model.generate import generate_completions
from layerscope.data.prompts import Prompt, PromptSet

PROMPTS = PromptSet("geo", (
    Prompt("a1", "story", "Once upon a time, there was a little girl"),
    Prompt("a2", "story", "Tom had a big red ball. He"),
    Prompt("b1", "animals", "The dog ran to"),
    Prompt("b2", "animals", "A cat sat on the mat and"),
    Prompt("c1", "park", "One day, a bird flew to the park."),
))


def random_token_cache(adapter, tokenizer, folder: Path, *, n: int, first_length: int, step: int, seed: int = 0):
    """A cache of n random token sequences of lengths first_length + step·i: a template token, then the
    first half marked prompt and the second half completion. Returns (cache, sequences)."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for i in range(n):
        length = first_length + step * i
        ids = [1] + torch.randint(3, adapter.facts.vocab_size, (length - 1,), generator=g).tolist()
        roles = ["template"] + ["prompt"] * (length // 2 - 1) + ["completion"] * (length - length // 2)
        seqs.append(TokenSequence(f"s{i}", "c", ids, roles))
    extract_activations(adapter, tokenizer, seqs, folder / "resid.safetensors", folder / "tokens.parquet", batch_size=2)
    return ActivationCache(folder), seqs


def stories_cache(adapter, tokenizer, stories_dir, folder: Path) -> ActivationCache:
    """Greedy completions of five prompts by stories260K and their activation cache."""
    frame = generate_completions(adapter, tokenizer, PROMPTS, model_dir=stories_dir, max_new_tokens=12,
                                 batch_size=3, system_prompt=None, chat_template="auto")
    extract_activations(adapter, tokenizer, sequences_from_completions(frame), folder / "resid.safetensors",
                        folder / "tokens.parquet", batch_size=2)
    return ActivationCache(folder)


def synthetic_cache(folder: Path, layers: list[np.ndarray], *, prompt_ids: list[str], categories: list[str],
                    roles: list[str] | None = None) -> ActivationCache:
    """A cache with the given residuals (one [n_tokens, d] array per site) and one row per token.

    ``prompt_ids`` / ``categories`` give each token's prompt and category; positions count
    up within a prompt; roles default to 'prompt'.
    """
    folder.mkdir(parents=True, exist_ok=True)
    n, d = layers[0].shape
    tensors = {f"resid.{i}": torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32) for i, x in enumerate(layers)}
    save_file(tensors, str(folder / "resid.safetensors"),
              metadata={"n_layers": str(len(layers) - 1), "d_model": str(d), "n_tokens": str(n)})
    positions, seen = [], {}
    for p in prompt_ids:
        positions.append(seen.get(p, 0))
        seen[p] = positions[-1] + 1
    frame = pd.DataFrame({
        "row": np.arange(n, dtype=np.int64), "prompt_id": prompt_ids, "category": categories,
        "position": np.array(positions, dtype=np.int32), "token_id": np.arange(n, dtype=np.int64) % 97,
        "token": [f"t{i}" for i in range(n)], "role": roles or ["prompt"] * n, "is_target": False,
        "target_id": -1, "target_index": -1,
    })
    frame.to_parquet(folder / "tokens.parquet", index=False)
    return ActivationCache(folder)
