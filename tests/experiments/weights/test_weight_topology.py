"""weight_topology against dense and plain-loop computations, on tiny models with planted structure."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from layerscope import LayerscopeError
from layerscope.model.adapter import ModelAdapter
from layerscope.experiments.weights.weight_topology import (
    EXPERIMENT, correlation_matrix, mlp_neurons, norm_scales, position_structure, qk_circuit, qk_circuits,
    to_result, weight_topology,
)
from layerscope.jobs.writer import write_result
from layerscope.engines.weights import WeightSource, weight_inventory
from tests.helpers.tiny_models import tiny_model


def dense_circuit(wq: torch.Tensor, wk: torch.Tensor) -> dict:
    m = (wq.double().T @ wk.double()).numpy()
    s = (m + m.T) / 2
    eig = np.linalg.eigvalsh(s)
    return {"sv": np.linalg.svd(m, compute_uv=False), "sym": (s**2).sum() / (m**2).sum(),
            "pos": (eig[eig > 0] ** 2).sum() / (eig**2).sum()}


def test_qk_circuit_matches_the_dense_product():
    g = torch.Generator().manual_seed(0)
    for d, hd in ((40, 8), (12, 8)):  # d > 2·d_head and d < 2·d_head
        wq, wk = torch.randn(hd, d, generator=g), torch.randn(hd, d, generator=g)
        out, ref = qk_circuit(wq, wk), dense_circuit(wq, wk)
        np.testing.assert_allclose(out["singular_values"], ref["sv"][:hd], rtol=1e-10, atol=1e-12)
        assert ref["sv"][hd:].max(initial=0) < 1e-10 * ref["sv"][0]  # rank ≤ d_head
        assert out["symmetric_energy_fraction"] == pytest.approx(ref["sym"], rel=1e-10)
        assert out["positive_energy_fraction"] == pytest.approx(ref["pos"], rel=1e-10)
        assert out["symmetric_energy_fraction"] + out["antisymmetric_energy_fraction"] == pytest.approx(1.0)


def test_symmetric_and_antisymmetric_circuits():
    g = torch.Generator().manual_seed(1)
    wq = torch.randn(8, 32, generator=g)
    same = qk_circuit(wq, wq)  # M = W_Qᵀ W_Q: a positive semi-definite similarity form
    assert same["symmetric_energy_fraction"] == pytest.approx(1.0, abs=1e-12)
    assert same["positive_energy_fraction"] == pytest.approx(1.0, abs=1e-12)
    assert same["n_negative_eigenvalues"] == 0 and same["n_positive_eigenvalues"] == 8
    p = torch.randn(8, 8, generator=g)
    skew = qk_circuit(wq, (p - p.T) @ wq)  # M = W_Qᵀ (P − Pᵀ) W_Q is antisymmetric
    assert skew["symmetric_energy_fraction"] == pytest.approx(0.0, abs=1e-12)


def test_gqa_heads_use_their_key_value_head():
    """x_qᵀ M_h x_k equals the attention logit the model's own projections give head h (repeat_kv)."""
    from transformers.models.llama.modeling_llama import repeat_kv

    adapter = ModelAdapter(tiny_model("llama"))  # 4 query heads, 2 KV heads
    f = adapter.facts
    assert f.gqa_group == 2
    attn = adapter.attention(1)
    g = torch.Generator().manual_seed(2)
    xq, xk = torch.randn(f.d_model, generator=g), torch.randn(f.d_model, generator=g)
    with torch.no_grad():
        q = attn.q_proj(xq[None]).view(1, 1, f.n_heads, f.head_dim).transpose(1, 2)
        k = attn.k_proj(xk[None]).view(1, 1, f.n_kv_heads, f.head_dim).transpose(1, 2)
        logits = (q * repeat_kv(k, f.gqa_group)).sum(-1).flatten().double()
    proj = adapter.projections(1)
    table, _ = qk_circuits(adapter)
    for h in range(f.n_heads):
        kv = int(table.query("layer == 1 and head == @h")["kv_head"].iloc[0])
        hd = f.head_dim
        m = proj["q"][h * hd:(h + 1) * hd].double().T @ proj["k"][kv * hd:(kv + 1) * hd].double()
        assert float(xq.double() @ m @ xk.double()) == pytest.approx(float(logits[h]), rel=1e-5, abs=1e-6)
        assert kv == h // f.gqa_group


