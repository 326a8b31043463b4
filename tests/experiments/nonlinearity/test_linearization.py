"""Linearization gap: exact J·v, closed forms on toy functions, order fitting, power iteration, real models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from layerscope import LayerscopeError
from layerscope.data.activations import ActivationCache, TokenSequence, extract_activations
from layerscope.model.adapter import load_model, load_tokenizer
from layerscope.experiments.nonlinearity.linearization import (
    fit_order, jacobian_spectral_norm, linearization, linearization_gap, sample_sequences,
)
from tests.helpers.cache import random_token_cache

EPS = [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
PARAMS = dict(eps=[0.01, 0.03, 0.1, 0.3], ref_eps=0.1, perturb="token", n_sequences=2, tokens_per_sequence=2,
              n_directions=2, power_iterations=8, layers=[], seed=0)


@pytest.fixture(autouse=True)
def one_thread():
    """These tests run many tiny ops; on a shared, loaded CPU two OpenMP threads make each one far slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------- toy functions


def test_gap_is_zero_for_a_linear_layer():
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 16, dtype=torch.float64)
    x = torch.randn(5, 16, dtype=torch.float64)
    v = torch.randn(5, 16, dtype=torch.float64)
    curves = linearization_gap(layer, x, v, EPS)
    assert curves.delta.min() > 1e-4 and curves.update_delta.min() > 1e-4
    assert curves.gap.max() < 1e-10 and curves.map_gap.max() < 1e-10  # affine: the expansion is exact
    # in float32 the residual is float32 rounding of f's values, not a trend in ε
    curves32 = linearization_gap(layer.float(), x.float(), v.float(), EPS)
    scale = float(curves32.fx.norm(dim=1).max())
    assert curves32.residual.max() < 1e-6 * scale


def test_gap_of_a_quadratic_update_is_the_closed_form():
    """Block f(h) = h + u(h) with the quadratic update u(h) = A (h ⊙ h): u(h+εv) − u(h) = 2ε A(h⊙v) + ε² A(v⊙v)
    and J_u v = 2 A(h⊙v), so the residual is ε²‖A(v⊙v)‖ exactly; the update's gap is
    ε‖a‖ / ‖2b + εa‖ (a = A(v⊙v), b = A(h⊙v)), the whole block's ε‖a‖ / ‖v + 2b + εa‖."""
    g = _gen(1)
    d = 8
    A = torch.randn(d, d, generator=g, dtype=torch.float64) / (4 * d)  # an update small against the stream
    x = torch.randn(4, d, generator=g, dtype=torch.float64)
    v = torch.randn(4, d, generator=g, dtype=torch.float64)
    f = lambda z: z + (z * z) @ A.T  # noqa: E731
    curves = linearization_gap(f, x, v, EPS)
    a, b = (v * v) @ A.T, (x * v) @ A.T
    update_gap, block_gap = [], []
    for k, e in enumerate(EPS):
        residual = (e**2 * a).norm(dim=1).numpy()
        update = (2 * e * b + e**2 * a).norm(dim=1).numpy()
        whole = (e * v + 2 * e * b + e**2 * a).norm(dim=1).numpy()
        np.testing.assert_allclose(curves.residual[:, k], residual, rtol=1e-8)
        np.testing.assert_allclose(curves.update_delta[:, k], update, rtol=1e-8)
        np.testing.assert_allclose(curves.gap[:, k], residual / update, rtol=1e-8)
        np.testing.assert_allclose(curves.map_gap[:, k], residual / whole, rtol=1e-8)
        update_gap.append(residual / update)
        block_gap.append(residual / whole)
    # the two definitions differ: the identity inflates the whole block's denominator
    assert np.all(curves.gap > 2 * curves.map_gap)
    # orders: the residual's exponent is exactly 2; the gap's is the slope of the closed-form gap (→ 1 as ε → 0)
    np.testing.assert_allclose(curves.residual_order(), 2.0, atol=1e-9)
    log_eps = np.log(EPS)
    expected = [np.polyfit(log_eps, np.log(np.asarray(update_gap)[:, i]), 1)[0] for i in range(4)]
    np.testing.assert_allclose(curves.gap_order(), expected, rtol=1e-8)
    assert np.all(np.abs(curves.gap_order() - 1) < 0.1)  # ε‖a‖ ≪ 2‖b‖ over this grid: gap ∝ ε
    # at h = 0 the update is purely quadratic: its linearization misses all of it (gap 1, order 0),
    # while the whole block's gap is only ε‖a‖ / ‖v + εa‖
    zero = linearization_gap(f, torch.zeros_like(x), v, EPS)
    np.testing.assert_allclose(zero.gap, 1.0, rtol=1e-12)
    np.testing.assert_allclose(zero.gap_order(), 0.0, atol=1e-9)
    np.testing.assert_allclose(zero.residual_order(), 2.0, atol=1e-9)
    for k, e in enumerate(EPS):
        np.testing.assert_allclose(zero.map_gap[:, k], (e * a.norm(dim=1) / (v + e * a).norm(dim=1)).numpy(),
                                   rtol=1e-8)


