"""The layer-surgery primitive: loss of any block sequence, with cached prefixes equal to full re-runs."""

from __future__ import annotations

import numpy as np
import pytest

from layerscope import LayerscopeError

from layerscope.model.adapter import load_model, load_tokenizer
from layerscope.engines.surgery import LossEvaluator, cached_prefix, skip, swap
from tests.helpers.tiny_models import tiny_configs
from tests.helpers.surgery import Reference, reference_loss, shared_prefix_cache, token_cache

DECODERS = [f for f in tiny_configs() if f != "bert"]


def test_helpers():
    assert cached_prefix([0, 1, 2, 4, 3], 5) == 3
    assert cached_prefix([1, 0, 2], 3) == 0
    assert cached_prefix([0, 1, 2, 2, 3], 4) == 3
    assert cached_prefix(list(range(5)), 5) == 5
    assert skip(5, 2) == [0, 1, 3, 4] and skip(5, 0, 4) == [1, 2, 3]
    assert swap(4, 1, 3) == [0, 3, 2, 1] and swap(4, 2, 2) == [0, 1, 2, 3]


@pytest.mark.parametrize("family", ["stories", "llama", "qwen2", "gemma2", "gpt2", "gpt_neox", "phi3"])
def test_cached_prefix_equals_full_rerun(family, stories_dir, tiny_dirs, tmp_path):
    folder = stories_dir if family == "stories" else tiny_dirs[family]
    adapter, tok = load_model(folder), load_tokenizer(folder)
    cache, seqs = token_cache(adapter, tok, tmp_path)
    ev = LossEvaluator(adapter, cache, batch_size=2)
    L = adapter.n_layers
    rng = np.random.default_rng(0)
    variants = [list(range(L)), skip(L, 1), skip(L, L - 1), swap(L, 0, L - 1), swap(L, 1, 2),
                list(rng.permutation(L)), [0, 1, 1, 2] + list(range(3, L))]
    cached = ev.losses(variants)
    full = ev.losses(variants, use_cache=False)
    np.testing.assert_allclose(cached, full, rtol=1e-5, atol=1e-6)
    # and both equal an independent computation through the model's own forward
    for variant, value in zip(variants[:5], cached[:5]):
        assert value == pytest.approx(reference_loss(adapter, seqs, variant), rel=1e-5, abs=1e-6)


def test_identity_reproduces_the_baseline_and_surgery_changes_it(stories, tmp_path):
    adapter, tok = stories
    cache, seqs = token_cache(adapter, tok, tmp_path, seed=2)
    ev = LossEvaluator(adapter, cache, batch_size=3)
    base = ev.baseline()
    assert base == ev.loss(list(range(5)))
    assert base == pytest.approx(reference_loss(adapter, seqs, list(range(5))), rel=1e-6)
    assert ev.loss(swap(5, 2, 2)) == base
    for i in range(5):
        assert ev.loss(skip(5, i)) != pytest.approx(base, rel=1e-3)
    per_token = ev.loss(list(range(5)), per_token=True)
    assert per_token.shape == (len(cache.target_rows()),) and per_token.mean() == pytest.approx(base)


def test_max_prefix_caps_the_cached_start(stories, tmp_path, monkeypatch):
    adapter, tok = stories
    cache, _ = token_cache(adapter, tok, tmp_path)
    ev = LossEvaluator(adapter, cache, batch_size=8)
    calls = []
    original = adapter.run_block
    monkeypatch.setattr(adapter, "run_block", lambda i, h, inp: calls.append(i) or original(i, h, inp))
    ev.loss(list(range(5)), max_prefix=2)
    assert calls == [2, 3, 4] * len(ev.groups)


def test_bad_block_index(stories, tmp_path):
    adapter, tok = stories
    cache, _ = token_cache(adapter, tok, tmp_path)
    with pytest.raises(ValueError, match=r"block indices \[7\]"):
        LossEvaluator(adapter, cache).loss([0, 7])


