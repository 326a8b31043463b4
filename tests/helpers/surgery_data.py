"""Real text for the surgery tests: greedy stories260K completions and their activation cache."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from layerscope.data.activations import ActivationCache, extract_activations, sequences_from_completions
from layerscope.model.generate import generate_completions
from layerscope.data.prompts import Prompt, PromptSet

STORY_PROMPTS = (
    "Once upon a time, there was a little girl named Lily. She loved to",
    "Tom and Sue went to the park. They saw a big",
    "One day, a little bird was sitting in a tree. The bird",
    "The dog ran to the door because",
    "Mom gave Ben a red ball. Ben was very",
    "There was a big cat who liked to sleep in the sun. One day",
)


def story_cache(adapter, tokenizer, folder: Path, *, n_prompts: int = 6, max_new_tokens: int = 24,
                batch_size: int = 3) -> tuple[ActivationCache, pd.DataFrame]:
    """Greedy completions of story prompts (no chat template) and their activation cache in ``folder``."""
    prompts = PromptSet("stories", tuple(Prompt(f"story-{i}", "story" if i % 2 else "park", text)
                                         for i, text in enumerate(STORY_PROMPTS[:n_prompts])))
    completions = generate_completions(adapter, tokenizer, prompts, model_dir=folder, max_new_tokens=max_new_tokens,
                                       batch_size=batch_size, system_prompt=None, chat_template=False)
    folder.mkdir(parents=True, exist_ok=True)
    extract_activations(adapter, tokenizer, sequences_from_completions(completions), folder / "resid.safetensors",
                        folder / "tokens.parquet", batch_size=batch_size)
    return ActivationCache(folder), completions
