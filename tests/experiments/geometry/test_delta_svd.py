"""delta_svd against differences of the cached residuals computed directly, the model's own hidden states,
numpy's SVD, planted update directions, independent random directions (the capture null), and a brute-force
bootstrap over prompts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.cache import stories_cache, synthetic_cache
from layerscope import LayerscopeError
from layerscope.engines.statistics import Bootstrap
from layerscope.experiments.geometry.delta_svd import (EXPERIMENT, SEED_PHASES, delta_svd, direction_statistics,
                                                     phase_assignment, seed_phase_boundaries)
from layerscope.model.generate import ROLES
from layerscope.jobs.writer import run_experiment


@pytest.fixture(scope="module")
def cache(stories, stories_dir, tmp_path_factory):
    adapter, tok = stories
    return stories_cache(adapter, tok, stories_dir, tmp_path_factory.mktemp("ds"))


def test_norms_agree_with_differences_of_the_cached_residuals(cache):
    result = delta_svd(cache, model="stories", prompt_set="geo", roles=ROLES, top_k=5, n_null=10, n_boot=10)
    tokens = cache.tokens
    keep = (tokens["position"] != 0).to_numpy()  # first token of each sequence dropped
    everything = load_file(str(cache.directory / "resid.safetensors"))
    for block in range(cache.n_layers):
        h = everything[f"resid.{block}"].double().numpy()[keep]
        delta = everything[f"resid.{block + 1}"].double().numpy()[keep] - h
        tn = np.linalg.norm(delta, axis=1)
        hn = np.linalg.norm(h, axis=1)
        cos = np.einsum("nd,nd->n", delta, h) / (tn * hn)
        np.testing.assert_allclose(result.token_norms[block], tn, rtol=1e-5)
        s = np.linalg.svd(delta, compute_uv=False)
        _, _, vt = np.linalg.svd(delta, full_matrices=False)
        p = s**2 / (s**2).sum()
        expected = {
            "frobenius": np.linalg.norm(delta), "token_norm_mean": tn.mean(), "token_norm_std": tn.std(),
            "h_norm_mean": hn.mean(), "rel_step_mean": (tn / hn).mean(), "rel_step_std": (tn / hn).std(),
            "cos_delta_h_mean": cos.mean(), "abs_cos_delta_h_mean": np.abs(cos).mean(),
            "parallel_fraction": (tn**2 * cos**2).sum() / (tn**2).sum(),
            "effective_rank": np.exp(-(p[p > 0] * np.log(p[p > 0])).sum()), "participation_ratio": 1 / (p**2).sum(),
            "top1_energy": p[0], "top3_energy": p[:3].sum(), "top10_energy": p[:10].sum(),
        }
        for metric, value in expected.items():
            assert result.curves[metric][block] == pytest.approx(value, rel=1e-6), (metric, block)
        np.testing.assert_allclose(result.singular_values[block], s[:5], rtol=1e-6)
        # a singular vector is determined (up to sign) only as well as its gap to its neighbours: the Gram
        # eigensolver and the SVD agree to ~eps·σ₁²/gap, so only well-separated ones are compared
        gap = np.minimum(np.abs(np.diff(s**2, prepend=np.inf)), np.abs(np.diff(s**2, append=0.0)))[:5] / s[0] ** 2
        separated = gap > 1e-6
        assert separated[0]
        np.testing.assert_allclose(np.abs(np.sum(result.directions[block] * vt[:5], axis=1))[separated], 1.0,
                                   atol=1e-5)
    i, j = 1, 3
    assert result.top1_abs_cos[i, j] == pytest.approx(abs(result.directions[i, 0] @ result.directions[j, 0]))


def test_updates_equal_the_models_own_hidden_state_differences(stories, cache):
    """The cache's block boundaries are the model's hidden states (its last entry is after the final norm)."""
    adapter, _ = stories
    result = delta_svd(cache, model="stories", prompt_set="geo", roles=ROLES, drop_first_token=False, n_null=10,
                       n_boot=10)
    norms = []
    with torch.no_grad():
        for _, group in cache.tokens.groupby("prompt_id", sort=False):
            out = adapter.model(torch.tensor([group["token_id"].tolist()]), output_hidden_states=True)
            hs = out.hidden_states
            norms.append(np.stack([(hs[b + 1][0] - hs[b][0]).norm(dim=1).numpy() for b in range(adapter.n_layers - 1)]))
    np.testing.assert_allclose(result.token_norms[: adapter.n_layers - 1], np.concatenate(norms, axis=1),
                               rtol=1e-4, atol=1e-5)


def test_planted_update_directions(tmp_path):
    rng = np.random.default_rng(0)
    n, d, blocks = 200, 24, 6
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0]
    # blocks 0-2 write along e0 (+ tiny noise), blocks 3-5 along e1: two phases of shared directions
    layers = [rng.standard_normal((n, d)) * 5]
    for b in range(blocks):
        direction = basis[:, 0] if b < 3 else basis[:, 1]
        update = np.outer(rng.standard_normal(n), direction) + 1e-4 * rng.standard_normal((n, d))
        layers.append(layers[-1] + update)
    cache = synthetic_cache(tmp_path, layers, prompt_ids=[f"p{i // 10}" for i in range(n)], categories=["c"] * n)
    result = delta_svd(cache, model="m", prompt_set="s", drop_first_token=False, top_k=2, shared_rank=1,
                       phase_boundaries=[3], n_null=200, n_boot=100)
    assert np.all(result.curves["top1_energy"] > 0.999)
    np.testing.assert_allclose(result.curves["effective_rank"], 1.0, atol=0.01)
    expected = np.kron(np.eye(2), np.ones((3, 3)))  # |cos| 1 within a phase, 0 across
    np.testing.assert_allclose(result.top1_abs_cos, expected, atol=1e-3)
    np.testing.assert_allclose(result.capture, 1.0, atol=1e-3)
    s = result.summary
    assert s["phase_boundaries"] == [3]
    assert s["intra_phase_abs_cos"] == pytest.approx(1.0, abs=1e-3)
    assert s["cross_phase_abs_cos"] == pytest.approx(0.0, abs=1e-3)
    # the others' shared direction captures each block's own: far above independent random directions
    assert s["capture_null_mean"] == pytest.approx(1 / d, rel=0.25)
    assert s["capture_p_value"] == pytest.approx(1 / 201) and s["capture_mean_ci"][0] > 0.99
    assert (result.phases["capture_p_holm"] < 0.05).all()
    assert s["adjacent_top1_abs_cos_mean"] == pytest.approx(4 / 5, abs=1e-3)


def test_phase_assignment():
    assert phase_assignment(30) == ([8, 15, 22], [0] * 8 + [1] * 7 + [2] * 7 + [3] * 8)
    assert phase_assignment(4, fractions=(0.1, 0.5)) == ([2], [0, 0, 1, 1])  # round(0.4) = 0 is dropped
    assert phase_assignment(5, boundaries=[1, 4]) == ([1, 4], [0, 1, 1, 1, 2])
    for bad in ([0], [3, 2], [2, 2], [5]):
        with pytest.raises(LayerscopeError, match="phase_boundaries"):
            phase_assignment(5, boundaries=bad)
    with pytest.raises(LayerscopeError, match="phase_fractions"):
        phase_assignment(5, fractions=(1.5,))


def _named_phase_by_depth(n_blocks):
    """Plain loop: block b gets the last named phase whose 64-block start is at most b·64/L (fractions)."""
    return [[name for name, start in SEED_PHASES if start <= b * 64 / n_blocks][-1] for b in range(n_blocks)]


@pytest.mark.parametrize("n_blocks, boundaries, names", [
    (64, [7, 10, 32, 47, 59], ["A", "B", "C", "D", "E", "tail"]),  # the reference itself
    (28, [4, 5, 14, 21, 26], ["A", "B", "C", "D", "E", "tail"]),  # the documented mapping
    (30, [4, 5, 15, 23, 28], ["A", "B", "C", "D", "E", "tail"]),  # SmolLM2-135M
    (5, [1, 3, 4], ["A", "C", "D", "E"]),  # B and tail hold no block: dropped with their names
])
def test_seed_phase_scheme_maps_depth_to_the_documented_boundaries(n_blocks, boundaries, names):
    got, got_names = seed_phase_boundaries(n_blocks)
    assert (got, got_names) == (boundaries, names)
    _, phase = phase_assignment(n_blocks, got)
    assert [got_names[p] for p in phase] == _named_phase_by_depth(n_blocks)


def test_seed_phases_in_the_summary(cache):
    result = delta_svd(cache, model="m", prompt_set="s", top_k=2, shared_rank=2, phase_scheme="seed", n_null=5, n_boot=10)
    s = result.summary
    n = cache.n_layers
    assert s["phase_scheme"] == "seed" and s["phase_boundaries"] == seed_phase_boundaries(n)[0]
    assert [row["name"] for row in s["phases"]] == s["phase_names"] == seed_phase_boundaries(n)[1]
    named = _named_phase_by_depth(n)
    for row in s["phases"]:
        assert named[row["first_block"]] == named[row["last_block"]] == row["name"]
    with pytest.raises(LayerscopeError, match="phase_boundaries null"):
        delta_svd(cache, model="m", prompt_set="s", phase_scheme="seed", phase_boundaries=[2])
    with pytest.raises(LayerscopeError, match="phases must be one of"):
        delta_svd(cache, model="m", prompt_set="s", phase_scheme="named")


def test_capture_is_left_out_for_a_block_alone_in_its_phase(cache):
    # one block per phase: no other block's directions to share
    result = delta_svd(cache, model="m", prompt_set="s", top_k=2, shared_rank=4, phase_boundaries=[1, 2, 3, 4],
                       n_boot=10)
    assert np.isnan(result.capture).all() and result.summary["capture_mean"] is None
    assert result.summary["capture_p_value"] is None and result.summary["n_null"] == 0
    with pytest.raises(LayerscopeError, match="top_k"):
        delta_svd(cache, model="m", prompt_set="s", top_k=0)


def test_outputs(cache, tmp_path):
    outputs = {"table_metrics": tmp_path / "m.parquet", "table_pairs": tmp_path / "p.parquet",
               "figure_curves": tmp_path / "c.png", "figure_directions": tmp_path / "d.png",
               "summary": tmp_path / "s.json"}
    params = {name: spec["default"] for name, spec in EXPERIMENT.params.items()} | {"seed": 0, "n_null": 100}
    inputs = {"resid": str(cache.directory / "resid.safetensors"), "tokens": str(cache.directory / "tokens.parquet")}
    result = run_experiment("delta_svd", inputs, outputs, params=params, wildcards={"model": "stories", "pset": "geo"})
    assert all(p.is_file() for p in outputs.values())
    summary = result.summary
    assert summary["uncertainty"]["unit"] == "prompt" and summary["roles"] == ["prompt", "completion"]
    for key in ("capture_mean", "intra_phase_abs_cos", "rel_step_mean", "top1_energy_max"):
        if summary[key] is not None:
            lo, hi = summary[f"{key}_ci"]
            assert np.isfinite([lo, hi]).all() and lo <= summary[key] <= hi, key
    assert 0 <= summary["top1_energy_max_block_stability"] <= 1
    pd.testing.assert_frame_equal(result.tables["metrics"], delta_svd(cache, model="stories", prompt_set="geo",
                                                                              n_null=100).metrics)
    pairs = pd.read_parquet(outputs["table_pairs"])
    assert len(pairs) == cache.n_layers**2
    metrics = pd.read_parquet(outputs["table_metrics"])
    sv = metrics[metrics["metric"] == "singular_value"]
    assert len(sv) == cache.n_layers * 8 and (sv.groupby("block")["value"].apply(lambda v: v.is_monotonic_decreasing)).all()


def _random_direction_cache(folder, *, n_blocks=8, d=48, k=4, n_prompts=30, tokens=12, seed=0):
    """Every block writes along its own random k-dimensional frame (scales 4, 3, 2, 1): nothing is shared."""
    rng = np.random.default_rng(seed)
    n = n_prompts * tokens
    layers = [rng.standard_normal((n, d))]
    for _ in range(n_blocks):
        frame = np.linalg.qr(rng.standard_normal((d, k)))[0]
        update = (rng.standard_normal((n, k)) * np.arange(k, 0, -1)) @ frame.T + 0.01 * rng.standard_normal((n, d))
        layers.append(layers[-1] + update)
    return synthetic_cache(folder, layers, prompt_ids=[f"p{i // tokens}" for i in range(n)],
                           categories=[f"c{i // tokens % 3}" for i in range(n)])


def test_independent_random_directions_are_captured_at_chance(tmp_path):
    """Leave-one-out capture of directions that share nothing equals its null, over independent caches; the
    basis that contains the block's own direction (the old definition, against shared_rank/d) reported ≈ 6×
    chance here."""
    observed, null_means, null_spread, self_included = [], [], [], []
    for seed in range(6):
        cache = _random_direction_cache(tmp_path / str(seed), seed=seed)
        result = delta_svd(cache, model="m", prompt_set="s", drop_first_token=False, top_k=4, shared_rank=4,
                           phase_boundaries=[4], n_null=300, n_boot=20, seed=seed)
        s = result.summary
        observed.append(s["capture_mean"])
        null_means.append(s["capture_null_mean"])
        null_spread.append(np.nanmean(result.capture_null, axis=1).std())
        self_included.append(np.nanmean(result.capture_self_included))
        assert s["capture_p_value"] > 0.001
    assert np.mean(null_means) == pytest.approx(4 / 48, rel=0.05)  # E‖Bᵀv‖² = r/d for an independent v
    assert abs(np.mean(observed) - np.mean(null_means)) < 3 * np.mean(null_spread) / np.sqrt(6)
    assert np.mean(self_included) > 4 * np.mean(null_means)


def test_leave_one_out_capture_excludes_the_blocks_own_directions():
    from layerscope.engines.geometry import capture, leave_one_out_capture, orthonormal_basis

    rng = np.random.default_rng(1)
    d, k = 20, 3
    frames = np.stack([np.linalg.qr(rng.standard_normal((d, k)))[0].T for _ in range(4)])
    for include_self in (False, True):  # against an SVD of the stacked directions
        out = leave_one_out_capture(frames, [0, 0, 0, 0], rank=k, include_self=include_self)
        for i in range(4):
            stack = np.concatenate([frames[j] for j in range(4) if include_self or j != i])
            assert out[i] == pytest.approx(capture(orthonormal_basis(stack, k), frames[i, 0]), abs=1e-10)
    q = np.linalg.qr(rng.standard_normal((d, 2 * k)))[0].T
    shared = np.stack([q[:k], q[k:], q[k:], q[k:]])  # block 0 alone in its directions, 1-3 share theirs
    out = leave_one_out_capture(shared, [0, 0, 0, 0], rank=k)
    np.testing.assert_allclose(out, [0, 1, 1, 1], atol=1e-10)
    lone = np.stack([q[:k], q[k:]])  # two blocks with orthogonal directions: nothing shared ...
    assert leave_one_out_capture(lone, [0, 0], rank=2 * k) == pytest.approx([0, 0], abs=1e-12)
    # ... yet a basis that contains the block's own directions captures them fully
    assert leave_one_out_capture(lone, [0, 0], rank=2 * k, include_self=True) == pytest.approx([1, 1])
    assert np.isnan(leave_one_out_capture(frames, [0, 1, 1, 1], rank=k)[0])  # alone in its phase


def test_bootstrap_over_prompts_equals_a_brute_force_recomputation(cache):
    """With ritz_dim = d the resampled directions are exact: every resample recomputed from the weighted
    token updates gives the same interval; the token means come from per-prompt sums."""
    n_boot = 40
    result = delta_svd(cache, model="m", prompt_set="s", roles=ROLES, top_k=3, shared_rank=3,
                       phase_boundaries=[2], n_null=20, n_boot=n_boot, seed=3)
    s = result.summary
    everything = load_file(str(cache.directory / "resid.safetensors"))
    tokens = cache.tokens
    keep = (tokens["position"] != 0).to_numpy()
    prompts = tokens["prompt_id"].to_numpy()[keep]
    ids = list(dict.fromkeys(prompts))
    index = Bootstrap(len(ids), seed=3, n_boot=n_boot).index
    deltas = [everything[f"resid.{b + 1}"].double().numpy()[keep] - everything[f"resid.{b}"].double().numpy()[keep]
              for b in range(cache.n_layers)]
    hs = [everything[f"resid.{b}"].double().numpy()[keep] for b in range(cache.n_layers)]
    _, phase = phase_assignment(cache.n_layers, [2])
    captures, rel_steps = [], []
    for draw in index:
        weight = np.bincount(draw, minlength=len(ids))[[ids.index(p) for p in prompts]].astype(float)
        dirs = np.stack([np.linalg.eigh((dl * weight[:, None]).T @ dl)[1][:, ::-1][:, :3].T for dl in deltas])
        captures.append(direction_statistics(dirs, phase, 3)["capture_mean"])
        rel_steps.append(np.mean([(weight * np.linalg.norm(dl, axis=1) / np.linalg.norm(h, axis=1)).sum() / weight.sum()
                                  for dl, h in zip(deltas, hs)]))

    def interval(values, point):
        lo, hi = np.quantile(values, [0.025, 0.975])
        return [min(lo, point), max(hi, point)]

    np.testing.assert_allclose(s["capture_mean_ci"], interval(captures, s["capture_mean"]), rtol=1e-6)
    np.testing.assert_allclose(s["rel_step_mean_ci"], interval(rel_steps, s["rel_step_mean"]), rtol=1e-9)
    assert s["uncertainty"]["unit"] == "prompt" and s["uncertainty"]["n_units"] == len(ids) == 5
    assert s["prompt_categories"] == {"story": 2, "animals": 2, "park": 1}


def test_a_smaller_ritz_span_approximates_the_exact_bootstrap(cache):
    exact = delta_svd(cache, model="m", prompt_set="s", roles=ROLES, top_k=2, shared_rank=2, phase_boundaries=[2],
                      n_null=20, n_boot=100).summary
    approx = delta_svd(cache, model="m", prompt_set="s", roles=ROLES, top_k=2, shared_rank=2, phase_boundaries=[2],
                       n_null=20, n_boot=100, ritz_dim=24).summary
    assert exact["ritz_dim"] == cache.d_model and approx["ritz_dim"] == 24
    assert approx["capture_mean"] == pytest.approx(exact["capture_mean"], rel=1e-9)  # the point is exact
    for key in ("capture_mean_ci", "intra_phase_abs_cos_ci", "adjacent_top1_abs_cos_mean_ci"):
        width = exact[key][1] - exact[key][0]
        np.testing.assert_allclose(approx[key], exact[key], atol=0.25 * width + 1e-9, err_msg=key)