def test_jvp_gap_matches_a_finite_difference_estimate_within_its_error():
    # smooth toy f(x) = x + tanh(W x); central differences give Jv with error O(h²)
    g = _gen(2)
    W = torch.randn(12, 12, generator=g, dtype=torch.float64) / 3
    f = lambda z: z + torch.tanh(z @ W.T)  # noqa: E731
    x = torch.randn(6, 12, generator=g, dtype=torch.float64)
    v = torch.randn(6, 12, generator=g, dtype=torch.float64)
    curves = linearization_gap(f, x, v, EPS)
    # closed-form J·v for this f: v + (1 − tanh²(Wx)) ⊙ (W v)
    exact_jv = v + (1 - torch.tanh(x @ W.T) ** 2) * (v @ W.T)
    h = 1e-4
    fd_jv = (f(x + h * v) - f(x - h * v)) / (2 * h)
    fd_error = (fd_jv - exact_jv).norm(dim=1).numpy()
    assert fd_error.max() < 1e-6  # the O(h²) truncation error of central differences
    for k, e in enumerate(EPS):
        change = f(x + e * v) - f(x)
        fd_residual = (change - e * fd_jv).norm(dim=1).numpy()
        exact_residual = (change - e * exact_jv).norm(dim=1).numpy()
        np.testing.assert_allclose(curves.residual[:, k], exact_residual, rtol=1e-9, atol=1e-14)
        # the FD-based residual differs from the jvp one by at most ε·‖Jv_fd − Jv‖ (triangle inequality)
        assert np.all(np.abs(fd_residual - curves.residual[:, k]) <= e * fd_error + 1e-13)
        fd_gap = fd_residual / (change - e * v).norm(dim=1).numpy()  # the update's change
        np.testing.assert_allclose(fd_gap, curves.gap[:, k], rtol=1e-3, atol=1e-9)


@pytest.mark.parametrize("p", [1.5, 2.0, 2.5, 3.0])
def test_order_fit_recovers_p(p):
    # f(x) = x + sign(x)|x|^p at x = 0: J = I (p > 1), residual = ε^p ‖|v|^p‖ exactly
    f = lambda z: z + torch.sign(z) * z.abs() ** p  # noqa: E731
    v = torch.randn(3, 10, generator=_gen(3), dtype=torch.float64)
    x = torch.zeros_like(v)
    curves = linearization_gap(f, x, v, EPS)
    np.testing.assert_allclose(curves.residual_order(), p, atol=1e-6)
    # the update u = sign(x)|x|^p has J_u = 0 at 0: its linearization misses all of its change
    np.testing.assert_allclose(curves.gap, 1.0, rtol=1e-9)
    np.testing.assert_allclose(curves.gap_order(), 0.0, atol=1e-6)
    # and the whole map's gap is the closed form ε^(p−1)‖w‖ / ‖v + ε^(p−1) w‖ with w = sign(v)|v|^p
    w = torch.sign(v) * v.abs() ** p
    for k, e in enumerate(EPS):
        expected = (e ** (p - 1) * w.norm(dim=1) / (v + e ** (p - 1) * w).norm(dim=1)).numpy()
        np.testing.assert_allclose(curves.map_gap[:, k], expected, rtol=1e-8)


def test_orders_of_a_smooth_function_away_from_zero():
    f = lambda z: z + z**3  # noqa: E731
    x = torch.randn(4, 10, generator=_gen(4), dtype=torch.float64)
    v = torch.randn(4, 10, generator=_gen(5), dtype=torch.float64)
    curves = linearization_gap(f, x, v, [1e-5, 1e-4, 1e-3])
    np.testing.assert_allclose(curves.residual_order(), 2.0, atol=0.01)  # residual ∝ ε²
    np.testing.assert_allclose(curves.gap_order(), 1.0, atol=0.01)  # gap ∝ ε


