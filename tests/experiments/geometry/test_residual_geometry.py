"""residual_geometry against direct computations on the whole cache loaded at once, and planted structure."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.cache import stories_cache, synthetic_cache
from layerscope import LayerscopeError
from layerscope.data.activations import ActivationCache, extract_activations, sequences_from_prompts
from layerscope.model.adapter import load_model, load_tokenizer
from layerscope.experiments.geometry.residual_geometry import EXPERIMENT, residual_geometry, select_rows
from layerscope.jobs.writer import run_experiment
from layerscope.data.prompts import Prompt


@pytest.fixture(scope="module")
def cache(stories, stories_dir, tmp_path_factory):
    adapter, tok = stories
    return stories_cache(adapter, tok, stories_dir, tmp_path_factory.mktemp("rg"))


def test_layer0_norms_equal_the_embedding_norms_of_the_tokens(stories, cache):
    adapter, _ = stories
    result = residual_geometry(cache, model="stories", prompt_set="geo")
    ids = torch.tensor(cache.tokens.set_index("row").loc[result.rows, "token_id"].to_numpy())
    expected = adapter.embed.weight.detach()[ids].double().norm(dim=1).numpy()  # stories260K scales nothing
    np.testing.assert_allclose(result.norms[0], expected, rtol=1e-6)
    assert result.curves["norm_mean"][0] == pytest.approx(expected.mean(), rel=1e-9)
    assert result.curves["norm_max"][0] == pytest.approx(expected.max(), rel=1e-6)


def test_every_layer_metric_equals_a_direct_computation(cache):
    roles = ["prompt", "completion"]
    result = residual_geometry(cache, model="stories", prompt_set="geo", roles=roles, massive_ratio=8.0)
    tokens = cache.tokens
    keep = tokens["role"].isin(roles).to_numpy()
    everything = load_file(str(cache.directory / "resid.safetensors"))  # the whole cache, independently
    prompts = tokens.loc[keep, "prompt_id"].to_numpy()
    category = dict(zip(tokens["prompt_id"], tokens["category"]))
    for layer in range(cache.n_layers + 1):
        h = everything[f"resid.{layer}"].double().numpy()[keep]
        norms = np.linalg.norm(h, axis=1)
        lam = np.sort(np.linalg.eigvalsh(np.cov(h, rowvar=False)))[::-1]
        unit = h / norms[:, None]
        cos = unit @ unit.T
        off = ~np.eye(len(h), dtype=bool)
        centred = h - h.mean(axis=0)
        cunit = centred / np.linalg.norm(centred, axis=1, keepdims=True)
        expected = {
            "norm_mean": norms.mean(), "norm_std": norms.std(), "norm_median": np.median(norms), "norm_min": norms.min(),
            "norm_max": norms.max(), "norm_p99": np.percentile(norms, 99),
            "participation_ratio": lam.sum() ** 2 / (lam**2).sum(), "isotropy": 1 - lam[0] / lam.sum(),
            "top_eigen_fraction": lam[0] / lam.sum(), "mean_cosine": cos[off].mean(),
            "mean_cosine_centered": (cunit @ cunit.T)[off].mean(),
        }
        for metric, value in expected.items():
            assert result.curves[metric][layer] == pytest.approx(value, rel=1e-6, abs=1e-9), (metric, layer)
        # category separation from mean-pooled prompts, by a plain loop over prompt pairs
        ids = list(dict.fromkeys(prompts))
        means = {p: h[prompts == p].mean(axis=0) for p in ids}
        within, between = [], []
        for a, b in itertools.combinations(ids, 2):
            (within if category[a] == category[b] else between).append(np.linalg.norm(means[a] - means[b]))
        assert result.curves["category_separation"][layer] == pytest.approx(np.mean(between) / np.mean(within),
                                                                            rel=1e-9)
        # massive activations: |h| ≥ 8 × median |h|, per dimension
        a = np.abs(h)
        median = np.median(a.astype(np.float32))
        counts = (a >= 8.0 * median).sum(axis=0)
        assert result.curves["n_massive_dims"][layer] == (counts > 0).sum()
        assert result.curves["n_massive_activations"][layer] == counts.sum()
        flagged = result.massive[result.massive["layer"] == layer]
        assert set(flagged["dim"]) == set(np.nonzero(counts)[0])
        for row in flagged.itertuples():
            assert row.n_massive_tokens == counts[row.dim]
            assert row.value == pytest.approx(everything[f"resid.{layer}"][row.row, row.dim].item())
    assert result.curves["n_massive_dims"].sum() > 0, "the check above must see some massive activations"


def test_planted_massive_dimension_and_categories(tmp_path):
    rng = np.random.default_rng(0)
    n, d = 60, 16
    prompt_ids = [f"p{i // 6}" for i in range(n)]  # 10 prompts of 6 tokens
    categories = ["x" if i // 6 < 5 else "y" for i in range(n)]
    layers = []
    for layer in range(3):
        h = rng.standard_normal((n, d))
        if layer >= 1:
            h[np.arange(0, n, 6), 7] = 500.0  # every prompt's first token carries a massive dim 7
        if layer == 2:
            h += np.where(np.array(categories)[:, None] == "x", 3.0, -3.0) * np.eye(d)[3]  # categories separate
        layers.append(h)
    cache = synthetic_cache(tmp_path, layers, prompt_ids=prompt_ids, categories=categories)
    result = residual_geometry(cache, model="m", prompt_set="s", massive_ratio=100, massive_top_tokens=3)
    s = result.summary
    assert s["massive_dims"] == [7] and s["massive_first_layer"] == 1 and s["n_massive_layers"] == 2
    assert result.curves["n_massive_activations"].tolist() == [0, 10, 10]
    top = result.massive[(result.massive["layer"] == 1)]
    assert len(top) == 3 and set(top["position"]) == {0}
    assert s["massive"]["7"]["layers"] == [1, 2]
    assert result.curves["category_separation"][2] > 1.5 > result.curves["category_separation"][0]
    assert s["final_category_separation"] == pytest.approx(result.curves["category_separation"][2])
    assert s["pr_min_layer"] in (1, 2) and s["pr_min"] < 1.1  # one massive direction holds the variance
    without_first = residual_geometry(cache, model="m", prompt_set="s", drop_first_token=True)
    assert without_first.summary["massive_dims"] == [] and len(without_first.rows) == n - 10


def test_row_selection_and_bad_input(cache):
    tokens = cache.tokens
    rows = select_rows(tokens, ["completion"], drop_first_token=False)
    assert set(tokens.loc[rows, "role"]) == {"completion"}
    rows = select_rows(tokens, ["template", "prompt", "completion", "system"], drop_first_token=True)
    assert len(rows) == len(tokens) - tokens["prompt_id"].nunique()
    with pytest.raises(LayerscopeError, match="unknown token role"):
        select_rows(tokens, ["answer"])
    with pytest.raises(LayerscopeError, match="massive_ratio"):
        residual_geometry(cache, model="m", prompt_set="s", massive_ratio=0.5)
    with pytest.raises(LayerscopeError, match="fewer than 2 tokens"):
        residual_geometry(cache, model="m", prompt_set="s", roles=["system"])


def test_outputs_are_written_and_deterministic(cache, tmp_path):
    outputs = {"table_metrics": tmp_path / "m.parquet", "table_massive": tmp_path / "x.parquet",
               "figure_curves": tmp_path / "c.png", "figure_massive": tmp_path / "f.png", "summary": tmp_path / "s.json"}
    params = {name: spec["default"] for name, spec in EXPERIMENT.params.items()} | {"seed": 0}
    inputs = {"resid": str(cache.directory / "resid.safetensors"), "tokens": str(cache.directory / "tokens.parquet")}
    first = run_experiment("residual_geometry", inputs, outputs, params=params,
                           wildcards={"model": "stories", "pset": "geo"})
    assert all(p.is_file() for p in outputs.values())
    frame = pd.read_parquet(outputs["table_metrics"])
    assert {"model", "prompt_set", "layer", "metric", "value"} <= set(frame.columns)
    assert len(frame) == (cache.n_layers + 1) * frame["metric"].nunique()
    second = residual_geometry(cache, model="stories", prompt_set="geo")
    pd.testing.assert_frame_equal(first.tables["metrics"], second.metrics)
    for key in ("pr_min", "pr_min_layer", "norm_growth", "final_category_separation", "massive_dims"):
        assert key in first.summary
    assert first.summary["norm_growth"] == pytest.approx(second.curves["norm_mean"][-1] / second.curves["norm_mean"][0])


def test_encoder_cache(tiny_dirs, tmp_path):
    adapter, tok = load_model(tiny_dirs["bert"]), load_tokenizer(tiny_dirs["bert"])
    prompts = [Prompt(f"p{i}", "ab"[i % 2], text) for i, text in enumerate(
        ["A cat sat.", "The dog ran to the park.", "One day a bird sang.", "Tom had a ball."])]
    extract_activations(adapter, tok, sequences_from_prompts(tok, prompts), tmp_path / "resid.safetensors",
                        tmp_path / "tokens.parquet")
    result = residual_geometry(ActivationCache(tmp_path), model="bert", prompt_set="p")
    assert result.summary["n_layers"] == adapter.n_layers
    assert np.isfinite(result.curves["participation_ratio"]).all()
    assert np.isfinite(result.curves["category_separation"]).all()