def test_prompt_ids_restrict_the_evaluation(stories, tmp_path):
    adapter, tok = stories
    cache, seqs = token_cache(adapter, tok, tmp_path)
    chosen = [seqs[1], seqs[3]]
    ev = LossEvaluator(adapter, cache, prompt_ids=[s.prompt_id for s in chosen])
    assert ev.n_targets == sum(r == "completion" for s in chosen for r in s.roles)
    assert ev.baseline() == pytest.approx(reference_loss(adapter, chosen, list(range(5))), rel=1e-5)
    with pytest.raises(LayerscopeError, match="no such prompts"):
        LossEvaluator(adapter, cache, prompt_ids=["not-a-prompt"])


def test_per_prompt_sums_pool_to_the_reported_loss(stories, tmp_path):
    adapter, tok = stories
    cache, seqs = token_cache(adapter, tok, tmp_path)
    ev = LossEvaluator(adapter, cache, batch_size=2)
    per_token = ev.losses([skip(5, 2)], per_token=True)[0]
    ids, sums, counts = ev.per_prompt(per_token)
    assert sorted(ids) == sorted(s.prompt_id for s in seqs)
    assert sums.sum() / counts.sum() == pytest.approx(ev.loss(skip(5, 2)), rel=1e-12)
    # each prompt's mean is that prompt's own loss, computed alone
    for pid, total, n in zip(ids, sums, counts):
        alone = LossEvaluator(adapter, cache, prompt_ids=[pid]).loss(skip(5, 2))
        assert total / n == pytest.approx(alone, rel=1e-5, abs=1e-6)


def test_max_target_tokens_keeps_the_first_completion_tokens(stories, tmp_path):
    adapter, tok = stories
    cache, seqs = token_cache(adapter, tok, tmp_path)
    ev = LossEvaluator(adapter, cache, max_target_tokens=2)
    assert ev.n_targets == sum(min(2, sum(r == "completion" for r in s.roles)) for s in seqs)
    full = LossEvaluator(adapter, cache).losses([list(range(5))], per_token=True)[0]
    tokens = cache.tokens
    targets = tokens[tokens["is_target"]].copy()
    targets["nll"] = full
    first_two = targets.groupby("prompt_id", sort=False).head(2)["nll"].mean()
    assert ev.baseline() == pytest.approx(first_two, rel=1e-5)


def test_a_cache_in_another_dtype_is_not_used_as_a_starting_point(stories, tmp_path):
    adapter, tok = stories
    cache, seqs = token_cache(adapter, tok, tmp_path)
    ev = LossEvaluator(adapter, cache)
    assert ev.cache_matches
    cache.metadata["storage_dtype"] = "bfloat16"
    ev16 = LossEvaluator(adapter, cache)
    assert not ev16.cache_matches
    before = ev16.blocks_run
    assert ev16.baseline() == pytest.approx(ev.baseline(use_cache=False), rel=1e-6)
    assert ev16.blocks_run - before == 5 * len(ev16.groups)  # every block re-run from the embeddings


# ---------------------------------------------------------------------------- layouts, prefix sharing, memo


@pytest.mark.parametrize("family", ["stories", "llama", "qwen3", "gpt2", "gpt_neox", "phi3", "gemma", "mistral"])
def test_packed_prompts_with_a_shared_prefix_equal_the_reference(family, stories_dir, tiny_dirs, tmp_path):
    folder = stories_dir if family == "stories" else tiny_dirs[family]
    adapter, tok = load_model(folder), load_tokenizer(folder)
    cache, seqs = shared_prefix_cache(adapter, tok, tmp_path)
    L = adapter.n_layers
    engine = LossEvaluator(adapter, cache, batch_size=3)
    expected = "padded" if family == "mistral" else "packed"  # mistral's sliding window (8) < prompt length
    assert engine.layout == expected
    if expected == "packed":
        # the shared head is stored once per group: fewer positions than the prompts' own lengths
        assert engine.positions_per_block < sum(len(p.ids) for p in engine.prompts)
        assert engine.groups[0].ids.shape[0] == 1
    rng = np.random.default_rng(1)
    variants = [list(range(L)), skip(L, 0), skip(L, L - 1), swap(L, 0, L - 1), list(rng.permutation(L)),
                [0, 0] + list(range(1, L)), skip(L, 0, L - 1)]
    reference = Reference(adapter, cache, batch_size=2)
    np.testing.assert_allclose(engine.losses(variants), reference.losses(variants), rtol=1e-5, atol=1e-6)
    per_token = engine.losses(variants[:2], per_token=True)
    np.testing.assert_allclose(per_token, reference.losses(variants[:2], per_token=True), rtol=1e-4, atol=1e-5)
    for variant in variants[:4]:
        assert engine.loss(variant) == pytest.approx(reference_loss(adapter, seqs, variant), rel=1e-5, abs=1e-6)


