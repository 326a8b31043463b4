"""The activation cache against the model's own hidden states, token ids and atomic writes."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from layerscope.data.activations import (
    ActivationCache, extract_activations, sequences_from_completions, sequences_from_prompts,
)
from layerscope.model.adapter import load_model, load_tokenizer
from layerscope.model.generate import generate_completions
from layerscope.data.prompts import Prompt, PromptSet

PROMPTS = PromptSet("t", (
    Prompt("a", "story", "Once upon a time, there was a little girl"),
    Prompt("b", "animals", "The dog ran to"),
    Prompt("c", "story", "Tom had a big red ball. He"),
    Prompt("d", "animals", "A cat"),
))


@pytest.fixture(scope="module")
def stories_cache(stories, stories_dir, tmp_path_factory):
    adapter, tok = stories
    frame = generate_completions(adapter, tok, PROMPTS, model_dir=stories_dir, max_new_tokens=10, batch_size=2,
                                 system_prompt=None, chat_template="auto")
    out = tmp_path_factory.mktemp("cache")
    meta = extract_activations(adapter, tok, sequences_from_completions(frame), out / "resid.safetensors",
                               out / "tokens.parquet", batch_size=3, metadata={"model": "stories"})
    return frame, ActivationCache(out), meta


def test_cache_equals_the_models_hidden_states(stories, stories_cache):
    adapter, _ = stories
    frame, cache, _ = stories_cache
    tokens = cache.tokens
    for row in frame.itertuples():
        ids = list(row.prompt_ids) + list(row.completion_ids)
        rows = tokens.loc[tokens["prompt_id"] == row.prompt_id, "row"].to_numpy()
        with torch.no_grad():
            out = adapter.model(torch.tensor([ids]), output_hidden_states=True)
        for layer in range(adapter.n_layers):
            torch.testing.assert_close(cache.resid(layer, rows), out.hidden_states[layer][0], rtol=1e-5, atol=1e-5)
        last = cache.resid(adapter.n_layers, rows)
        # resid.L is taken before the final norm; HF's last hidden state is after it
        torch.testing.assert_close(adapter.final_norm(last), out.hidden_states[-1][0], rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            torch.testing.assert_close(adapter.readout(last), out.logits[0], rtol=1e-5, atol=1e-4)


def test_token_ids_equal_the_completions(stories_cache):
    frame, cache, _ = stories_cache
    tokens = cache.tokens
    assert len(tokens) == cache.n_tokens == sum(frame["n_prompt_tokens"] + frame["n_completion_tokens"])
    assert tokens["row"].tolist() == list(range(len(tokens)))
    for row in frame.itertuples():
        mine = tokens[tokens["prompt_id"] == row.prompt_id]
        assert mine["token_id"].tolist() == list(row.prompt_ids) + list(row.completion_ids)
        assert (mine["role"] == "completion").sum() == row.n_completion_tokens
        targets = mine[mine["is_target"]]
        assert targets["target_id"].tolist() == list(row.completion_ids)
        assert targets["target_index"].tolist() == list(range(row.n_completion_tokens))
        assert targets["position"].iloc[0] == row.n_prompt_tokens - 1  # t-1 predicts the token at t


def test_file_is_valid_safetensors_with_provenance(stories, stories_cache):
    adapter, _ = stories
    _, cache, meta = stories_cache
    path = cache.directory / "resid.safetensors"
    tensors = load_file(path)
    assert sorted(tensors, key=lambda s: int(s.split(".")[1])) == [f"resid.{i}" for i in range(adapter.n_layers + 1)]
    assert all(t.shape == (cache.n_tokens, 64) and t.dtype == torch.float32 for t in tensors.values())
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    for key in ("model", "layerscope_version", "storage_dtype", "n_layers", "sites"):
        assert key in metadata
    assert metadata["model"] == "stories" and meta["n_tokens"] == cache.n_tokens


def test_float16_storage(stories, stories_cache, tmp_path):
    adapter, tok = stories
    frame, cache, _ = stories_cache
    extract_activations(adapter, tok, sequences_from_completions(frame), tmp_path / "r.safetensors",
                        tmp_path / "t.parquet", batch_size=4, storage="float16")
    half = load_file(tmp_path / "r.safetensors")
    for layer in (0, 3, adapter.n_layers):
        torch.testing.assert_close(half[f"resid.{layer}"], cache.resid(layer).half(), rtol=1e-3, atol=1e-3)


def test_interrupted_extraction_leaves_no_output(stories, stories_cache, tmp_path, monkeypatch):
    adapter, tok = stories
    frame, _, _ = stories_cache
    calls = {"n": 0}
    original = adapter.run_block

    def failing(index, hidden, inputs):
        calls["n"] += 1
        if calls["n"] > 7:
            raise RuntimeError("simulated crash")
        return original(index, hidden, inputs)

    monkeypatch.setattr(adapter, "run_block", failing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        extract_activations(adapter, tok, sequences_from_completions(frame), tmp_path / "resid.safetensors",
                            tmp_path / "tokens.parquet", batch_size=2)
    assert list(tmp_path.iterdir()) == []


def test_encoder_cache(tiny_dirs, tmp_path):
    adapter = load_model(tiny_dirs["bert"], kind="encoder")
    tok = load_tokenizer(tiny_dirs["bert"])
    seqs = sequences_from_prompts(tok, PROMPTS.prompts)
    extract_activations(adapter, tok, seqs, tmp_path / "resid.safetensors", tmp_path / "tokens.parquet", batch_size=3)
    cache = ActivationCache(tmp_path)
    assert not cache.tokens["is_target"].any()
    for seq in seqs:
        rows = cache.tokens.loc[cache.tokens["prompt_id"] == seq.prompt_id, "row"].to_numpy()
        with torch.no_grad():
            expected = adapter.model(torch.tensor([seq.ids])).last_hidden_state[0]
        torch.testing.assert_close(cache.resid(adapter.n_layers, rows), expected, rtol=1e-5, atol=1e-5)