def test_planted_dead_and_degenerate_neurons():
    adapter = ModelAdapter(tiny_model("llama"))
    with torch.no_grad():
        adapter.mlp(0).gate_proj.weight[3] = 0.0  # no input: dead
        adapter.mlp(2).down_proj.weight[:, 7] *= 0.05  # tiny output: degenerate
        adapter.mlp(2).up_proj.weight[11] *= 1e-4  # near-zero input: dead
    neurons = mlp_neurons(adapter, dead_ratio=0.01, degenerate_ratio=0.1)
    flagged = neurons[neurons["status"] != "ok"][["layer", "neuron", "status"]].values.tolist()
    assert flagged == [[0, 3, "dead"], [2, 7, "degenerate"], [2, 11, "dead"]]
    down = adapter.mlp(2).down_proj.weight.detach().double()
    norms = down.norm(dim=0).numpy()
    row = neurons.query("layer == 2 and neuron == 7").iloc[0]
    assert row["down_ratio"] == pytest.approx(norms[7] / np.median(norms), rel=1e-12)
    with pytest.raises(LayerscopeError, match="dead_ratio"):
        mlp_neurons(adapter, dead_ratio=0.5, degenerate_ratio=0.1)


def test_cross_layer_correlation_matches_numpy_and_is_chunk_free():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(37, 11, generator=g)
    mats = [base + 0.5 * torch.randn(37, 11, generator=g) + i for i in range(4)] + [torch.randn(37, 11, generator=g)]
    expected = np.corrcoef(np.stack([m.double().flatten().numpy() for m in mats]))
    np.testing.assert_allclose(correlation_matrix(mats), expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(correlation_matrix(mats, chunk_elements=13), expected, rtol=1e-10, atol=1e-12)
    transposed = [m.T.contiguous().T for m in mats]  # strided views, as GPT-2's Conv1D gives
    np.testing.assert_allclose(correlation_matrix(transposed, chunk_elements=30), expected, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="differ in shape"):
        correlation_matrix([base, base[:5]])


def test_norm_scales_apply_the_gemma_offset_and_include_every_norm():
    gemma = ModelAdapter(tiny_model("gemma"))
    scales = norm_scales(gemma)
    stored = gemma.block_norms(1)["mlp"].weight.detach().double().numpy()
    got = scales.query("layer == 1 and role == 'mlp'").sort_values("dim")["gamma"].to_numpy()
    np.testing.assert_allclose(got, stored + 1.0)
    assert set(scales["role"]) == {"attn", "mlp", "final"}
    bert = ModelAdapter(tiny_model("bert"))
    roles = set(norm_scales(bert)["role"])
    assert roles == {"embed", "attn_out", "mlp_out"}  # BERT's embedding LayerNorm included, no final norm


def test_position_structure_of_a_known_table():
    n, d = 64, 16
    pos = np.arange(n)[:, None]
    freqs = 1.0 / 10000 ** (np.arange(d // 2) / (d // 2))
    table = np.concatenate([np.sin(pos * freqs), np.cos(pos * freqs)], axis=1)  # every row has norm sqrt(d/2)
    stats, curve, norms, cos = position_structure(torch.as_tensor(table))
    np.testing.assert_allclose(norms, np.sqrt(d / 2))
    # sinusoidal tables: cos(p_i, p_{i+Δ}) = mean_k cos(Δ·f_k), independent of i
    for delta in (1, 2, 8, 32):
        assert curve.set_index("offset").loc[delta, "mean_cosine"] == pytest.approx(np.cos(delta * freqs).mean())
    assert stats["adjacent_cosine"] == pytest.approx(np.cos(freqs).mean())
    assert stats["n_positions"] == n


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert", "gpt_neox", "phi3", "gemma2", "qwen3"])
def test_topology_on_every_family(family, tmp_path):
    adapter = ModelAdapter(tiny_model(family))
    result = weight_topology(adapter, model=family, workers=2)
    f = adapter.facts
    assert len(result.qk) == f.n_layers * f.n_heads
    s = result.summary
    assert s["mlp_neurons"] == f.n_layers * f.d_ff
    # sparsity against a plain count over every 2-D parameter
    params = [p.detach() for n, p in adapter.model.named_parameters() if p.ndim == 2]
    total = sum(p.numel() for p in params)
    below = sum(int((p.abs() < 0.01).sum()) for p in params)
    assert s["sparsity_abs_lt_0.01"] == pytest.approx(below / total, rel=1e-12)
    assert len(result.sparsity) == len(weight_inventory(adapter))
    if family in ("gpt2", "bert"):
        assert s["position"] == "learned" and "position_embed_adjacent_cosine" in s
        assert set(result.position["matrix"]) == {"position_embed"}
    else:
        assert result.position.empty
    if family not in ("gpt2", "llama"):
        return
    serial = weight_topology(adapter, model=family, workers=1)  # the thread count changes no number
    pd.testing.assert_frame_equal(result.metrics, serial.metrics)
    out = {f"table_{k}": tmp_path / f"{k}.parquet" for k in EXPERIMENT.tables}
    out.update(summary=tmp_path / "summary.json",
               **{f"figure_{f.name}": tmp_path / f"{f.name}.png" for f in EXPERIMENT.figures})
    write_result(EXPERIMENT, to_result(result), out)
    assert json.loads((tmp_path / "summary.json").read_text())["model"] == family
    metrics = pd.read_parquet(out["table_metrics"])
    assert list(metrics.columns) == ["model", "analysis", "matrix", "type", "layer", "index", "metric", "value"]
    assert set(metrics["analysis"]) >= {"sparsity", "qk_circuit", "mlp_neurons", "cross_layer_correlation",
                                        "norm_scale"}


def test_cross_layer_correlation_of_identical_layers_is_one():
    adapter = ModelAdapter(tiny_model("llama"))
    with torch.no_grad():
        for i in (1, 2):
            adapter.mlp(i).up_proj.weight.copy_(adapter.mlp(0).up_proj.weight * (i + 1.0) + 0.5)  # affine copies
    result = weight_topology(adapter, model="copies")
    up = result.correlations["up"]
    np.testing.assert_allclose(up, np.ones((3, 3)), rtol=1e-12)
    assert result.summary["cross_layer_adjacent_correlation_up"] == pytest.approx(1.0)
    ref = np.corrcoef(np.stack([WeightSource(adapter).matrix(w).double().flatten().numpy()
                                for w in weight_inventory(adapter) if w.type == "q"]))
    np.testing.assert_allclose(result.correlations["q"], ref, rtol=1e-10, atol=1e-12)


def test_sparsity_counts_are_independent_of_the_row_blocks():
    from layerscope.experiments.weights.weight_topology import sparsity

    adapter = ModelAdapter(tiny_model("gpt2"))  # Conv1D: transposed, strided matrices
    source = WeightSource(adapter)
    whole = sparsity(source, (1e-3, 1e-2), (0.1, 1.0), workers=1)
    blocks = sparsity(source, (1e-3, 1e-2), (0.1, 1.0), workers=2, chunk_elements=7)
    pd.testing.assert_frame_equal(whole.drop(columns="rms"), blocks.drop(columns="rms"))
    np.testing.assert_allclose(whole["rms"], blocks["rms"], rtol=1e-12)
    for w in weight_inventory(adapter)[:4]:
        m = source.matrix(w).double()
        row = whole.set_index("matrix").loc[w.name]
        assert row["rms"] == pytest.approx(float(m.pow(2).mean().sqrt()), rel=1e-12)
        assert row["sparsity_rms_lt_1"] == int((m.abs() < float(m.pow(2).mean().sqrt())).sum())


def test_the_registered_run_reads_a_prepared_model(stories_dir, tmp_path):
    from tests.helpers import save_tiny_model
    from layerscope.jobs.writer import run_experiment
    from layerscope.model.adapter import load_model

    folder = save_tiny_model("gpt2", tmp_path / "tiny", stories_dir)
    params = {k: v["default"] for k, v in EXPERIMENT.params.items()} | {"seed": 0}
    out = {key: tmp_path / path.rsplit("/", 1)[-1] for key, path in EXPERIMENT.outputs("png").items()}
    result = run_experiment("weight_topology", {"model": str(folder)}, out, params=params,
                            wildcards={"model": "tiny"})
    direct = weight_topology(load_model(folder, dtype="float32", device="cpu"), model="tiny")
    pd.testing.assert_frame_equal(pd.read_parquet(out["table_metrics"]), direct.metrics)
    assert json.loads(out["summary"].read_text())["provenance"]["experiment"] == "weight_topology"
    assert result.summary["params"] == direct.summary["params"]
