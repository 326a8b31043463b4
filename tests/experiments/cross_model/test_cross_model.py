"""cross_model: CKA against independent formulas and the models' own hidden states; Procrustes recovery."""

from __future__ import annotations

import itertools
import json
import shutil

import numpy as np
import pytest
import torch
from scipy.stats import ortho_group

from tests.helpers import REPO, save_tiny_model
from layerscope import LayerscopeError
from layerscope.jobs import config as lsconfig
from layerscope.jobs.writer import run_experiment
from layerscope.experiments.cross_model.cross_model import (
    cka_from_grams, cka_matrix, cross_model_cka, gram, hsic_unbiased, linear_cka, procrustes_alignment,
    shared_vocabulary,
)


def reps(n=20, d=30, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d))


# ---------------------------------------------------------------------------- CKA


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_of_a_representation_with_itself_is_one(debiased):
    x = reps()
    assert linear_cka(x, x, debiased=debiased) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_is_invariant_to_orthogonal_transforms_isotropic_scaling_and_translation(debiased):
    x, y = reps(seed=1), reps(d=25, seed=2) + 0.3 * reps(seed=1)[:, :25]
    base = linear_cka(x, y, debiased=debiased)
    q = ortho_group.rvs(30, random_state=3)
    assert linear_cka(x @ q, y, debiased=debiased) == pytest.approx(base, abs=1e-12)
    assert linear_cka(7.5 * x, 0.01 * y, debiased=debiased) == pytest.approx(base, abs=1e-12)
    assert linear_cka(x + 4.0, y - 2.0, debiased=debiased) == pytest.approx(base, abs=1e-12)
    # ... but not to an anisotropic scaling of the features (the test can fail)
    scale = np.ones(30)
    scale[:3] = 50.0
    assert abs(linear_cka(x * scale, y, debiased=debiased) - base) > 1e-3


def test_biased_cka_equals_the_feature_space_formula():
    x, y = reps(seed=4), reps(d=12, seed=5)
    xc, yc = x - x.mean(0), y - y.mean(0)
    feature = np.linalg.norm(yc.T @ xc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc))
    assert linear_cka(x, y) == pytest.approx(feature, rel=1e-12)


def brute_force_hsic_u(k, l):
    """Song et al. (2012), the U-statistic over distinct quadruples, with a plain loop."""
    n = k.shape[0]
    total = 0.0
    for i, j, q, r in itertools.permutations(range(n), 4):
        total += k[i, j] * l[i, j] + k[i, j] * l[q, r] - 2 * k[i, j] * l[i, q]
    return total / (n * (n - 1) * (n - 2) * (n - 3))


def test_debiased_hsic_equals_the_u_statistic():
    x, y = reps(n=7, d=5, seed=6), reps(n=7, d=4, seed=7)
    k, l = gram(x), gram(y)
    assert hsic_unbiased(k, l) == pytest.approx(brute_force_hsic_u(k, l), rel=1e-10)
    expected = brute_force_hsic_u(k, l) / np.sqrt(brute_force_hsic_u(k, k) * brute_force_hsic_u(l, l))
    assert cka_from_grams(k, l, debiased=True) == pytest.approx(expected, rel=1e-10)


def test_debiased_cka_removes_the_small_sample_inflation():
    x, z = reps(n=20, d=30, seed=8), reps(n=20, d=50, seed=9)  # unrelated
    assert linear_cka(x, z) > 0.4  # the biased estimator with n < d
    assert abs(linear_cka(x, z, debiased=True)) < 0.15


def test_cka_matrix_entries_are_pairwise_ckas():
    a = [reps(n=12, d=6, seed=s) for s in range(3)]
    b = [reps(n=12, d=4, seed=10 + s) + a[s % 3][:, :4] for s in range(4)]
    for debiased in (False, True):
        m = cka_matrix([gram(x) for x in a], [gram(y) for y in b], debiased=debiased)
        for i, j in itertools.product(range(3), range(4)):
            assert m[i, j] == pytest.approx(linear_cka(a[i], b[j], debiased=debiased), abs=1e-12)
    with pytest.raises(LayerscopeError, match="same samples"):
        linear_cka(reps(n=5), reps(n=6))