def test_fit_order_edge_cases():
    assert np.isnan(fit_order(np.array([0.1]), np.array([[1.0]]))[0])  # one ε: no slope
    out = fit_order(np.array([0.1, 0.2]), np.array([[0.0, 1.0], [0.01, 0.04]]))
    assert np.isnan(out[0]) and out[1] == pytest.approx(2.0)


def test_bad_grids_and_shapes():
    with pytest.raises(ValueError, match="positive"):
        linearization_gap(lambda z: z, torch.zeros(1, 2), torch.ones(1, 2), [0.1, -1])
    with pytest.raises(ValueError, match="differ in shape"):
        linearization_gap(lambda z: z, torch.zeros(1, 2), torch.ones(1, 3), [0.1])
    with pytest.raises(ValueError, match="update"):
        linearization_gap(lambda z: z.sum(1, keepdim=True), torch.zeros(1, 2), torch.ones(1, 2), [0.1])


def test_power_iteration_finds_the_largest_singular_value():
    g = _gen(6)
    A = torch.randn(3, 9, 7, generator=g, dtype=torch.float64)  # one matrix per batch item
    f = lambda z: torch.einsum("bij,bj->bi", A, z)  # noqa: E731
    x = torch.randn(3, 7, generator=g, dtype=torch.float64)
    sigma, change = jacobian_spectral_norm(f, x, iterations=200, generator=_gen(7))
    exact = torch.linalg.matrix_norm(A, ord=2).numpy()
    np.testing.assert_allclose(sigma, exact, rtol=1e-6)
    assert change.max() < 1e-6
    # a few iterations give a lower bound
    rough, _ = jacobian_spectral_norm(f, x, iterations=2, generator=_gen(7))
    assert np.all(rough <= exact * (1 + 1e-12))
    # restricted to some inputs: σ_max of those columns
    mask = torch.zeros(7, dtype=torch.float64)
    mask[[1, 4]] = 1
    sub, _ = jacobian_spectral_norm(f, x, mask=mask, iterations=200, generator=_gen(8))
    np.testing.assert_allclose(sub, torch.linalg.matrix_norm(A[:, :, [1, 4]], ord=2).numpy(), rtol=1e-6)


def test_power_iteration_on_a_nonlinear_function_matches_the_explicit_jacobian():
    g = _gen(9)
    W = torch.randn(6, 6, generator=g, dtype=torch.float64)
    f = lambda z: z + torch.tanh(z @ W.T)  # noqa: E731
    x = torch.randn(1, 6, generator=g, dtype=torch.float64)
    J = torch.autograd.functional.jacobian(lambda z: f(z[None])[0], x[0])
    sigma, _ = jacobian_spectral_norm(f, x, iterations=300, generator=_gen(10))
    assert sigma[0] == pytest.approx(float(torch.linalg.matrix_norm(J, ord=2)), rel=1e-6)


# ---------------------------------------------------------------------------- real models


def _cache(adapter, tok, folder, n=4, seed=0):
    return random_token_cache(adapter, tok, folder, n=n, first_length=9, step=2, seed=seed)[0]


