"""Shared fixtures: the real stories260K model, tiny random models of every family, workflow runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.helpers import STORIES_DIR, STORIES_GGUF, save_tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def stories_dir(tmp_path_factory) -> Path:
    """stories260K as a Hugging Face folder: from ../shared, else its GGUF from the hub (network)."""
    if (STORIES_DIR / "model.safetensors").is_file():
        return STORIES_DIR
    from layerscope.model.prepare import prepare_model

    try:
        from huggingface_hub import hf_hub_download

        gguf = hf_hub_download(*STORIES_GGUF)
    except Exception as exc:  # pragma: no cover - only without ../shared
        pytest.skip(f"stories260K is neither in {STORIES_DIR} nor downloadable: {exc}")
    out = tmp_path_factory.mktemp("stories") / "stories260K"
    prepare_model({"type": "gguf", "path": gguf}, out)
    return out


@pytest.fixture(scope="session")
def stories(stories_dir):
    from layerscope.model.adapter import load_model, load_tokenizer

    return load_model(stories_dir, dtype="float32"), load_tokenizer(stories_dir)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, stories_dir) -> dict[str, Path]:
    from tests.helpers.tiny_models import tiny_configs

    root = tmp_path_factory.mktemp("tiny")
    return {name: save_tiny_model(name, root / name, stories_dir) for name in tiny_configs()}


