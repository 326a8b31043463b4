"""Linearization gap: exact J·v, closed forms on toy functions, order fitting, power iteration, real models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from layerscope import LayerscopeError
from layerscope.data.activations import ActivationCache, extract_activations
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
    assert curves.delta.min() > 1e-4
    assert curves.gap.max() < 1e-10  # affine: the expansion is exact up to rounding
    # in float32 the residual is float32 rounding of f's values, not a trend in ε
    curves32 = linearization_gap(layer.float(), x.float(), v.float(), EPS)
    scale = float(curves32.fx.norm(dim=1).max())
    assert curves32.residual.max() < 1e-6 * scale


def test_gap_of_a_quadratic_is_the_closed_form():
    # f(x) = x + c ⊙ x ⊙ x: f(x+εv) − f(x) − εJv = ε² c ⊙ v ⊙ v exactly
    g = _gen(1)
    c = torch.randn(8, generator=g, dtype=torch.float64)
    x = torch.randn(4, 8, generator=g, dtype=torch.float64)
    v = torch.randn(4, 8, generator=g, dtype=torch.float64)
    f = lambda z: z + c * z * z  # noqa: E731
    curves = linearization_gap(f, x, v, EPS)
    for k, e in enumerate(EPS):
        residual = (e**2 * c * v * v).norm(dim=1).numpy()
        delta = (e * (v + 2 * c * x * v) + e**2 * c * v * v).norm(dim=1).numpy()
        np.testing.assert_allclose(curves.residual[:, k], residual, rtol=1e-8)
        np.testing.assert_allclose(curves.gap[:, k], residual / delta, rtol=1e-8)
    np.testing.assert_allclose(curves.order(), 2.0, atol=1e-6)


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
        fd_gap = fd_residual / change.norm(dim=1).numpy()
        np.testing.assert_allclose(fd_gap, curves.gap[:, k], rtol=1e-3, atol=1e-9)


@pytest.mark.parametrize("p", [1.5, 2.0, 2.5, 3.0])
def test_order_fit_recovers_p(p):
    # f(x) = x + sign(x)|x|^p at x = 0: J = I (p > 1), residual = ε^p ‖|v|^p‖ exactly
    f = lambda z: z + torch.sign(z) * z.abs() ** p  # noqa: E731
    v = torch.randn(3, 10, generator=_gen(3), dtype=torch.float64)
    x = torch.zeros_like(v)
    curves = linearization_gap(f, x, v, EPS)
    np.testing.assert_allclose(curves.order(), p, atol=1e-6)
    # and the gap is the closed form ε^(p−1)‖w‖ / ‖v + ε^(p−1) w‖ with w = sign(v)|v|^p
    w = torch.sign(v) * v.abs() ** p
    for k, e in enumerate(EPS):
        expected = (e ** (p - 1) * w.norm(dim=1) / (v + e ** (p - 1) * w).norm(dim=1)).numpy()
        np.testing.assert_allclose(curves.gap[:, k], expected, rtol=1e-8)


def test_order_of_a_smooth_function_away_from_zero_is_two():
    f = lambda z: z + z**3  # noqa: E731
    x = torch.randn(4, 10, generator=_gen(4), dtype=torch.float64)
    v = torch.randn(4, 10, generator=_gen(5), dtype=torch.float64)
    order = linearization_gap(f, x, v, [1e-5, 1e-4, 1e-3]).order()
    np.testing.assert_allclose(order, 2.0, atol=0.01)


def test_fit_order_edge_cases():
    assert np.isnan(fit_order(np.array([0.1]), np.array([[1.0]]))[0])  # one ε: no slope
    out = fit_order(np.array([0.1, 0.2]), np.array([[0.0, 1.0], [0.01, 0.04]]))
    assert np.isnan(out[0]) and out[1] == pytest.approx(2.0)


def test_bad_grids_and_shapes():
    with pytest.raises(ValueError, match="positive"):
        linearization_gap(lambda z: z, torch.zeros(1, 2), torch.ones(1, 2), [0.1, -1])
    with pytest.raises(ValueError, match="differ in shape"):
        linearization_gap(lambda z: z, torch.zeros(1, 2), torch.ones(1, 3), [0.1])


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


@pytest.fixture(scope="module")
def stories64(stories_dir):
    return load_model(stories_dir, dtype="float32"), load_tokenizer(stories_dir)


def test_sampling_is_seeded_and_takes_completion_tokens(stories64, tmp_path):
    adapter, tok = stories64
    cache = _cache(adapter, tok, tmp_path)
    a = sample_sequences(cache, n_sequences=3, tokens_per_sequence=2, seed=5)
    b = sample_sequences(cache, n_sequences=3, tokens_per_sequence=2, seed=5)
    assert [(s.prompt_id, s.positions) for s in a] == [(s.prompt_id, s.positions) for s in b]
    tokens = cache.tokens
    for s in a:
        rows = tokens[tokens["prompt_id"] == s.prompt_id].set_index("position")
        assert all(rows.loc[p, "role"] == "completion" for p in s.positions) and len(s.positions) == 2
        assert s.rows[1] - s.rows[0] == len(s.ids)


def test_linearization_on_stories(stories64, tmp_path):
    adapter, tok = stories64
    cache = _cache(adapter, tok, tmp_path)
    result = linearization(adapter, cache, model="stories", prompt_set="t", params=PARAMS)
    s = result.summary
    assert s["n_tokens"] == 4 and s["layers"] == [0, 1, 2, 3, 4]
    for key in ("gap_by_layer", "attn_gap_by_layer", "mlp_gap_by_layer"):
        values = np.asarray(s[key])
        assert values.shape == (5,) and np.all((values > 0) & (values < 1)), (key, values)
    assert s["most_nonlinear_layer"] == int(np.argmax(s["gap_by_layer"]))
    assert s["most_linear_layers"] == [int(i) for i in np.argsort(s["gap_by_layer"])[:3]]
    assert s["attn_mean_gap"] == pytest.approx(np.mean(s["attn_gap_by_layer"]))
    lo, hi = s["order_range"]
    assert 1.0 < lo <= hi < 2.2  # smooth functions: residual at most ~quadratic over the grid
    assert all(np.asarray(s["spectral_norm_by_layer"]) > 0.5)
    per = result.per_sample
    assert len(per) == 5 * 3 * 4 * 2 * 4  # layers × functions × tokens × directions × ε
    # the gap grows with ε for every function (a smooth function's gap ∝ ε at small ε)
    mean_gap = per.groupby(["layer", "sublayer", "eps"])["gap"].mean().unstack()
    assert (mean_gap.diff(axis=1).iloc[:, 1:] > 0).all().all()
    # deterministic
    again = linearization(adapter, cache, model="stories", prompt_set="t", params=PARAMS)
    assert again.summary == s


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
    seq = sample_sequences(cache, n_sequences=1, tokens_per_sequence=1, seed=0)[0]
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
            assert curves.gap[0, k] == pytest.approx(fd_residual / float(change.double().norm()), rel=tol)
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
