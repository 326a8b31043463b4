"""embedding_geometry against direct computations, planted structure, and the word-list loader."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pandas as pd
import pytest
import torch

from tests.helpers import REPO
from layerscope.model.adapter import load_model, load_tokenizer
from layerscope.experiments.geometry.embedding_geometry import (
    WordListError, covariance_eigenvalues_chunked, embedding_geometry, embedding_matrices, load_word_categories,
    matrix_geometry, single_token,
)
from layerscope.engines.statistics import Bootstrap
from layerscope.jobs.writer import run_experiment

WORDS = REPO / "resources" / "word_categories.json"


def test_shipped_word_lists():
    categories = load_word_categories(WORDS)
    assert set(categories) == {"animals", "colors", "numbers", "body", "food", "emotions", "actions", "time"}
    assert all(len(words) >= 15 for words in categories.values())


@pytest.mark.parametrize("content, message", [
    ("{", "not valid JSON"),
    (json.dumps({"categories": {"a": ["x"]}}), "at least 2 categories"),
    (json.dumps({"categories": {"a": ["x"], "b": []}}), "non-empty list"),
    (json.dumps({"categories": {"a": ["x"], "b": ["x"]}}), "in both 'a' and 'b'"),
    (json.dumps({"categories": {"a": ["x"], "b": ["y"]}, "extra": 1}), "unknown key"),
    (json.dumps(["a"]), "'categories' object"),
])
def test_bad_word_lists_are_rejected(tmp_path, content, message):
    path = tmp_path / "w.json"
    path.write_text(content)
    with pytest.raises(WordListError, match=message):
        load_word_categories(path)
    with pytest.raises(WordListError, match="not found"):
        load_word_categories(tmp_path / "missing.json")


def test_single_token_lookup(stories):
    _, tok = stories
    tid, variant = single_token(tok, "happy")
    assert tok.decode([tid]).strip() == "happy" and variant == "leading_space"
    tid, variant = single_token(tok, "7")  # sentencepiece: "▁" + "7" is two tokens, the bare piece exists
    assert variant == "vocab" and tok.convert_ids_to_tokens(tid) == "7"
    assert single_token(tok, "elephant") is None


@pytest.fixture(scope="module")
def stories_result(stories):
    adapter, tok = stories
    categories = load_word_categories(WORDS)
    return embedding_geometry(adapter, tok, categories, model="stories", cosine_sample=300, n_simplices=400, seed=1)


def test_statistics_equal_direct_computations(stories, stories_result):
    adapter, _ = stories
    w = adapter.embed.weight.detach().double().numpy()
    s = stories_result.matrices[0].scalars
    norms = np.linalg.norm(w, axis=1)
    assert s["norm_mean"] == pytest.approx(norms.mean()) and s["norm_std"] == pytest.approx(norms.std())
    lam = np.sort(np.linalg.eigvalsh(np.cov(w, rowvar=False)))[::-1]
    np.testing.assert_allclose(stories_result.matrices[0].eigenvalues, lam, rtol=1e-6, atol=1e-10)
    assert s["participation_ratio"] == pytest.approx(lam.sum() ** 2 / (lam**2).sum(), rel=1e-6)
    cumulative = np.cumsum(lam) / lam.sum()
    for f in (80, 90, 95, 99):
        assert s[f"dims_{f}"] == int(np.argmax(cumulative >= f / 100 - 1e-12)) + 1
    # the cosine sample is the seeded draw of 300 distinct tokens
    idx = np.sort(np.random.default_rng(1).choice(len(w), size=300, replace=False))
    unit = w[idx] / np.linalg.norm(w[idx], axis=1, keepdims=True)
    pairs = (unit @ unit.T)[np.triu_indices(300, k=1)]
    assert s["cosine_mean"] == pytest.approx(pairs.mean()) and s["n_cosine_pairs"] == len(pairs)
    assert stories_result.matrices[0].cosine_hist.sum() == len(pairs)


def test_chunked_covariance_equals_numpy():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1000, 12)) * np.arange(1, 13) + 100.0
    np.testing.assert_allclose(covariance_eigenvalues_chunked(torch.tensor(x, dtype=torch.float32), chunk=77),
                               np.sort(np.linalg.eigvalsh(np.cov(x.astype(np.float32).astype(float), rowvar=False)))[::-1],
                               rtol=1e-5)


def test_gaussian_embedding_matches_its_gaussian_baseline(stories):
    _, tok = stories
    w = torch.randn(512, 64, generator=torch.Generator().manual_seed(0))
    m = matrix_geometry("embedding", w, tok, {"a": ["happy"], "b": ["big"]}, cosine_sample=200, n_simplices=2000,
                        min_category_words=3, seed=0)
    assert m.scalars["pentachoron_cv_ratio"] == pytest.approx(1.0, abs=0.12)
    assert m.scalars["pentachoron_volume_ratio"] == pytest.approx(1.0, abs=0.05)
    assert abs(m.scalars["cosine_mean"]) < 0.01
    assert m.scalars["category_separation"] is None  # no category has 3 single-token words


def test_planted_digit_and_category_geometry(stories):
    _, tok = stories
    d = 48
    rng = np.random.default_rng(0)
    w = rng.standard_normal((512, d)) * 0.1
    digit_ids = [single_token(tok, str(i))[0] for i in range(10)]
    for i, tid in enumerate(digit_ids):  # digits on an arc: cosine falls with |i − j|
        angle = i * np.pi / 18
        w[tid] = 0.0
        w[tid, 0], w[tid, 1] = np.cos(angle), np.sin(angle)
    categories = {"one": ["happy", "little", "big"], "two": ["the", "was", "play"]}
    for k, words in enumerate(categories.values()):
        for word in words:
            tid, _ = single_token(tok, word)
            w[tid] = 0.2 * rng.standard_normal(d)
            w[tid, 10 + k] += 3.0
    m = matrix_geometry("embedding", torch.tensor(w, dtype=torch.float32), tok, categories, cosine_sample=200,
                        n_simplices=50, min_category_words=3, seed=0)
    s = m.scalars
    assert s["n_digit_tokens"] == 10
    assert s["digit_distance_spearman"] < -0.98  # monotone in |i − j| (tied gaps keep it from exactly −1)
    i, j = np.triu_indices(10, k=1)
    np.testing.assert_allclose(m.digit_cos[i, j], np.cos((j - i) * np.pi / 18), atol=1e-6)
    from scipy.stats import pearsonr, spearmanr  # the peer computation of both correlations

    assert s["digit_distance_spearman"] == pytest.approx(spearmanr(j - i, m.digit_cos[i, j])[0], abs=1e-12)
    assert s["digit_distance_pearson"] == pytest.approx(pearsonr(j - i, m.digit_cos[i, j])[0], abs=1e-12)
    assert s["digit_distance_pearson"] < -0.95 and s["digit_adjacent_minus_nonadjacent"] > 0
    np.testing.assert_allclose(np.diag(m.digit_cos), 1.0, atol=1e-6)
    assert s["category_separation"] > 3 and s["n_category_words"] == 6 and s["n_skipped_words"] == 0
    assert (m.categories["intra_cosine"] > 0.7).all()  # ≈ 9 / (9 + 0.04·48)
    # 3 + 3 words: of the 20 ways to split them, 2 give the observed separation: p cannot go below ≈ 0.1
    assert s["category_separation_p_value"] == pytest.approx(0.1, abs=0.03)
    assert any("permutation null" in r for r in m.boot.reasons) and m.boot.summary()["underpowered"]


def test_skipped_and_shared_tokens_are_reported(stories):
    _, tok = stories
    w = torch.randn(512, 16, generator=torch.Generator().manual_seed(0))
    categories = {"a": ["happy", "elephant", "big", "little"], "b": ["the", "Happy", "was", "play"]}
    m = matrix_geometry("embedding", w, tok, categories, cosine_sample=50, n_simplices=10, min_category_words=3, seed=0)
    status = dict(zip(m.words["word"], m.words["status"]))
    assert status["elephant"] == "not_single_token"
    assert status["Happy"].startswith("same_token_as_") or status["Happy"] == "not_single_token"
    assert m.scalars["skipped_words"]["a"] == ["elephant"]


def test_untied_unembedding_is_measured_too(tiny_dirs):
    untied = load_model(tiny_dirs["llama"])
    tied = load_model(tiny_dirs["qwen2"])
    encoder = load_model(tiny_dirs["bert"])
    assert list(embedding_matrices(untied)) == ["embedding", "unembedding"]
    assert list(embedding_matrices(tied)) == ["embedding"]
    assert list(embedding_matrices(encoder)) == ["embedding"]
    tok = load_tokenizer(tiny_dirs["llama"])
    result = embedding_geometry(untied, tok, load_word_categories(WORDS), model="tiny", cosine_sample=100,
                                n_simplices=20)
    assert result.summary["matrices"] == ["embedding", "unembedding"]
    assert "unembedding_participation_ratio" in result.summary
    assert set(result.metrics["matrix"]) == {"embedding", "unembedding"}


def test_outputs_and_determinism(stories, stories_dir, stories_result, tmp_path):
    adapter, tok = stories
    outputs = {"summary": tmp_path / "summary.json",
               **{f"table_{k}": tmp_path / f"{k}.parquet" for k in ("metrics", "words", "eigenspectrum")},
               **{f"figure_{k}": tmp_path / f"{k}.png" for k in ("overview", "categories")}}
    params = {"categories": str(WORDS), "cosine_sample": 300, "n_simplices": 400, "min_category_words": 3, "seed": 1,
              "n_perm": 1000}
    written = run_experiment("embedding_geometry", {"model": str(stories_dir), "categories": str(WORDS)}, outputs,
                             params=params, wildcards={"model": "stories"})
    assert all(p.is_file() for p in outputs.values())
    pd.testing.assert_frame_equal(written.tables["metrics"], stories_result.metrics)
    summary = json.loads(outputs["summary"].read_text())
    for key in ("participation_ratio", "dims_90", "pentachoron_cv", "pentachoron_cv_gaussian", "n_skipped_words",
                "skipped_words", "category_separation"):
        assert key in summary
    n_categories = summary["by_matrix"]["embedding"]["n_categories"]
    assert summary["uncertainty"]["unit"] == ("word" if n_categories >= 2 else None)
    words = pd.read_parquet(outputs["table_words"])
    assert "not_single_token" in set(words["status"])  # stories260K's 512-token vocabulary lacks most words
    n_words = sum(len(v) for v in load_word_categories(WORDS).values())
    assert len(words) == n_words * len(stories_result.matrices)  # stories260K is untied: two matrices
    again = embedding_geometry(adapter, tok, load_word_categories(WORDS), model="stories", cosine_sample=300,
                               n_simplices=400, seed=1)
    pd.testing.assert_frame_equal(stories_result.metrics, again.metrics)
    other = embedding_geometry(adapter, tok, load_word_categories(WORDS), model="stories", cosine_sample=300,
                               n_simplices=400, seed=2)
    assert other.summary["pentachoron_cv"] != stories_result.summary["pentachoron_cv"]


# single-token words of stories260K's vocabulary (the shipped word lists are mostly not single tokens there)
STORY_WORDS = ["and", "was", "her", "day", "with", "said", "play", "that", "mom", "she", "you", "they", "big",
               "friend", "little", "time", "had", "there", "for", "want", "happy", "saw", "named", "but"]


def _word_geometry(tok, shift, *, seed=0, n_boot=None):
    rng = np.random.default_rng(seed)
    d = 32
    w = rng.standard_normal((512, d))
    categories = {f"c{k}": STORY_WORDS[k::4] for k in range(4)}  # 4 categories of 6 words
    for k, words in enumerate(categories.values()):
        for word in words:
            w[single_token(tok, word)[0], k] += shift
    return matrix_geometry("embedding", torch.tensor(w, dtype=torch.float32), tok, categories, cosine_sample=200,
                           n_simplices=50, min_category_words=3, seed=seed, n_boot=n_boot)


def test_category_claims_get_a_word_bootstrap_and_a_permutation_null(stories):
    _, tok = stories
    random = _word_geometry(tok, 0.0).scalars
    assert random["n_category_words"] == 24
    assert random["category_separation_p_value"] > 0.1
    assert random["category_separation_null_mean"] == pytest.approx(1.0, abs=0.01)
    lo, hi = random["category_separation_ci"]
    assert lo < 1.0 < hi
    planted = _word_geometry(tok, 3.0)
    s = planted.scalars
    assert s["category_separation_p_value"] == pytest.approx(1 / 1001)
    assert s["category_separation_ci"][0] > s["category_separation_null_q95"]
    for key in ("category_intra_cosine_mean", "category_lift_mean", "pentachoron_cv_ratio"):
        lo, hi = s[f"{key}_ci"]
        assert lo <= s[key] <= hi, key
    table = planted.categories
    assert (table["intra_cosine_ci_low"] <= table["intra_cosine"]).all()
    assert (table["intra_cosine"] <= table["intra_cosine_ci_high"]).all()


def test_word_bootstrap_equals_a_brute_force_resampling(stories):
    """Each resample: the drawn words' separation over the pairs of distinct words."""
    _, tok = stories
    m = _word_geometry(tok, 1.0, seed=2, n_boot=40)
    used = m.words[m.words["status"] == "used"]
    rng = np.random.default_rng(2)  # the matrix of _word_geometry, rebuilt
    d = 32
    weights = rng.standard_normal((512, d))
    for k in range(4):
        for word in STORY_WORDS[k::4]:
            weights[single_token(tok, word)[0], k] += 1.0
    vectors = torch.tensor(weights, dtype=torch.float32).double().numpy()[used["token_id"].to_numpy()]
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    labels = used["category"].to_numpy()
    values = []
    for draw in Bootstrap(len(labels), unit="word", seed=2, n_boot=40).index:
        within, between = [], []
        for x, y in itertools.combinations(range(len(draw)), 2):
            i, j = draw[x], draw[y]
            if i != j:
                (within if labels[i] == labels[j] else between).append(1 - unit[i] @ unit[j])
        values.append(np.mean(between) / np.mean(within))
    point = m.scalars["category_separation"]
    lo, hi = np.quantile(values, [0.025, 0.975])
    np.testing.assert_allclose(m.scalars["category_separation_ci"], [min(lo, point), max(hi, point)], rtol=1e-6)


def test_without_categories_the_summary_is_deterministic(tiny_dirs):
    adapter, tok = load_model(tiny_dirs["qwen2"]), load_tokenizer(tiny_dirs["qwen2"])
    result = embedding_geometry(adapter, tok, {"a": ["zzzqqq"], "b": ["qqqzzz"]}, model="tiny", cosine_sample=50,
                                n_simplices=20)
    assert result.summary["uncertainty"]["n_boot"] == 0 and "deterministic" in result.summary["uncertainty"]["method"]
    assert result.summary["category_separation_ci"] is None
