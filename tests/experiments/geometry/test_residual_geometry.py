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
from layerscope.engines.statistics import Bootstrap


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
    result = residual_geometry(cache, model="stories", prompt_set="geo", roles=roles, massive_ratio=8.0,
                               massive_tokens="selected", n_perm=10, n_boot=10)
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
    result = residual_geometry(cache, model="m", prompt_set="s", drop_first_token=False, massive_ratio=100,
                               massive_top_tokens=3, n_perm=200, n_boot=200)
    s = result.summary
    assert s["massive_dims"] == [7] and s["massive_first_layer"] == 1 and s["n_massive_layers"] == 2
    assert result.curves["n_massive_activations"].tolist() == [0, 10, 10]
    top = result.massive[(result.massive["layer"] == 1)]
    assert len(top) == 3 and set(top["position"]) == {0}
    assert s["massive"]["7"]["layers"] == [1, 2]
    assert result.curves["category_separation"][2] > 1.5 > result.curves["category_separation"][0]
    assert s["final_category_separation"] == pytest.approx(result.curves["category_separation"][2])
    assert s["pr_min_layer"] in (1, 2) and s["pr_min"] < 1.1  # one massive direction holds the variance
    assert s["final_category_separation_p_value"] < 0.01 and s["final_category_separation_ci"][0] > 1.5
    # the default leaves position 0 (the sink) out of the statistics but still finds its massive activations
    default = residual_geometry(cache, model="m", prompt_set="s", n_perm=20, n_boot=20)
    assert len(default.rows) == n - 10 and default.summary["massive_dims"] == [7]
    assert default.summary["n_massive_tokens_searched"] == n and default.summary["pr_min"] > 3
    only_selected = residual_geometry(cache, model="m", prompt_set="s", massive_tokens="selected", n_perm=20,
                                      n_boot=20)
    assert only_selected.summary["massive_dims"] == []


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
    assert first.summary["roles"] == ["prompt", "completion"] and first.summary["drop_first_token"] is True
    for key in ("norm_first", "norm_last", "norm_growth", "final_category_separation"):
        lo, hi = first.summary[f"{key}_ci"]
        assert np.isfinite([lo, hi]).all() and lo <= first.summary[key] <= hi, key
    assert first.summary["uncertainty"]["unit"] == "prompt" and first.summary["n_perm"] == 1000
    assert first.summary["underpowered"]  # five prompts
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


def _prompts_with_a_system_message(n_prompts=24, system=10, text=8, d=12, seed=0):
    """Every prompt: the same ``system`` rows (an identical system message), then its own text rows."""
    system_rows = np.random.default_rng([seed, 1]).standard_normal((system, d)) * 3 + 5
    texts = np.random.default_rng([seed, 2]).standard_normal((n_prompts, text, d)) * np.linspace(0.5, 2, d)
    rows, prompt_ids, roles = [], [], []
    for p in range(n_prompts):
        rows += [system_rows, texts[p]]
        prompt_ids += [f"p{p}"] * (system + text)
        roles += ["system"] * system + ["prompt"] * text
    return np.concatenate(rows), prompt_ids, roles