PROMPTS = ["Once upon a time there was a girl", "The dog ran to the park", "A big cat sat on the mat",
           "Tom and Sue went home", "One day a bird sang", "The sun was warm and bright"]


def make_cache(model_dir, folder, order=None, prompts=PROMPTS):
    """An activation cache of the prompts (ids p0, p1, … by their position in ``prompts``), in ``order``."""
    from layerscope.data.activations import ActivationCache, extract_activations, sequences_from_prompts
    from layerscope.model.adapter import load_model, load_tokenizer
    from layerscope.data.prompts import Prompt

    adapter, tok = load_model(model_dir), load_tokenizer(model_dir)
    order = range(len(prompts)) if order is None else order
    items = [Prompt(id=f"p{i}", category="c", text=prompts[i]) for i in order]
    extract_activations(adapter, tok, sequences_from_prompts(tok, items), folder / "resid.safetensors",
                        folder / "tokens.parquet", batch_size=3)
    return ActivationCache(folder), adapter, tok


def pooled_hidden_states(adapter, tok, prompts=PROMPTS):
    """Per layer: each prompt's hidden states from the model's own forward, mean over non-special tokens."""
    per_layer = None
    for text in prompts:
        enc = tok(text, return_tensors="pt", return_special_tokens_mask=True)
        keep = enc["special_tokens_mask"][0] == 0
        with torch.no_grad():
            out = adapter.model(input_ids=enc["input_ids"], output_hidden_states=True)
        states = [h[0, keep].double().mean(0).numpy() for h in out.hidden_states]
        per_layer = [[s] for s in states] if per_layer is None else [p + [s] for p, s in zip(per_layer, states)]
    return [np.stack(p) for p in per_layer]


def test_cka_between_a_decoder_and_an_encoder_matches_their_own_hidden_states(stories_dir, tiny_dirs, tmp_path):
    cache_a, dec, dec_tok = make_cache(stories_dir, tmp_path / "a")
    cache_b, enc, enc_tok = make_cache(tiny_dirs["bert"], tmp_path / "b", order=[5, 3, 1, 0, 2, 4])  # another order
    result = cross_model_cka(cache_a, cache_b, model_a="stories", model_b="bert", prompt_set="p")
    s = result.summary
    assert (s["n_prompts"], s["layers_a"], s["layers_b"]) == (6, 5, 3)
    assert result.cka.shape == (6, 4)
    ha, hb = pooled_hidden_states(dec, dec_tok), pooled_hidden_states(enc, enc_tok)
    # Llama's hidden_states[i] is resid.i for i < L (its last entry is after the final norm); BERT's are all resid.i
    for i, j in itertools.product(range(5), range(4)):
        for debiased, matrix in ((False, result.cka), (True, result.cka_debiased)):
            assert matrix[i, j] == pytest.approx(linear_cka(ha[i], hb[j], debiased=debiased), abs=1e-6)
    table = result.table
    assert len(table) == 24 and table["cka"].between(0, 1 + 1e-9).all()
    assert s["cka_max"] == pytest.approx(float(np.nanmax(result.cka)))
    # a model against itself: the diagonal is 1
    self_result = cross_model_cka(cache_a, cache_a, model_a="s", model_b="s", prompt_set="p")
    np.testing.assert_allclose(np.diag(self_result.cka), 1.0, atol=1e-10)
    np.testing.assert_allclose(np.diag(self_result.cka_debiased), 1.0, atol=1e-10)


def test_cka_needs_enough_shared_prompts(stories_dir, tmp_path):
    cache_a, _, _ = make_cache(stories_dir, tmp_path / "a")
    cache_b, _, _ = make_cache(stories_dir, tmp_path / "b", prompts=["Once upon a time there was a girl", "Hi", "x"])
    with pytest.raises(LayerscopeError, match=r"only 3 prompt\(s\) in both"):  # matched by prompt id
        cross_model_cka(cache_a, cache_b, model_a="a", model_b="b", prompt_set="p")


