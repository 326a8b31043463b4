"""weight_spectra and weight_topology on T5 and ViT encoders, against independent computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from layerscope.experiments.weights.weight_spectra import weight_spectra
from layerscope.experiments.weights.weight_topology import weight_topology
from layerscope.model.adapter import ModelAdapter
from tests.helpers.tiny_models import tiny_model


@pytest.fixture(scope="module")
def t5():
    adapter = ModelAdapter(tiny_model("t5_v1_1"))
    return adapter, weight_topology(adapter, model="t5", n_null=10, workers=1)


@pytest.mark.parametrize("family, matrix, param", [
    ("t5_v1_1", "decoder.1.cross_k", "decoder.block.1.layer.1.EncDecAttention.k.weight"),
    ("clip_vision", "patch_embed", "embeddings.patch_embedding.weight"),
    ("dinov2", "position_embed", "embeddings.position_embeddings"),
])
def test_singular_values_are_numpys(family, matrix, param):
    adapter = ModelAdapter(tiny_model(family))
    result = weight_spectra(adapter, model=family, workers=1)
    got = result.singular_values.query("matrix == @matrix")["value"].to_numpy()
    weight = dict(adapter.model.named_parameters())[param].detach().double().numpy()
    weight = weight.reshape(weight.shape[0], -1) if weight.ndim == 4 else weight.reshape(-1, weight.shape[-1])
    np.testing.assert_allclose(got, np.linalg.svd(weight, compute_uv=False), rtol=1e-10, atol=1e-12)
    if family == "clip_vision":
        assert result.summary["reshaped"]["patch_embed"]["parameter_shape"] == [32, 3, 4, 4]
        assert result.summary["reshaped"]["patch_embed"]["matrix_shape"] == [32, 48]


def test_spectra_types_stay_within_their_stack():
    result = weight_spectra(ModelAdapter(tiny_model("t5")), model="t5", workers=1)
    s = result.summary
    assert s["by_type"]["encoder.q"]["n_matrices"] == 2 and s["by_type"]["decoder.cross_q"]["n_matrices"] == 3
    assert "entropy_effective_rank_ratio_decoder_cross_q" in s
    jumps = result.jumps
    assert set(jumps.loc[jumps["type"] == "encoder.q", "to_layer"]) == {1}  # no jump from encoder.1 to decoder.0


def test_cross_attention_qk_circuit_is_wq_wk_transpose(t5):
    """The circuit of decoder block 2, head 3 (queries: decoder stream; keys: encoder output) from the raw weights."""
    adapter, result = t5
    attn = adapter.model.decoder.block[2].layer[1].EncDecAttention
    hd = 6
    wq = attn.q.weight.detach().double()[3 * hd : 4 * hd]
    wk = attn.k.weight.detach().double()[3 * hd : 4 * hd]
    m = (wq.T @ wk).numpy()  # d_model × d_model: score = x_decᵀ M y_enc
    sv = np.linalg.svd(m, compute_uv=False)[:hd]
    row = result.qk.query("circuit == 'decoder.cross' and layer == 2 and head == 3").iloc[0]
    assert row["spectral_norm"] == pytest.approx(sv[0], rel=1e-10)
    assert row["frobenius_norm"] == pytest.approx(np.linalg.norm(m), rel=1e-10)
    got = result.qk_spectra.query("circuit == 'decoder.cross' and layer == 2 and head == 3")["singular_value"]
    np.testing.assert_allclose(got.to_numpy(), sv, rtol=1e-9, atol=1e-12)
    assert np.isnan(row["symmetric_energy_fraction"])  # two different spaces: no symmetry
    counts = result.qk.groupby("circuit").size().to_dict()
    assert counts == {"encoder.self": 8, "decoder.self": 12, "decoder.cross": 12}
    assert result.summary["qk_by_circuit"]["decoder.cross"]["symmetric_energy_fraction_mean"] is None


def test_relative_position_bias_reported(t5):
    adapter, result = t5
    info = result.summary["relative_position_bias"]
    assert set(info) == {"encoder.relative_bias", "decoder.relative_bias"}
    enc = info["encoder.relative_bias"]
    table = adapter.model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.detach().double()
    assert enc["shape"] == [8, 4] and enc["num_buckets"] == 8 and enc["max_distance"] == 16 and enc["bidirectional"]
    np.testing.assert_allclose(enc["head_norm"], np.linalg.norm(table.numpy(), axis=0), rtol=1e-12)
    assert not info["decoder.relative_bias"]["bidirectional"]
    # the bias at offset 0 is bucket 0 in both directions; a causal table uses bucket 0 for every future key
    curve = result.relative_biases["decoder.relative_bias"]
    assert set(curve.query("offset >= 0")["bucket"]) == {0}
    rows = result.metrics.query("analysis == 'relative_position_bias' and matrix == 'encoder.relative_bias'")
    assert len(rows) == 8 * 4
    assert rows.query("index == 5 and metric == 'bias_head_2'")["value"].iloc[0] == pytest.approx(float(table[5, 2]))


def test_vit_topology_positions_and_layer_scales():
    adapter = ModelAdapter(tiny_model("dinov2"))
    result = weight_topology(adapter, model="dino", n_null=10, workers=1)
    assert result.summary["position_embeddings"]["position_embed"]["n_positions"] == 17
    scales = result.norm_scales.query("role == 'mlp_layer_scale' and layer == 1")["gamma"].to_numpy()
    np.testing.assert_allclose(scales, adapter.model.encoder.layer[1].layer_scale2.lambda1.detach().double().numpy())
    assert result.summary["norm_scale_max"] == pytest.approx(1.0)  # the layer scales stay out of the norm headline


def test_figures_draw(t5, tmp_path):
    from layerscope.experiments.weights.weight_spectra import to_result as spectra_result
    from layerscope.experiments.weights.weight_topology import to_result

    adapter, result = t5
    for name, draw in to_result(result).figures.items():
        draw(tmp_path / f"{name}.png")
        assert (tmp_path / f"{name}.png").stat().st_size > 0
    for name, draw in spectra_result(weight_spectra(adapter, model="t5", workers=1)).figures.items():
        draw(tmp_path / f"s_{name}.png")