def test_packing_refused_where_it_would_be_wrong(tiny_dirs, tmp_path):
    from layerscope import LayerscopeError

    adapter, tok = load_model(tiny_dirs["gemma2"]), load_tokenizer(tiny_dirs["gemma2"])
    cache, _ = shared_prefix_cache(adapter, tok, tmp_path)
    assert LossEvaluator(adapter, cache).layout == "padded"  # sliding window 4 < prompt length
    with pytest.raises(LayerscopeError, match="sliding-window"):
        LossEvaluator(adapter, cache, layout="packed")
    with pytest.raises(LayerscopeError, match="unknown layout"):
        LossEvaluator(adapter, cache, layout="tree")


def test_prefix_sharing_computes_each_prefix_once(stories, tmp_path, monkeypatch):
    adapter, tok = stories
    cache, _ = token_cache(adapter, tok, tmp_path)
    ev = LossEvaluator(adapter, cache, batch_size=8)
    assert len(ev.groups) == 1
    sequences = [skip(5, 0), skip(5, 0, 4), skip(5, 0, 3), skip(5, 0, 2), [1, 2, 2, 3], [1, 2, 2, 4]]
    shared = ev.losses(sequences)
    calls = []
    original = adapter.run_block
    monkeypatch.setattr(adapter, "run_block", lambda i, h, inp: calls.append(i) or original(i, h, inp))
    alone = ev.losses(sequences, share_prefixes=False)
    n_alone = len(calls)
    calls.clear()
    assert ev.losses(sequences) == shared
    # the trie's nodes, each computed once: [1] [1,2] [1,2,3] [1,2,3,4] [1,2,4] [1,3] [1,3,4] [1,2,2] [1,2,2,3] [1,2,2,4]
    assert len(calls) == 10 and n_alone == 4 + 3 + 3 + 3 + 4 + 4
    np.testing.assert_allclose(shared, alone, rtol=1e-6)


def test_memo_keeps_prefix_states_across_calls(stories, tmp_path, monkeypatch):
    from layerscope.engines.surgery import PrefixMemo, move

    adapter, tok = stories
    cache, _ = token_cache(adapter, tok, tmp_path)
    ev = LossEvaluator(adapter, cache, batch_size=8)
    order = [3, 1, 0, 4, 2]
    memo = PrefixMemo(capacity=2)
    memo.pin(order)
    first = ev.loss(order, use_cache=False, memo=memo)
    calls = []
    original = adapter.run_block
    monkeypatch.setattr(adapter, "run_block", lambda i, h, inp: calls.append(i) or original(i, h, inp))
    for p in range(4):  # adjacent swaps: each starts from the pinned order's prefix of length p
        candidate = move(order, p, p + 1)
        value = ev.loss(candidate, use_cache=False, memo=memo)
        assert value == pytest.approx(ev.loss(candidate, use_cache=False, share_prefixes=False), rel=1e-6)
    assert ev.loss(order, use_cache=False, memo=memo) == first  # fully memoised: no block runs
    assert len(calls) == sum(5 - p for p in range(4)) + 4 * 5  # memoised candidates + the plain re-runs
    assert len(memo) <= 5 + 2  # pinned prefixes + capacity