def _category_cache(adapter, tok, folder, categories=("a", "a", "a", "b", "b", "c", "c", "c"), seed=0):
    """Random-token sequences in file order by category (like a real prompt set)."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for i, category in enumerate(categories):
        length = 9 + (i % 3)
        ids = [1] + torch.randint(3, adapter.facts.vocab_size, (length - 1,), generator=g).tolist()
        roles = ["template"] + ["prompt"] * 3 + ["completion"] * (length - 4)
        seqs.append(TokenSequence(f"{category}{i}", category, ids, roles))
    seqs.append(TokenSequence("empty", "c", [1, 5, 6, 7], ["template", "prompt", "prompt", "prompt"]))
    extract_activations(adapter, tok, seqs, folder / "resid.safetensors", folder / "tokens.parquet", batch_size=4)
    return ActivationCache(folder)


@pytest.fixture(scope="module")
def stories64(stories_dir):
    return load_model(stories_dir, dtype="float32"), load_tokenizer(stories_dir)


def test_sampling_is_seeded_stratified_and_takes_completion_tokens(stories64, tmp_path):
    adapter, tok = stories64
    cache = _category_cache(adapter, tok, tmp_path)
    a, summary = sample_sequences(cache, n_sequences=3, tokens_per_sequence=2, seed=5)
    b, _ = sample_sequences(cache, n_sequences=3, tokens_per_sequence=2, seed=5)
    assert [(s.prompt_id, s.positions) for s in a] == [(s.prompt_id, s.positions) for s in b]
    # one prompt per category (the first three of the file are all category a), listed in the summary
    assert summary["prompt_categories"] == {"a": 1, "b": 1, "c": 1}
    assert summary["prompt_ids"] == [s.prompt_id for s in a]
    assert summary["n_empty_completions"] == 1  # the prompt without a completion is left out and counted
    tokens = cache.tokens
    for s in a:
        rows = tokens[tokens["prompt_id"] == s.prompt_id].set_index("position")
        assert all(rows.loc[p, "role"] == "completion" for p in s.positions) and len(s.positions) == 2
        assert s.rows[1] - s.rows[0] == len(s.ids)
    other, _ = sample_sequences(cache, n_sequences=3, tokens_per_sequence=2, seed=6)
    assert [(s.prompt_id, s.positions) for s in other] != [(s.prompt_id, s.positions) for s in a]


def test_linearization_on_stories(stories64, tmp_path):
    adapter, tok = stories64
    cache = _cache(adapter, tok, tmp_path)
    result = linearization(adapter, cache, model="stories", prompt_set="t", params=PARAMS)
    s = result.summary
    assert s["n_tokens"] == 4 and s["layers"] == [0, 1, 2, 3, 4]
    for key in ("gap_by_layer", "attn_gap_by_layer", "mlp_gap_by_layer", "block_gap_by_layer"):
        values = np.asarray(s[key])
        assert values.shape == (5,) and np.all((values > 0) & (values < 1)), (key, values)
    assert s["most_nonlinear_layer"] == int(np.argmax(s["gap_by_layer"]))
    assert s["most_linear_layers"] == [int(i) for i in np.argsort(s["gap_by_layer"])[:3]]
    assert s["attn_mean_gap"] == pytest.approx(np.mean(s["attn_gap_by_layer"]))
    assert s["mean_gap"] == pytest.approx(np.mean(s["gap_by_layer"]))
    lo, hi = s["residual_order_range"]
    assert 1.0 < lo <= hi < 2.2  # smooth functions: residual at most ~quadratic over the grid
    lo, hi = s["gap_order_range"]
    assert 0.0 < lo <= hi < 1.2  # and their gap at most ~linear in ε
    assert all(np.asarray(s["spectral_norm_by_layer"]) > 0.5)
    per = result.per_sample
    assert len(per) == 5 * 3 * 4 * 2 * 4  # layers × functions × tokens × directions × ε
    # the gap grows with ε for every function (a smooth function's gap ∝ ε at small ε)
    mean_gap = per.groupby(["layer", "sublayer", "eps"])["gap"].mean().unstack()
    assert (mean_gap.diff(axis=1).iloc[:, 1:] > 0).all().all()
    # the headline per-layer values are the item means of the per-sample table at ref_eps
    ref = per[np.isclose(per["eps"], 0.1)]
    for sub, key in (("block", "gap_by_layer"), ("mlp", "mlp_gap_by_layer")):
        expected = ref[ref["sublayer"] == sub].groupby("layer")["gap"].mean().to_numpy()
        np.testing.assert_allclose(s[key], expected, rtol=1e-12)
    # every interval is finite and contains its point value
    for key, value in s.items():
        if key.endswith("_ci"):
            point = np.atleast_1d(s[key[:-3]])
            pairs = np.asarray(value, dtype=float).reshape(-1, 2)
            assert np.all(np.isfinite(pairs)), key
            assert np.all((pairs[:, 0] <= point) & (point <= pairs[:, 1])), key
    assert s["uncertainty"]["unit"] == "prompt" and s["uncertainty"]["n_units"] == 2
    assert s["underpowered"] is True and any("only 2 prompts" in r for r in s["underpowered_reasons"])
    assert 0 <= s["most_nonlinear_layer_stability"] <= 1
    assert s["prompt_ids"] == sorted(set(per["prompt_id"])) and s["prompt_categories"] == {"c": 2}
    # deterministic
    again = linearization(adapter, cache, model="stories", prompt_set="t", params=PARAMS)
    assert again.summary == s


def test_headline_gap_is_the_update_gap_not_the_whole_block_gap(stories64, tmp_path):
    """Recompute one item by hand with the block's own forward: the headline divides by the change of the
    update u = f − h; the whole block's change (the definition before issue 13: what gap_by_layer was)
    is kept as block_gap_by_layer and is visibly smaller."""
    adapter, tok = stories64
    cache = _cache(adapter, tok, tmp_path, n=3)
    params = dict(PARAMS, n_sequences=3, tokens_per_sequence=1, n_directions=1, power_iterations=0)
    result = linearization(adapter, cache, model="stories", prompt_set="t", params=params)
    s, per = result.summary, result.per_sample
    item = per[(per["layer"] == 2) & (per["sublayer"] == "block") & np.isclose(per["eps"], 0.1)].iloc[0]
    seq = next(q for q in sample_sequences(cache, n_sequences=3, tokens_per_sequence=1, seed=0)[0]
               if q.prompt_id == item["prompt_id"])
    inputs = adapter.capture_block_inputs(torch.tensor([seq.ids]))
    h = cache.resid(2, slice(*seq.rows))[None]
    # the experiment's direction for this item (same generator seeding as the experiment)
    s_index = s["prompt_ids"].index(item["prompt_id"])
    generator = torch.Generator().manual_seed(0 * 1_000_003 + 2 * 1009 + s_index)
    from layerscope.experiments.nonlinearity.linearization import _directions

    v, _ = _directions(h, seq.positions, 1, generator)
    with torch.no_grad():
        f_h = adapter.run_block(2, h, inputs)
        change = adapter.run_block(2, h + 0.1 * v, inputs) - f_h
    update_change = float((change - 0.1 * v).double().norm())
    assert item["update_delta"] == pytest.approx(update_change, rel=1e-4)
    assert item["delta"] == pytest.approx(float(change.double().norm()), rel=1e-5)
    assert item["gap"] == pytest.approx(item["residual"] / update_change, rel=1e-4)
    assert item["map_gap"] == pytest.approx(item["residual"] / float(change.double().norm()), rel=1e-4)
    # on the summary: the update gap is the headline and is larger than the whole block's in every block
    update, whole = np.asarray(s["gap_by_layer"]), np.asarray(s["block_gap_by_layer"])
    assert np.all(update > 1.1 * whole), (update, whole)
    assert s["block_gap_mean"] == pytest.approx(whole.mean())


def test_intervals_resample_prompts_not_tokens(stories64, tmp_path):
    """The bootstrap unit is the prompt: the interval of gap_by_layer is the one of per-prompt sums and counts."""
    from layerscope.engines.statistics import Bootstrap, weighted_mean

    adapter, tok = stories64
    cache = _cache(adapter, tok, tmp_path, n=4)
    params = dict(PARAMS, n_sequences=4, tokens_per_sequence=2, n_directions=2, power_iterations=0, layers=[1, 3])
    result = linearization(adapter, cache, model="stories", prompt_set="t", params=params)
    s, per = result.summary, result.per_sample
    ref = per[np.isclose(per["eps"], 0.1) & (per["sublayer"] == "attn")]
    g = ref.groupby(["prompt_id", "layer"])["gap"].agg(["sum", "count"])
    sums = g["sum"].unstack().loc[s["prompt_ids"]].to_numpy()
    counts = g["count"].unstack().loc[s["prompt_ids"]].to_numpy().astype(float)
    point, ci = Bootstrap(4, seed=0).interval(sums, counts, statistic=weighted_mean)
    np.testing.assert_allclose(s["attn_gap_by_layer"], point, rtol=1e-12)
    np.testing.assert_allclose(s["attn_gap_by_layer_ci"], ci, rtol=1e-12)


@pytest.mark.parametrize("which", ["gpt2-float64", "stories-float32"])
def test_model_gap_matches_finite_differences(which, stories_dir, tiny_dirs, tmp_path):
    """On real blocks, f is the block's own forward on the whole sequence, and the jvp residual equals
    the residual with a central-difference J·v up to that difference's error. GPT-2 (LayerNorm) computes
    entirely in float64, so the difference is accurate to ~1e-9; Llama's RMSNorm computes in float32
    whatever the model dtype, so stories260K is checked in float32 against a looser bound."""
    if which == "gpt2-float64":
        folder, dtype, step, tol = tiny_dirs["gpt2"], torch.float64, 1e-5, 1e-6
    else:
        folder, dtype, step, tol = stories_dir, torch.float32, 1e-2, 2e-2
    adapter = load_model(folder, dtype=dtype)
    tok = load_tokenizer(folder)
    cache = _cache(adapter, tok, tmp_path, n=2)
    adapter.use_attention("eager")
    seq = sample_sequences(cache, n_sequences=1, tokens_per_sequence=1, seed=0)[0][0]
    inputs = adapter.capture_block_inputs(torch.tensor([seq.ids]))
    h = cache.resid(1, slice(*seq.rows), dtype=dtype)[None]
    t = seq.positions[0]
    v = torch.zeros_like(h)
    v[0, t] = torch.randn(h.shape[-1], generator=_gen(11), dtype=dtype)
    v[0, t] *= h[0, t].norm() / v[0, t].norm()
    f = lambda z: adapter.run_block(1, z, inputs)  # noqa: E731
    eps = [0.03, 0.1]
    curves = linearization_gap(f, h, v, eps)
    with torch.no_grad():
        fd_jv = (f(h + step * v) - f(h - step * v)) / (2 * step)
        for k, e in enumerate(eps):
            change = f(h + e * v) - f(h)
            fd_residual = float((change.double() - e * fd_jv.double()).norm())
            assert fd_residual == pytest.approx(curves.residual[0, k], rel=tol)
            update_change = float((change.double() - e * v.double()).norm())
            assert curves.gap[0, k] == pytest.approx(fd_residual / update_change, rel=tol)
            assert curves.map_gap[0, k] == pytest.approx(fd_residual / float(change.double().norm()), rel=tol)
            # positions before t are untouched by a perturbation at t (causal attention)
            assert change[0, :t].abs().max() == 0
            assert change[0, t:].abs().max() > 0


def test_perturb_all_mode_and_sub_layers_of_other_families(tiny_dirs, tmp_path):
    for family in ("gemma2", "gpt_neox", "gpt2"):
        adapter = load_model(tiny_dirs[family])
        tok = load_tokenizer(tiny_dirs[family])
        cache = _cache(adapter, tok, tmp_path / family, n=3)
        params = dict(PARAMS, perturb="all", n_sequences=2, tokens_per_sequence=1, power_iterations=3)
        s = linearization(adapter, cache, model=family, prompt_set="t", params=params).summary
        assert s["perturb"] == "all"
        assert np.all(np.isfinite(s["gap_by_layer"])) and np.all(np.isfinite(s["mlp_gap_by_layer"]))


def test_encoder_samples_prompt_tokens(tiny_dirs, tmp_path):
    from layerscope.data.activations import sequences_from_prompts
    from layerscope.data.prompts import Prompt

    adapter = load_model(tiny_dirs["bert"], kind="encoder")
    tok = load_tokenizer(tiny_dirs["bert"])
    prompts = [Prompt(id=f"p{i}", category="c", text=t) for i, t in
               enumerate(["Once upon a time there was a cat", "The dog ran to the park and played"])]
    seqs = sequences_from_prompts(tok, prompts)
    extract_activations(adapter, tok, seqs, tmp_path / "resid.safetensors", tmp_path / "tokens.parquet")
    cache = ActivationCache(tmp_path)
    s = linearization(adapter, cache, model="bert", prompt_set="t",
                      params=dict(PARAMS, power_iterations=2)).summary
    assert s["input_role"] == "prompt" and np.all(np.isfinite(s["gap_by_layer"]))


def test_bad_parameters_are_named(stories64, tmp_path):
    adapter, tok = stories64
    cache = _cache(adapter, tok, tmp_path, n=2)
    with pytest.raises(LayerscopeError, match="ref_eps 0.5 is not in the ε grid"):
        linearization(adapter, cache, model="s", prompt_set="t", params=dict(PARAMS, ref_eps=0.5))
    with pytest.raises(LayerscopeError, match=r"layers \[9\] outside"):
        linearization(adapter, cache, model="s", prompt_set="t", params=dict(PARAMS, layers=[9]))
    with pytest.raises(LayerscopeError, match="at least two positive"):
        linearization(adapter, cache, model="s", prompt_set="t", params=dict(PARAMS, eps=[0.1], ref_eps=0.1))