# ---------------------------------------------------------------------------- Procrustes


def test_a_random_rotation_of_an_embedding_is_recovered(stories):
    adapter, _ = stories
    emb = adapter.embed.weight.detach()
    rotated = emb.double() @ torch.as_tensor(ortho_group.rvs(emb.shape[1], random_state=11))
    summary, frame = procrustes_alignment(emb, rotated, seed=0, knn=10)
    assert summary["heldout_cosine_mean"] == pytest.approx(1.0, abs=1e-9)
    assert summary["heldout_knn_overlap_at_10"] == pytest.approx(1.0)
    assert summary["heldout_top1_retrieval"] == pytest.approx(1.0)
    assert summary["heldout_relative_residual"] < 1e-9
    assert abs(summary["random_rotation_heldout_cosine_mean"]) < 0.3
    assert summary["random_rotation_heldout_knn_overlap_at_10"] < 0.2
    assert abs(summary["identity_heldout_cosine_mean"]) < 0.3
    assert (summary["n_train"], summary["n_heldout"]) == (256, 256)
    assert set(frame["method"]) == {"procrustes", "random_rotation", "identity"}


def test_procrustes_reduces_the_wider_model_by_pca(stories):
    adapter, _ = stories
    emb = adapter.embed.weight.detach()
    wide = emb.double() @ torch.as_tensor(ortho_group.rvs(96, random_state=12)[:64])  # 64 → 96 dims, isometric
    summary, _ = procrustes_alignment(wide, emb, seed=1, train_fraction=0.6)
    assert (summary["pca_reduced"], summary["common_width"]) == ("a", 64)
    assert summary["pca_variance_retained"] == pytest.approx(1.0, abs=1e-9)
    assert summary["heldout_cosine_mean"] == pytest.approx(1.0, abs=1e-8)
    assert "identity_heldout_cosine_mean" not in summary  # no identity baseline across a PCA
    noisy = emb.double() + 0.5 * emb.double().std() * torch.randn(emb.shape, generator=torch.Generator().manual_seed(0))
    summary, _ = procrustes_alignment(emb, noisy, seed=2)
    assert 0.5 < summary["heldout_cosine_mean"] < 0.99
    assert summary["heldout_cosine_mean"] > summary["random_rotation_heldout_cosine_mean"] + 0.4


def test_procrustes_split_is_seeded(stories):
    adapter, _ = stories
    emb = adapter.embed.weight.detach()
    other = emb.double() + 0.3 * torch.randn(emb.shape, generator=torch.Generator().manual_seed(1))
    a, _ = procrustes_alignment(emb, other, seed=5)
    b, _ = procrustes_alignment(emb, other, seed=5)
    c, _ = procrustes_alignment(emb, other, seed=6)
    assert a == b and a["heldout_cosine_mean"] != c["heldout_cosine_mean"]


def test_procrustes_between_prepared_models_sharing_or_not_a_tokenizer(stories_dir, tmp_path):
    from layerscope.model.adapter import load_tokenizer

    tiny = save_tiny_model("llama", tmp_path / "tiny", stories_dir)  # stories' tokenizer, width 32
    out = {"summary": tmp_path / "s.json", "table_metrics": tmp_path / "m.parquet"}
    params = {"train_fraction": 0.5, "knn": 10, "max_eval_tokens": 100, "seed": 0}

    def procrustes(model_b, name):
        return run_experiment("cross_model_procrustes", {"model_a": stories_dir, "model_b": model_b}, out,
                              params=params, wildcards={"model_a": "stories", "model_b": name}).summary

    summary = procrustes(tiny, "tiny")
    assert summary["applicable"] and summary["same_tokenizer"]
    assert (summary["n_shared"], summary["n_heldout"], summary["pca_reduced"]) == (512, 100, "a")
    assert json.loads(out["summary"].read_text())["model_b"] == "tiny"
    # another tokenizer: two tokens swap their ids
    other = tmp_path / "other"
    shutil.copytree(tiny, other)
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    first, second = list(vocab)[100:102]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (other / "tokenizer.json").write_text(json.dumps(spec))
    shared = shared_vocabulary(load_tokenizer(stories_dir), load_tokenizer(other))
    assert not shared["same_tokenizer"] and shared["n_shared_tokens"] == 512
    summary = procrustes(other, "other")
    assert summary["applicable"] is False and "tokenizer" in summary["reason"]


