"""The tuned lens: exact on layers that are an affine map of the final stream, identity at the last
layer, trained on whole prompts only, better than the logit lens on held-out stories260K prompts,
reproducible, and its saved translators give the reported numbers in a plain recomputation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from layerscope.data.activations import ActivationCache, extract_activations, sequences_from_completions
from layerscope.data.prompts import Prompt, PromptSet
from layerscope.experiments.lens.logit_lens import lens_arrays
from layerscope.experiments.lens.tuned_lens import (
    Translators, evaluation_rows, fit_translators, split_prompts, training_rows, tuned_lens,
)
from layerscope.model.generate import generate_completions

STARTS = ["Once upon a time, there was a little girl", "Tom had a big red ball. He", "The dog ran to",
          "A cat sat on the mat and", "One day, a bird flew to the park.", "Lily wanted to play with",
          "The sun was hot, so", "Ben and Mia went to the", "There was a big tree in", "Mom said, \"Let's go",
          "The little boat", "A boy found a shiny", "Sue liked to draw", "The bunny hopped",
          "It was a rainy day and", "Max the dog"]
FAST = dict(n_boot=200, max_target_tokens=None)


@pytest.fixture(scope="module")
def story_cache(stories, stories_dir, tmp_path_factory) -> ActivationCache:
    """Greedy 24-token completions of 16 story openings by stories260K (two categories) and their cache."""
    adapter, tok = stories
    prompts = PromptSet("stories", tuple(Prompt(f"p{i:02d}", "ab"[i % 2], text) for i, text in enumerate(STARTS)))
    frame = generate_completions(adapter, tok, prompts, model_dir=stories_dir, max_new_tokens=24, batch_size=8,
                                 system_prompt=None, chat_template="auto")
    folder = tmp_path_factory.mktemp("tuned_lens_cache")
    extract_activations(adapter, tok, sequences_from_completions(frame), folder / "resid.safetensors",
                        folder / "tokens.parquet", batch_size=8)
    return ActivationCache(folder)


def _write_cache(folder: Path, layers: list[torch.Tensor], tokens: pd.DataFrame) -> ActivationCache:
    folder.mkdir(parents=True, exist_ok=True)
    n, d = layers[0].shape
    save_file({f"resid.{i}": x.float().contiguous() for i, x in enumerate(layers)}, str(folder / "resid.safetensors"),
              metadata={"n_layers": str(len(layers) - 1), "d_model": str(d), "n_tokens": str(n)})
    tokens.to_parquet(folder / "tokens.parquet", index=False)
    return ActivationCache(folder)


def _layers(cache: ActivationCache) -> list[torch.Tensor]:
    return [cache.resid(layer) for layer in range(cache.n_layers + 1)]


def _affine_cache(story_cache, folder, seed=0):
    """Layers l < L are an exact invertible affine map of the real final stream: h_l = h_L M_lᵀ + v_l."""
    g = torch.Generator().manual_seed(seed)
    final = story_cache.resid(story_cache.n_layers).double()
    d = final.shape[1]
    layers, maps = [], []
    for _ in range(story_cache.n_layers):
        q1, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        q2, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        m = q1 @ torch.diag(torch.linspace(0.5, 2.0, d, dtype=torch.float64)) @ q2  # condition number 4
        v = torch.randn(d, generator=g, dtype=torch.float64) * final.std()
        layers.append(final @ m.T + v)
        maps.append((m, v))
    return _write_cache(folder, [*layers, final], story_cache.tokens), maps


def test_layers_that_are_an_affine_map_of_the_final_stream_are_read_exactly(stories, story_cache, tmp_path):
    adapter, _ = stories
    cache, maps = _affine_cache(story_cache, tmp_path)
    L = cache.n_layers
    result = tuned_lens(adapter, cache, model="m", prompt_set="p", ridge=0.0, steps=0, **FAST)
    s = result.summary
    # the held-out prompts' final distributions are recovered at every layer; the logit lens misses them
    np.testing.assert_allclose(s["kl_by_layer"], 0, atol=2e-5)
    assert s["top1_agreement_by_layer"] == pytest.approx([1.0] * (L + 1))
    assert min(s["logit_lens_kl_by_layer"][:L]) > 0.5
    assert s["crystallization_mean"] == 0 and s["first_top1_mean"] == 0
    # the translator is the known inverse map, up to the scale the final norm ignores (independent: M⁻¹)
    rows = evaluation_rows(cache.tokens, result.split.heldout, None)
    final = cache.resid(L, rows).double()
    for layer, (m, v) in enumerate(maps):
        h = cache.resid(layer, rows)
        inverse = (h.double() - v) @ torch.linalg.inv(m).T
        np.testing.assert_allclose(inverse, final, rtol=0, atol=1e-4 * float(final.abs().max()))
        translated = result.translators(layer, h).double()
        scale = s["stream_scale_by_layer"][layer]
        np.testing.assert_allclose(translated, scale * final, rtol=0, atol=1e-3 * float(scale * final.abs().max()))
    # the KL steps start at the optimum and stay near it
    stepped = tuned_lens(adapter, cache, model="m", prompt_set="p", ridge=0.0, steps=4, lr=1e-4, **FAST).summary
    assert max(stepped["kl_by_layer"]) < 1e-2


def test_the_last_layer_is_the_models_output_and_a_zero_translator_is_the_logit_lens(stories, story_cache):
    adapter, _ = stories
    L = story_cache.n_layers
    result = tuned_lens(adapter, story_cache, model="m", prompt_set="p", steps=2, **FAST)
    s = result.summary
    assert result.translators.n_layers == L  # one translator per boundary below the last
    assert s["kl_by_layer"][L] == 0 and s["logit_lens_kl_by_layer"][L] == 0
    assert s["top1_agreement_by_layer"][L] == 1 and s["logit_lens_top1_agreement_by_layer"][L] == 1
    rows = evaluation_rows(story_cache.tokens, result.split.heldout, None)
    logit = lens_arrays(adapter, story_cache, rows=rows, chunk_tokens=50)
    tuned = lens_arrays(adapter, story_cache, rows=rows, chunk_tokens=50, transform=result.translators)
    zero = lens_arrays(adapter, story_cache, rows=rows, chunk_tokens=50,
                       transform=Translators.identity(L, story_cache.d_model))
    for field in ("top1_match", "rank", "prob", "entropy", "kl"):
        np.testing.assert_array_equal(getattr(zero, field), getattr(logit, field))  # same kernels: exact
        np.testing.assert_array_equal(getattr(tuned, field)[L], getattr(logit, field)[L])  # layer L untouched
    assert not np.array_equal(tuned.kl[:L], logit.kl[:L])


def test_the_split_is_by_prompt_stratified_and_seeded(story_cache):
    tokens = story_cache.tokens
    split = split_prompts(tokens, 0.5, seed=3)
    ids = list(dict.fromkeys(tokens["prompt_id"]))
    assert set(split.train).isdisjoint(split.heldout) and sorted(split.train + split.heldout) == sorted(ids)
    assert len(split.train) == 8
    category = tokens.groupby("prompt_id")["category"].first()
    assert sorted(category[split.train].value_counts().tolist()) == [4, 4]  # stratified: 4 of each category
    assert split_prompts(tokens, 0.5, seed=3).train == split.train
    assert any(split_prompts(tokens, 0.5, seed=s).train != split.train for s in range(4, 8))
    assert len(split_prompts(tokens, 0.99, seed=0).heldout) == 1  # never an empty held-out set
    train = training_rows(tokens, split.train, ["prompt", "completion"])
    chosen = tokens.set_index("row").loc[train]
    assert set(chosen["prompt_id"]) == set(split.train) and set(chosen["role"]) <= {"prompt", "completion"}
    held = tokens.set_index("row").loc[evaluation_rows(tokens, split.heldout, 3)]
    assert set(held["prompt_id"]) == set(split.heldout) and held["is_target"].all()
    assert held["target_index"].max() == 2 and len(held) == 3 * len(split.heldout)


def test_held_out_prompts_never_reach_the_translators(stories, story_cache, tmp_path):
    """Changing every activation of the held-out prompts leaves the fit bit-identical; a training prompt does not."""
    adapter, _ = stories
    tokens = story_cache.tokens
    split = split_prompts(tokens, 0.5, seed=0)
    rows = training_rows(tokens, split.train, ["prompt", "completion"])
    reference = fit_translators(adapter, story_cache, rows, steps=3, seed=0).translators
    layers = _layers(story_cache)
    for name, prompts in (("heldout", split.heldout), ("train", split.train[:1])):
        changed = torch.as_tensor(tokens.loc[tokens["prompt_id"].isin(prompts), "row"].to_numpy().copy())
        noisy = [x.clone() for x in layers]
        for x in noisy:
            x[changed] += torch.randn(len(changed), x.shape[1], generator=torch.Generator().manual_seed(1))
        cache = _write_cache(tmp_path / name, noisy, tokens)
        # the split is drawn from the token table alone, so it is the same for the changed cache
        assert split_prompts(cache.tokens, 0.5, seed=0).train == split.train
        fit = fit_translators(adapter, cache, rows, steps=3, seed=0).translators
        same = torch.equal(fit.weight, reference.weight) and torch.equal(fit.bias, reference.bias)
        assert same == (name == "heldout")


def test_the_tuned_lens_beats_the_logit_lens_on_held_out_stories(stories, story_cache):
    adapter, _ = stories
    s = tuned_lens(adapter, story_cache, model="m", prompt_set="p", steps=8, lr=3e-4, **FAST).summary
    L = s["n_layers"]
    tuned, logit = np.array(s["kl_by_layer"]), np.array(s["logit_lens_kl_by_layer"])
    assert (tuned[:L] < logit[:L]).all()  # every layer below the last, on prompts it was not trained on
    assert tuned[L] == logit[L] == 0  # the two meet at the output
    assert len(s["layers_tuned_below_logit"]) >= L - 1  # the paired interval excludes 0
    np.testing.assert_allclose(s["kl_difference_by_layer"], logit - tuned, rtol=1e-12, atol=1e-12)
    assert s["kl_mean"] < s["logit_lens_kl_mean"]
    assert s["crystallization_mean"] <= s["logit_lens_crystallization_mean"]
    assert s["crystallization_difference"] == pytest.approx(
        s["logit_lens_crystallization_mean"] - s["crystallization_mean"])
    assert s["train_kl_by_layer"][0] <= s["train_kl_init_by_layer"][0]  # the KL steps lower the training KL


def test_same_seed_same_numbers(stories, story_cache):
    adapter, _ = stories
    runs = [tuned_lens(adapter, story_cache, model="m", prompt_set="p", steps=3, seed=5, **FAST) for _ in range(2)]
    a, b = ({k: v for k, v in r.summary.items() if k != "train_seconds"} for r in runs)
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    assert torch.equal(runs[0].translators.weight, runs[1].translators.weight)
    assert torch.equal(runs[0].translators.bias, runs[1].translators.bias)
    other = tuned_lens(adapter, story_cache, model="m", prompt_set="p", steps=3, seed=6, **FAST).summary
    assert other["heldout_prompts"] != a["heldout_prompts"]


def test_run_writes_translators_that_reproduce_the_summary(stories, stories_dir, story_cache, tmp_path):
    """End to end through the writer; the saved translators, read back and applied token by token with
    the model's own norm and head, give the reported per-layer KL and top-1 agreement."""
    from layerscope.jobs.writer import run_experiment

    adapter, _ = stories
    out = {"summary": tmp_path / "summary.json", "table_metrics": tmp_path / "metrics.parquet",
           "table_per_token": tmp_path / "per_token.parquet", "figure_curves": tmp_path / "curves.png",
           "file_translators": tmp_path / "translators.safetensors"}
    inputs = {"model": str(stories_dir), "resid": str(story_cache.directory / "resid.safetensors"),
              "tokens": str(story_cache.directory / "tokens.parquet")}
    params = {"train_fraction": 0.5, "train_roles": ["prompt", "completion"], "ridge": 0.03, "steps": 2, "lr": 3e-4,
              "tokens_per_step": 32, "max_target_tokens": 6, "topk": 5, "chunk_tokens": 40, "seed": 0}
    run_experiment("tuned_lens", inputs, out, params=params, wildcards={"model": "stories", "pset": "p"})
    s = json.loads(out["summary"].read_text())
    assert s["n_tokens"] == 6 * s["n_heldout_prompts"] and out["figure_curves"].stat().st_size > 0
    translators = Translators.load(out["file_translators"])
    L = story_cache.n_layers
    assert translators.n_layers == L
    tokens = story_cache.tokens
    kl, agree = np.zeros(L + 1), np.zeros(L + 1)
    rows = tokens.loc[tokens["prompt_id"].isin(s["heldout_prompts"]) & tokens["is_target"]
                      & (tokens["target_index"] < 6), "row"].to_numpy()
    head, norm = adapter.model.lm_head, adapter.model.model.norm
    with torch.no_grad():
        for row in rows:
            final = torch.log_softmax(head(norm(story_cache.resid(L, np.array([row]))[0])).double(), -1)
            for layer in range(L + 1):
                h = story_cache.resid(layer, np.array([row]))[0]
                if layer < L:
                    h = h + translators.weight[layer] @ h + translators.bias[layer]
                logp = torch.log_softmax(head(norm(h)).double(), -1)
                kl[layer] += float((final.exp() * (final - logp)).sum()) / len(rows)
                agree[layer] += float(logp.argmax() == final.argmax()) / len(rows)
    np.testing.assert_allclose(s["kl_by_layer"], kl, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(s["top1_agreement_by_layer"], agree, atol=1e-12)
    metrics = pd.read_parquet(out["table_metrics"])
    assert set(metrics["lens"]) == {"tuned", "logit", "logit_minus_tuned"}
    assert ((metrics["ci_lo"] <= metrics["value"]) & (metrics["value"] <= metrics["ci_hi"])).all()
    per_token = pd.read_parquet(out["table_per_token"])
    assert s["crystallization_mean"] == per_token["crystallization"].mean()
    assert s["logit_lens_crystallization_mean"] == per_token["logit_lens_crystallization"].mean()
