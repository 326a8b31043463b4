"""delta_svd against differences of the cached residuals computed directly, the model's own hidden states,
numpy's SVD, and planted update directions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.cache import stories_cache, synthetic_cache
from layerscope import LayerscopeError
from layerscope.experiments.geometry.delta_svd import EXPERIMENT, delta_svd, phase_assignment
from layerscope.jobs.writer import run_experiment


@pytest.fixture(scope="module")
def cache(stories, stories_dir, tmp_path_factory):
    adapter, tok = stories
    return stories_cache(adapter, tok, stories_dir, tmp_path_factory.mktemp("ds"))


def test_norms_agree_with_differences_of_the_cached_residuals(cache):
    result = delta_svd(cache, model="stories", prompt_set="geo", top_k=5)
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
        np.testing.assert_allclose(np.abs(np.sum(result.directions[block] * vt[:5], axis=1)), 1.0, atol=1e-5)
    i, j = 1, 3
    assert result.top1_abs_cos[i, j] == pytest.approx(abs(result.directions[i, 0] @ result.directions[j, 0]))


def test_updates_equal_the_models_own_hidden_state_differences(stories, cache):
    """The cache's block boundaries are the model's hidden states (its last entry is after the final norm)."""
    adapter, _ = stories
    result = delta_svd(cache, model="stories", prompt_set="geo", drop_first_token=False)
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
    cache = synthetic_cache(tmp_path, layers, prompt_ids=["p"] * n, categories=["c"] * n)
    result = delta_svd(cache, model="m", prompt_set="s", drop_first_token=False, top_k=2, shared_rank=1,
                       phase_boundaries=[3])
    assert np.all(result.curves["top1_energy"] > 0.999)
    np.testing.assert_allclose(result.curves["effective_rank"], 1.0, atol=0.01)
    expected = np.kron(np.eye(2), np.ones((3, 3)))  # |cos| 1 within a phase, 0 across
    np.testing.assert_allclose(result.top1_abs_cos, expected, atol=1e-3)
    np.testing.assert_allclose(result.capture, 1.0, atol=1e-3)
    s = result.summary
    assert s["phase_boundaries"] == [3]
    assert s["intra_phase_abs_cos"] == pytest.approx(1.0, abs=1e-3)
    assert s["cross_phase_abs_cos"] == pytest.approx(0.0, abs=1e-3)
    assert s["capture_random"] == pytest.approx(1 / d)
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


def test_capture_is_left_out_where_it_would_be_trivial(cache):
    # one block per phase with top_k ≤ shared_rank: the phase subspace contains the direction by construction
    result = delta_svd(cache, model="m", prompt_set="s", top_k=2, shared_rank=4, phase_boundaries=[1, 2, 3, 4])
    assert np.isnan(result.capture).all() and result.summary["capture_mean"] is None
    with pytest.raises(LayerscopeError, match="top_k"):
        delta_svd(cache, model="m", prompt_set="s", top_k=0)


def test_outputs(cache, tmp_path):
    outputs = {"table_metrics": tmp_path / "m.parquet", "table_pairs": tmp_path / "p.parquet",
               "figure_curves": tmp_path / "c.png", "figure_directions": tmp_path / "d.png",
               "summary": tmp_path / "s.json"}
    params = {name: spec["default"] for name, spec in EXPERIMENT.params.items()} | {"seed": 0}
    inputs = {"resid": str(cache.directory / "resid.safetensors"), "tokens": str(cache.directory / "tokens.parquet")}
    result = run_experiment("delta_svd", inputs, outputs, params=params, wildcards={"model": "stories", "pset": "geo"})
    assert all(p.is_file() for p in outputs.values())
    pd.testing.assert_frame_equal(result.tables["metrics"], delta_svd(cache, model="stories", prompt_set="geo").metrics)
    pairs = pd.read_parquet(outputs["table_pairs"])
    assert len(pairs) == cache.n_layers**2
    metrics = pd.read_parquet(outputs["table_metrics"])
    sv = metrics[metrics["metric"] == "singular_value"]
    assert len(sv) == cache.n_layers * 8 and (sv.groupby("block")["value"].apply(lambda v: v.is_monotonic_decreasing)).all()