# ---------------------------------------------------------------------------- configuration


def config_with(models, experiments):
    return lsconfig.validate_config({
        "models": {m: {"source": {"type": "local", "path": "/x"}} for m in models},
        "prompt_sets": {"core": {"path": "resources/prompt_sets/core.json"}},
        "experiments": experiments,
    }, REPO / lsconfig.SCHEMA_FILE, base_dir=REPO)


def test_pair_runs_and_their_summary_paths():
    cfg = config_with(["a", "b", "c"], {"cross_model": {}, "weight_spectra": {"models": ["a"]}})
    summaries = lsconfig.all_summaries(cfg)
    assert "results/cross_model/cka/core/a/b/summary.json" in summaries
    assert "results/cross_model/procrustes/b/c/summary.json" in summaries
    assert sum("/cka/" in s for s in summaries) == 3 and sum("/procrustes/" in s for s in summaries) == 3
    assert "results/a/weight_spectra/summary.json" in summaries
    assert lsconfig.model_summaries(cfg, "a") == ["results/a/weight_spectra/summary.json"]
    assert lsconfig.experiment_params(cfg, "cross_model")["pooled_tokens"] == "prompt"
    single = config_with(["a"], {"cross_model": {}})
    assert lsconfig.experiment_runs(single, "cross_model_cka") == lsconfig.experiment_runs(single, "cross_model_procrustes") == []


def test_pair_summary_paths_are_labelled_in_the_cross_model_table():
    from layerscope.report.pages import parse_summary_path

    assert parse_summary_path("results/cross_model/cka/core/a/b/summary.json") == {
        "model": "a vs b", "prompt_set": "core", "experiment": "cross_model/cka"}
    assert parse_summary_path("results/cross_model/procrustes/a/b/summary.json") == {
        "model": "a vs b", "prompt_set": "", "experiment": "cross_model/procrustes"}
    assert parse_summary_path("results/a/weight_spectra/summary.json")["experiment"] == "weight_spectra"


@pytest.mark.parametrize("models, psets, expected", [
    (["cross_model"], ["core"], "'cross_model' is reserved"),
    (["a"], ["weight_spectra"], "'weight_spectra' is the name of a weights-only experiment"),
])
def test_reserved_names_are_refused(models, psets, expected):
    cfg = {"models": {m: {"source": {"type": "local", "path": "/x"}} for m in models},
           "prompt_sets": {p: {"path": "resources/prompt_sets/core.json"} for p in psets},
           "experiments": {"weight_spectra": {}}}
    with pytest.raises(lsconfig.ConfigError, match=expected):
        lsconfig.validate_config(cfg, REPO / lsconfig.SCHEMA_FILE, base_dir=REPO)


def test_weight_experiment_parameters_are_validated():
    with pytest.raises(lsconfig.ConfigError, match="degenerate_fraction"):
        config_with(["a"], {"weight_spectra": {"degenerate_fraction": 2}})
    with pytest.raises(lsconfig.ConfigError, match="pooled_tokens"):
        config_with(["a", "b"], {"cross_model": {"pooled_tokens": "completion"}})
    cfg = config_with(["a"], {"weight_topology": {}})
    assert lsconfig.experiment_params(cfg, "weight_topology")["abs_thresholds"] == [0.0001, 0.001, 0.01, 0.1]