def test_copies_of_one_system_message_no_longer_change_the_participation_ratio(tmp_path):
    """The old default pooled every prompt's copy of the system message (PR 3.0 here instead of 8.0)."""
    h, prompt_ids, roles = _prompts_with_a_system_message()
    categories = [f"c{int(p[1:]) % 3}" for p in prompt_ids]
    cache = synthetic_cache(tmp_path / "a", [h, 2 * h], prompt_ids=prompt_ids, categories=categories, roles=roles)
    result = residual_geometry(cache, model="m", prompt_set="s", n_perm=20, n_boot=20)
    own = h[np.array(roles) == "prompt"]  # position 0 is a system token: the default leaves out no text token
    lam = np.linalg.eigvalsh(np.cov(own, rowvar=False))
    assert result.curves["participation_ratio"][0] == pytest.approx(lam.sum() ** 2 / (lam**2).sum(), rel=1e-6)
    # a shorter system message, the same prompt texts: the same geometry
    fewer = _prompts_with_a_system_message(system=3)
    fewer_cache = synthetic_cache(tmp_path / "b", [fewer[0], 2 * fewer[0]], prompt_ids=fewer[1],
                                  categories=categories[: len(fewer[1])], roles=fewer[2])
    again = residual_geometry(fewer_cache, model="m", prompt_set="s", n_perm=20, n_boot=20)
    np.testing.assert_allclose(again.curves["participation_ratio"], result.curves["participation_ratio"], rtol=1e-6)
    pooled = residual_geometry(cache, model="m", prompt_set="s", roles=["system", "prompt"], n_perm=20, n_boot=20)
    assert pooled.curves["participation_ratio"][0] < 0.5 * result.curves["participation_ratio"][0]


def _prompt_cloud(folder, *, n_prompts=30, tokens=4, d=8, shift=0.0, seed=0):
    rng = np.random.default_rng(seed)
    categories = [f"c{p % 3}" for p in range(n_prompts)]
    layers = []
    for layer in range(3):
        h = rng.standard_normal((n_prompts * tokens, d))
        if layer == 2:
            h[:, 0] += shift * np.repeat([int(c[1]) for c in categories], tokens)
        layers.append(h)
    return synthetic_cache(folder, layers, prompt_ids=[f"p{i // tokens}" for i in range(n_prompts * tokens)],
                           categories=[c for c in categories for _ in range(tokens)])


def test_the_permutation_null_of_randomly_labelled_prompts_gives_a_large_p(tmp_path):
    result = residual_geometry(_prompt_cloud(tmp_path / "r"), model="m", prompt_set="s", drop_first_token=False)
    s = result.summary
    assert s["final_category_separation_p_value"] > 0.2 and s["category_separation_max_p_value"] > 0.2
    assert s["final_category_separation_null_mean"] == pytest.approx(1.0, abs=0.02)
    assert s["final_category_separation_ci"][0] < 1 < s["final_category_separation_ci"][1]
    assert any("permutation null" in reason for reason in s["underpowered_reasons"])
    assert result.separation_null.shape == (1000, 3)
    planted = residual_geometry(_prompt_cloud(tmp_path / "p", shift=1.5), model="m", prompt_set="s",
                                drop_first_token=False).summary
    assert planted["final_category_separation_p_value"] == pytest.approx(1 / 1001)
    assert planted["category_separation_max_layer_stability"] == 1.0
    assert planted["final_category_separation_ci"][0] > planted["final_category_separation_null_q95"]


def test_separation_interval_equals_a_brute_force_bootstrap(tmp_path):
    """Each resample's separation from its drawn prompts' pooled means, every pair of distinct prompts."""
    cache = _prompt_cloud(tmp_path, n_prompts=12, shift=0.7)
    result = residual_geometry(cache, model="m", prompt_set="s", drop_first_token=False, n_boot=60, seed=4)
    h = np.asarray(cache.resid(2, slice(0, 48)), dtype=np.float64)
    means = h.reshape(12, 4, -1).mean(axis=1)
    labels = np.array([p % 3 for p in range(12)])
    values = []
    for draw in Bootstrap(12, seed=4, n_boot=60).index:
        within, between = [], []
        for x, y in itertools.combinations(range(12), 2):
            i, j = draw[x], draw[y]
            if i != j:
                (within if labels[i] == labels[j] else between).append(np.linalg.norm(means[i] - means[j]))
        values.append(np.mean(between) / np.mean(within))
    point = result.summary["final_category_separation"]
    lo, hi = np.quantile(values, [0.025, 0.975])
    np.testing.assert_allclose(result.summary["final_category_separation_ci"], [min(lo, point), max(hi, point)],
                               rtol=1e-9)
