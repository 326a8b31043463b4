"""embedding_geometry against direct computations, planted structure, and the word-list loader."""

from __future__ import annotations

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
    params = {"categories": str(WORDS), "cosine_sample": 300, "n_simplices": 400, "min_category_words": 3, "seed": 1}
    written = run_experiment("embedding_geometry", {"model": str(stories_dir), "categories": str(WORDS)}, outputs,
                             params=params, wildcards={"model": "stories"})
    assert all(p.is_file() for p in outputs.values())
    pd.testing.assert_frame_equal(written.tables["metrics"], stories_result.metrics)
    summary = json.loads(outputs["summary"].read_text())
    for key in ("participation_ratio", "dims_90", "pentachoron_cv", "pentachoron_cv_gaussian", "n_skipped_words",
                "skipped_words", "category_separation"):
        assert key in summary
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
