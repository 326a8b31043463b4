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
from layerscope.engines.statistics import Bootstrap
from layerscope.experiments.cross_model.cross_model import (
    _zero_diagonal, cka_from_grams, cka_matrix, cross_model_cka, debiased_cka_resampled, debiased_cka_uncertainty,
    gram, hsic_unbiased, hsic_unbiased_weighted, linear_cka, procrustes_alignment, retrieval_scores,
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


def brute_force_weighted_hsic_u(k, l, w):
    """The U-statistic over 4-tuples of distinct units, each weighted by the product of multiplicities."""
    num = den = 0.0
    for i, j, q, r in itertools.permutations(range(len(w)), 4):
        weight = w[i] * w[j] * w[q] * w[r]
        num += weight * (k[i, j] * l[i, j] + k[i, j] * l[q, r] - 2 * k[i, j] * l[i, q])
        den += weight
    return num / den


def test_resampled_debiased_hsic_is_the_u_statistic_over_distinct_prompts():
    x, y = reps(n=7, d=5, seed=20), reps(n=7, d=4, seed=21)
    k, l = gram(x), gram(y)
    ka, kb = _zero_diagonal([k]), _zero_diagonal([l])
    cross, self_a, self_b = hsic_unbiased_weighted(ka, kb, np.ones(7))
    assert cross[0, 0] == pytest.approx(hsic_unbiased(k, l), rel=1e-12)  # no resampling: the estimator itself
    assert self_a[0] == pytest.approx(hsic_unbiased(k, k), rel=1e-12)
    for w in ([2, 0, 1, 1, 3, 0, 0], [1, 1, 2, 0, 1, 1, 1]):
        w = np.array(w, dtype=float)
        cross, self_a, self_b = hsic_unbiased_weighted(ka, kb, w)
        assert cross[0, 0] == pytest.approx(brute_force_weighted_hsic_u(k, l, w), rel=1e-10)
        assert self_b[0] == pytest.approx(brute_force_weighted_hsic_u(l, l, w), rel=1e-10)
        # invariant to re-centring the features on the resample (the Grams need not be rebuilt)
        shift = gram(y - y[w > 0].mean(0))
        assert hsic_unbiased_weighted(ka, _zero_diagonal([shift]), w)[0][0, 0] == pytest.approx(cross[0, 0], rel=1e-9)
    assert np.isnan(hsic_unbiased_weighted(ka, kb, np.array([4, 3, 0, 0, 0, 0, 0.0]))[0]).all()  # < 4 prompts
    grams_a = [gram(reps(n=9, d=6, seed=s)) for s in range(3)]
    grams_b = [gram(reps(n=9, d=5, seed=30 + s)) for s in range(2)]
    np.testing.assert_allclose(debiased_cka_resampled(_zero_diagonal(grams_a), _zero_diagonal(grams_b), np.ones(9)),
                               cka_matrix(grams_a, grams_b, debiased=True), rtol=1e-12, atol=1e-14)


def test_the_bootstrap_of_the_debiased_cka_is_not_inflated_by_repeated_prompts():
    """Unrelated representations: resamples stay near 0 (the plain estimator on a resample with copies of
    prompts paired with each other scores ~0.8 here)."""
    x, z = reps(n=40, d=300, seed=22), reps(n=40, d=200, seed=23)
    grams_a, grams_b = [gram(x)], [gram(z)]
    point = cka_matrix(grams_a, grams_b, debiased=True)
    boot = Bootstrap(40, n_boot=300, seed=1)
    _, values = boot.distribution(lambda idx: np.stack([debiased_cka_resampled(
        _zero_diagonal(grams_a), _zero_diagonal(grams_b), np.bincount(row.astype(int), minlength=40))[0, 0]
        for row in idx]), np.arange(40))
    assert abs(np.median(values) - point[0, 0]) < 0.05 and np.quantile(values, 0.975) < 0.3
    naive = [linear_cka(x[row], z[row], debiased=True) for row in boot.index[:20]]
    assert np.mean(naive) > 0.5  # what the plain estimator gives on the same resamples


def test_debiased_cka_headlines_get_intervals_and_the_best_pair_a_stability():
    u = reps(n=30, d=4, seed=24)
    rng = np.random.default_rng(0)
    a = [u @ rng.standard_normal((4, 20)) * s + rng.standard_normal((30, 20)) for s in (0.1, 1.0, 3.0)]
    b = [u @ rng.standard_normal((4, 16)) * s + rng.standard_normal((30, 16)) for s in (0.1, 3.0)]
    grams_a, grams_b = [gram(x) for x in a], [gram(y) for y in b]
    debiased = cka_matrix(grams_a, grams_b, debiased=True)
    boot = Bootstrap(30, n_boot=300, seed=2)
    out = debiased_cka_uncertainty(grams_a, grams_b, debiased, boot)
    for name, point in (("max", np.nanmax(debiased)), ("final", debiased[-1, -1]), ("mean", debiased.mean())):
        lo, hi = out[f"cka_debiased_{name}_ci"]
        assert np.isfinite([lo, hi]).all() and lo <= point <= hi
    assert np.unravel_index(np.argmax(debiased), debiased.shape) == (2, 1)  # the strongly shared layers
    assert out["cka_debiased_max_pair_stability"] > 0.9
    assert out["cka_debiased_max_layer_a_stability"] >= out["cka_debiased_max_pair_stability"]


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
    # float32 states from a padded batch vs a single forward (~1e-7 apart); with 6 prompts the debiased
    # estimator amplifies that cancellation, hence 1e-5
    for i, j in itertools.product(range(5), range(4)):
        for debiased, matrix in ((False, result.cka), (True, result.cka_debiased)):
            assert matrix[i, j] == pytest.approx(linear_cka(ha[i], hb[j], debiased=debiased), abs=1e-5)
    table = result.table
    assert len(table) == 24 and table["cka"].between(0, 1 + 1e-9).all()
    assert s["cka_max"] == pytest.approx(float(np.nanmax(result.cka)))
    assert s["uncertainty"]["unit"] == "prompt" and s["uncertainty"]["n_units"] == 6
    lo, hi = s["cka_debiased_max_ci"]
    assert np.isfinite([lo, hi]).all() and lo <= s["cka_debiased_max"] <= hi
    assert 0 <= s["cka_debiased_max_pair_stability"] <= 1 and s["prompt_categories"] == {"c": 6}
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


def test_knn_overlap_does_not_count_a_point_as_its_own_neighbour():
    """Each mapped row retrieves its own target (top-1 = 1) but its other neighbours are unrelated to the
    target's: the overlap is at chance, k/(n − 1). Counting the point itself gave 0.17 here."""
    rng = np.random.default_rng(0)
    n, k = 120, 10
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    own = 1.5 * np.eye(n)  # a component only the row and its own target share
    target = np.hstack([own, unit(rng.standard_normal((n, 16)))])
    mapped = np.hstack([own, unit(rng.standard_normal((n, 16)))])
    scores = retrieval_scores(mapped, target, k, chunk=50)
    assert scores["top1"].all()
    assert scores["knn_overlap"].mean() == pytest.approx(k / (n - 1), abs=0.03)
    # the definition, with a plain loop: k nearest among the other target rows, by cosine
    cos = unit(mapped) @ unit(target).T
    true = unit(target) @ unit(target).T
    for i in range(0, n, 7):
        others = np.delete(np.arange(n), i)
        near_m = set(others[np.argsort(-cos[i, others], kind="stable")[:k]])
        near_t = set(others[np.argsort(-true[i, others], kind="stable")[:k]])
        assert scores["knn_overlap"][i] == pytest.approx(len(near_m & near_t) / k)
    # identical spaces: 1 either way
    assert retrieval_scores(target, target, k)["knn_overlap"].mean() == pytest.approx(1.0)


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
    # held-out scores: intervals over held-out tokens that contain them
    assert summary["uncertainty"]["unit"] == "held-out token" and summary["uncertainty"]["n_units"] == 256
    for key in ("heldout_cosine_mean", "heldout_knn_overlap_at_10", "heldout_top1_retrieval",
                "heldout_relative_residual", "random_rotation_heldout_cosine_mean",
                "random_rotation_heldout_knn_overlap_at_10"):
        lo, hi = summary[f"{key}_ci"]
        assert np.isfinite([lo, hi]).all() and lo <= summary[key] <= hi
    scored = frame.dropna(subset=["ci_lo"])
    assert len(scored) == 12 and ((scored["ci_lo"] <= scored["value"]) & (scored["value"] <= scored["ci_hi"])).all()


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
    assert summary["uncertainty"]["n_boot"] == 0 and summary["underpowered"] is False


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
