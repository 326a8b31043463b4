"""The logit lens: exact at the last layer, equal to a plain per-token computation elsewhere."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from layerscope.data.activations import ActivationCache, TokenSequence, extract_activations
from layerscope.model.adapter import load_model, load_tokenizer
from layerscope.experiments.lens.logit_lens import first_true, lens_arrays, logit_lens, stays_true_from
from layerscope.engines.phases import segment
from tests.helpers.tiny_models import tiny_configs

DECODERS = [f for f in tiny_configs() if f != "bert"]


def _random_cache(adapter, tok, folder, seed=0, n=4):
    """A cache of random token sequences whose second half is marked as completion."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for i in range(n):
        length = 9 + 3 * i
        ids = torch.randint(3, adapter.facts.vocab_size, (length,), generator=g).tolist()
        roles = ["prompt"] * (length // 2) + ["completion"] * (length - length // 2)
        seqs.append(TokenSequence(f"s{i}", "even" if i % 2 == 0 else "odd", ids, roles))
    extract_activations(adapter, tok, seqs, folder / "resid.safetensors", folder / "tokens.parquet", batch_size=3)
    return ActivationCache(folder), seqs


def _model_logits(adapter, cache, seqs):
    """The model's own next-token logits at every target position, by plain forwards."""
    rows = []
    with torch.no_grad():
        for seq in seqs:
            logits = adapter.model(torch.tensor([seq.ids])).logits[0]
            targets = [t for t in range(len(seq.ids) - 1) if seq.roles[t + 1] == "completion"]
            rows.append(logits[targets])
    return torch.cat(rows)


@pytest.mark.parametrize("family", ["stories", *DECODERS])
def test_lens_at_the_last_layer_is_the_models_output(family, stories_dir, tiny_dirs, tmp_path):
    folder = stories_dir if family == "stories" else tiny_dirs[family]
    adapter, tok = load_model(folder), load_tokenizer(folder)
    cache, seqs = _random_cache(adapter, tok, tmp_path)
    arrays = lens_arrays(adapter, cache, chunk_tokens=5)
    logits = _model_logits(adapter, cache, seqs)
    L = adapter.n_layers
    top1 = logits.argmax(-1).numpy()
    np.testing.assert_array_equal(arrays.final_top1, top1)
    assert arrays.top1_match[L].all() and (arrays.rank[L] == 0).all()
    np.testing.assert_allclose(arrays.kl[L], 0, atol=1e-6)
    probs = torch.softmax(logits.double(), -1)
    np.testing.assert_allclose(arrays.prob[L], probs[torch.arange(len(top1)), top1].numpy(), rtol=1e-4, atol=1e-6)
    entropy = -(probs * probs.clamp_min(1e-300).log()).sum(-1).numpy()
    np.testing.assert_allclose(arrays.entropy[L], entropy, rtol=1e-4, atol=1e-5)


def test_intermediate_layers_match_a_plain_computation(stories, tmp_path):
    """Every metric at every layer, recomputed token by token from the model's own hidden states."""
    adapter, tok = stories
    cache, seqs = _random_cache(adapter, tok, tmp_path, seed=3)
    arrays = lens_arrays(adapter, cache, chunk_tokens=7)
    column = 0
    with torch.no_grad():
        for seq in seqs:
            out = adapter.model(torch.tensor([seq.ids]), output_hidden_states=True)
            head = adapter.model.lm_head
            norm = adapter.model.model.norm
            for t in range(len(seq.ids) - 1):
                if seq.roles[t + 1] != "completion":
                    continue
                final = out.logits[0, t].double()
                target = int(final.argmax())
                p_final = torch.softmax(final, -1)
                for layer in range(adapter.n_layers):
                    logits = head(norm(out.hidden_states[layer][0, t])).double()
                    logp = torch.log_softmax(logits, -1)
                    assert arrays.top1_match[layer, column] == (int(logits.argmax()) == target)
                    assert arrays.rank[layer, column] == int((logits > logits[target]).sum())
                    assert arrays.prob[layer, column] == pytest.approx(float(logp[target].exp()), rel=1e-4, abs=1e-7)
                    kl = float((p_final * (torch.log_softmax(final, -1) - logp)).sum())
                    assert arrays.kl[layer, column] == pytest.approx(kl, rel=1e-4, abs=1e-5)
                column += 1
    assert column == arrays.top1_match.shape[1]


def test_first_and_crystallization_layers():
    match = np.array([
        # token: 0      1      2      3
        [False, True, False, False],  # layer 0
        [True, True, False, False],  # layer 1
        [False, True, True, False],  # layer 2
        [True, True, True, True],  # layer 3
    ])
    np.testing.assert_array_equal(first_true(match), [1, 0, 2, 3])
    np.testing.assert_array_equal(stays_true_from(match), [3, 0, 2, 3])
    # a plain loop agrees on random masks
    rng = np.random.default_rng(0)
    masks = rng.random((7, 50)) < 0.6
    masks[-1] = True
    for j in range(50):
        col = masks[:, j]
        assert first_true(masks)[j] == next(i for i in range(7) if col[i])
        assert stays_true_from(masks)[j] == next(i for i in range(7) if col[i:].all())


def test_segmentation_recovers_planted_phases():
    rng = np.random.default_rng(1)
    levels = np.repeat([0.0, 3.0, -2.0, 5.0], [6, 9, 4, 8])
    curves = np.column_stack([levels + 0.05 * rng.standard_normal(27), -levels + 0.05 * rng.standard_normal(27)])
    assert segment(curves, 4) == [6, 15, 19]
    assert segment(curves, 1) == []
    assert segment(curves[:3], 10) == [1, 2]


def test_logit_lens_summary(stories, tmp_path):
    adapter, tok = stories
    cache, _ = _random_cache(adapter, tok, tmp_path, n=6)
    result = logit_lens(adapter, cache, model="m", prompt_set="p", topk=5, n_phases=3, chunk_tokens=16)
    s = result.summary
    for key in ("crystallization_mean", "first_top1_mean", "gap_mean", "n_tokens", "n_layers", "phase_boundaries"):
        assert key in s
    assert s["n_tokens"] == len(cache.target_rows()) and s["n_layers"] == 5
    assert s["gap_mean"] == pytest.approx(s["crystallization_mean"] - s["first_top1_mean"])
    assert 0 <= s["first_top1_mean"] <= s["crystallization_mean"] <= 5
    assert s["crystallization_topk_mean"] <= s["crystallization_mean"]
    assert set(s["by_category"]) == {"even", "odd"}
    assert len(s["phases"]) == 3
    per_layer = result.metrics.query("view == 'all' and category == 'all' and metric == 'top1_agreement'")
    assert per_layer["layer"].tolist() == list(range(6)) and per_layer["value"].iloc[-1] == 1.0
