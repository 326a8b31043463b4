"""weight_spectra: planted spectra give their closed forms, jumps and degenerate matrices are named."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from layerscope.model.adapter import ModelAdapter
from layerscope.experiments.weights.weight_spectra import (
    EXPERIMENT, degenerate_matrices, layer_jumps, to_result, weight_spectra,
)
from layerscope.jobs.writer import write_result
from layerscope.engines.weights import weight_inventory
from tests.helpers.tiny_models import tiny_model


def with_spectrum(sigma, m, n, seed=0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((m, m)))
    v, _ = np.linalg.qr(rng.standard_normal((n, n)))
    s = np.zeros((m, n))
    s[: len(sigma), : len(sigma)] = np.diag(sigma)
    return torch.as_tensor(u @ s @ v.T, dtype=torch.float32)


Q = 0.7  # geometric decay of the planted q.2 spectrum


@pytest.fixture(scope="module")
def planted():
    """Tiny Llama (d=32, 3 layers) with q.0 rank 4, q.1 flat, q.2 geometric, gate.1 rank 1."""
    model = tiny_model("llama")
    adapter = ModelAdapter(model)
    with torch.no_grad():
        attn = [adapter.attention(i) for i in range(3)]
        attn[0].q_proj.weight.copy_(with_spectrum([2.0] * 4, 32, 32, seed=1))
        attn[1].q_proj.weight.copy_(with_spectrum([0.5] * 32, 32, 32, seed=2))
        attn[2].q_proj.weight.copy_(with_spectrum(Q ** np.arange(32), 32, 32, seed=3))
        adapter.mlp(1).gate_proj.weight.copy_(with_spectrum([3.0], 48, 32, seed=4))
    return adapter, weight_spectra(adapter, model="planted", top_k=5)


def row(result, name):
    table = result.table.set_index("name")
    return table.loc[name]


def test_planted_spectra_match_their_closed_forms(planted):
    _, result = planted
    rank4 = row(result, "q.0")
    assert rank4["entropy_effective_rank"] == pytest.approx(4.0, rel=1e-5)
    assert rank4["entropy_effective_rank_ratio"] == pytest.approx(4.0 / 32, rel=1e-5)
    assert rank4["participation_ratio"] == pytest.approx(4.0, rel=1e-5)
    assert rank4["stable_rank"] == pytest.approx(4.0, rel=1e-5)
    assert rank4["spectral_norm"] == pytest.approx(2.0, rel=1e-5)
    assert rank4["condition_number"] > 1e5  # rank-deficient: zero singular values up to float32 rounding
    flat = row(result, "q.1")
    for metric in ("entropy_effective_rank", "participation_ratio", "stable_rank"):
        assert flat[metric] == pytest.approx(32.0, rel=1e-5)
    assert flat["entropy_effective_rank_ratio"] == pytest.approx(1.0, rel=1e-5)
    assert flat["condition_number"] == pytest.approx(1.0, rel=1e-5)
    assert flat["frobenius_norm"] == pytest.approx(0.5 * np.sqrt(32), rel=1e-5)
    geometric = row(result, "q.2")
    sigma = Q ** np.arange(32)
    p = sigma**2 / (sigma**2).sum()
    r = Q**2
    assert geometric["entropy_effective_rank"] == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-5)
    assert geometric["participation_ratio"] == pytest.approx((1 + r) / (1 - r) * (1 - r**32) ** 2 / (1 - r**64),
                                                             rel=1e-5)
    assert geometric["stable_rank"] == pytest.approx((1 - r**32) / (1 - r), rel=1e-5)
    assert geometric["condition_number"] == pytest.approx(Q**-31, rel=1e-3)


def test_roy_vetterli_effective_rank_is_theirs(planted):
    """Roy & Vetterli's effective rank uses p = σ/Σσ; the σ² (energy) entropy rank is a different number and
    is not reported under their name."""
    _, result = planted
    geometric = row(result, "q.2")
    sigma = Q ** np.arange(32)
    p = sigma / sigma.sum()
    roy = np.exp(-(p * np.log(p)).sum())
    assert geometric["roy_vetterli_effective_rank"] == pytest.approx(roy, rel=1e-5)
    assert geometric["roy_vetterli_effective_rank_ratio"] == pytest.approx(roy / 32, rel=1e-5)
    assert abs(geometric["entropy_effective_rank"] - roy) > 0.5  # the energy entropy rank differs (≈ 3.9 vs 5.6)
    assert row(result, "q.0")["roy_vetterli_effective_rank"] == pytest.approx(4.0, rel=1e-5)  # 4 equal σ
    s = result.summary
    assert "Roy & Vetterli's effective rank of W)" in s["definitions"]["roy_vetterli_effective_rank"]
    assert "not of W" in s["definitions"]["entropy_effective_rank"]
    assert s["roy_vetterli_effective_rank_ratio_q"] == pytest.approx(
        result.table.query("type == 'q'")["roy_vetterli_effective_rank_ratio"].mean())


def test_the_summary_says_the_numbers_are_exact_given_the_weights(planted):
    s = planted[1].summary
    assert s["uncertainty"]["method"] == "none: deterministic given the weights" and s["uncertainty"]["n_boot"] == 0
    assert s["underpowered"] is False and s["underpowered_reasons"] == []
    assert not any(key.endswith("_ci") for key in s)


def test_singular_values_match_numpy_and_top_k_is_kept(planted):
    adapter, result = planted
    svs = result.singular_values
    assert (svs.groupby("matrix").size() == 5).all()
    assert set(svs["matrix"]) == {w.name for w in weight_inventory(adapter)}
    embed = adapter.embed.weight.detach().double().numpy()
    kept = svs[svs["matrix"] == "embed"].sort_values("index")["value"].to_numpy()
    np.testing.assert_allclose(kept, np.linalg.svd(embed, compute_uv=False)[:5], rtol=1e-10)


def test_jumps_and_degenerate_matrices_are_named(planted):
    _, result = planted
    s = result.summary
    # q: effective rank 4 → 32 between layers 0 and 1 is a +700 % jump
    assert s["by_type"]["q"]["largest_jump"]["relative_change"] == pytest.approx(7.0, rel=1e-4)
    assert (s["by_type"]["q"]["largest_jump"]["from_layer"], s["by_type"]["q"]["largest_jump"]["to_layer"]) == (0, 1)
    # the model's largest: gate from rank 1 (layer 1) back to a random matrix (layer 2); a plain loop agrees
    best = max(((t, l, result.table.set_index("name").loc[f"{t}.{l + 1}", "entropy_effective_rank"]
                 / result.table.set_index("name").loc[f"{t}.{l}", "entropy_effective_rank"] - 1)
                for t in ("q", "k", "v", "o", "gate", "up", "down") for l in range(2)), key=lambda x: abs(x[2]))
    assert (s["largest_jump_type"], s["largest_jump_from_layer"], s["largest_jump_to_layer"]) == (
        best[0], best[1], best[1] + 1) == ("gate", 1, 2)
    assert s["largest_jump_relative_change"] == pytest.approx(best[2], rel=1e-9)
    assert [(j["type"], j["from_layer"]) for j in s["top_jumps"][:2]] == [("gate", 1), ("q", 0)]
    assert s["degenerate"] == ["gate.1"] and s["n_degenerate"] == 1
    assert s["by_type"]["gate"]["degenerate"] == ["gate.1"]
    assert s["entropy_effective_rank_ratio_gate"] == pytest.approx(
        result.table.query("type == 'gate'")["entropy_effective_rank_ratio"].mean())
    assert set(s["by_type"]) == {"q", "k", "v", "o", "gate", "up", "down"}
    assert set(s["model_matrices"]) == {"embed", "unembed"}


def test_jump_and_degenerate_helpers_against_a_plain_loop():
    import pandas as pd

    table = pd.DataFrame({
        "name": [f"q.{i}" for i in range(4)] + [f"k.{i}" for i in range(4)],
        "type": ["q"] * 4 + ["k"] * 4, "layer": pd.array(list(range(4)) * 2, dtype="Int64"),
        "entropy_effective_rank": [10.0, 12.0, 3.0, 9.0, 5.0, 5.0, 5.0, 6.0],
        "entropy_effective_rank_ratio": [0.5, 0.6, 0.15, 0.45, 0.5, 0.5, 0.5, 0.6],
    })
    jumps = layer_jumps(table, metrics=("entropy_effective_rank",))
    q = jumps[jumps["type"] == "q"]["relative_change"].to_numpy()
    np.testing.assert_allclose(q, [0.2, -0.75, 2.0])
    deg = degenerate_matrices(table, 0.5)
    assert deg["name"].tolist() == ["q.2"]  # 0.15 < 0.5 × median(0.5, 0.6, 0.15, 0.45) = 0.2375


def test_outputs_are_written(planted, tmp_path):
    _, result = planted
    out = {f"table_{k}": tmp_path / f"{k}.parquet" for k in ("metrics", "singular_values", "jumps")}
    out.update(summary=tmp_path / "summary.json", figure_rank_ratio=tmp_path / "rank_ratio.png",
               figure_singular_values=tmp_path / "spectra.svg")
    write_result(EXPERIMENT, to_result(result), out)
    summary = json.loads((tmp_path / "summary.json").read_text())  # standard JSON (no NaN)
    assert summary["definitions"]["entropy_effective_rank"].startswith("exp(H(p))")
    import pandas as pd

    metrics = pd.read_parquet(out["table_metrics"])
    assert list(metrics.columns) == ["model", "matrix", "type", "layer", "rows", "cols", "metric", "value"]
    assert len(metrics) == len(result.table) * metrics["metric"].nunique()
    assert out["figure_rank_ratio"].stat().st_size > 10_000 and out["figure_singular_values"].stat().st_size > 10_000


@pytest.mark.parametrize("family", ["bert", "gpt_neox"])
def test_every_family_runs(family):
    adapter = ModelAdapter(tiny_model(family))
    result = weight_spectra(adapter, model=family, workers=2)
    assert len(result.table) == len(weight_inventory(adapter))
    assert np.isfinite(result.table["entropy_effective_rank"]).all()
    serial = weight_spectra(adapter, model=family, workers=1)
    assert result.table.equals(serial.table)


def test_the_registered_run_reads_a_prepared_model(stories_dir, tmp_path):
    from tests.helpers import save_tiny_model
    from layerscope.jobs.writer import run_experiment
    from layerscope.model.adapter import load_model

    folder = save_tiny_model("llama", tmp_path / "tiny", stories_dir)
    params = {k: v["default"] for k, v in EXPERIMENT.params.items()} | {"seed": 0}
    out = {key: tmp_path / path.rsplit("/", 1)[-1] for key, path in EXPERIMENT.outputs("png").items()}
    result = run_experiment("weight_spectra", {"model": str(folder)}, out, params=params,
                            wildcards={"model": "tiny"})
    direct = weight_spectra(load_model(folder, dtype="float32", device="cpu"), model="tiny")
    assert result.summary == direct.summary
    written = json.loads(out["summary"].read_text())
    assert written["provenance"]["experiment"] == "weight_spectra" and written["n_matrices"] == len(direct.table)
