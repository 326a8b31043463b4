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
    EXPERIMENT, cross_layer, gram_similarity_matrix, haar_squares, mlp_neurons, norm_scales, position_structure,
    qk_circuit, qk_circuits, residual_gram, rotation_null, to_result, traceless, weight_topology,
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


def dense_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Trace-free residual Gram cosine from dense numpy products (a, b: [hidden, d] on the residual side)."""
    d = a.shape[1]
    ga, gb = a.T @ a, b.T @ b
    ga, gb = ga - np.trace(ga) / d * np.eye(d), gb - np.trace(gb) / d * np.eye(d)
    return float((ga * gb).sum() / np.sqrt((ga * ga).sum() * (gb * gb).sum()))


def test_gram_similarity_matches_numpy_and_is_chunk_free():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(37, 11, generator=g)
    mats = [base + 0.5 * torch.randn(37, 11, generator=g) for _ in range(3)] + [torch.randn(23, 11, generator=g)]
    ref = np.array([[dense_similarity(a.double().numpy(), b.double().numpy()) for b in mats] for a in mats])
    grams = [traceless(residual_gram(m, "in"))[0] for m in mats]
    np.testing.assert_allclose(gram_similarity_matrix(grams), ref, rtol=1e-10, atol=1e-12)
    small = [traceless(residual_gram(m, "in", chunk_elements=13))[0] for m in mats]
    np.testing.assert_allclose(gram_similarity_matrix(small, chunk_elements=7), ref, rtol=1e-10, atol=1e-12)
    # the output side: W Wᵀ of [d, hidden] (o, down) is WᵀW of its transpose; strided views as Conv1D gives
    out_side = [traceless(residual_gram(m.T.contiguous().T.T, "out", chunk_elements=30))[0] for m in mats]
    np.testing.assert_allclose(gram_similarity_matrix(out_side), ref, rtol=1e-10, atol=1e-12)


def permute_hidden_units(adapter: ModelAdapter, src: int, dst: int, seed: int = 0) -> None:
    """Make block ``dst`` a copy of block ``src`` with its MLP neurons and its heads (key/value heads with the
    query heads they serve) permuted: the same block, computing the same function, hidden units reordered."""
    f = adapter.facts
    rng = np.random.default_rng(seed)
    neurons = torch.as_tensor(rng.permutation(f.d_ff))
    kv = rng.permutation(f.n_kv_heads)
    hd, group = f.head_dim, f.gqa_group
    q_heads = [g * group + r for g in kv for r in range(group)]
    q_rows = torch.as_tensor([h * hd + i for h in q_heads for i in range(hd)])
    kv_rows = torch.as_tensor([g * hd + i for g in kv for i in range(hd)])
    a, b = adapter.attention(src), adapter.attention(dst)
    m, n = adapter.mlp(src), adapter.mlp(dst)
    with torch.no_grad():
        b.q_proj.weight.copy_(a.q_proj.weight[q_rows])
        b.k_proj.weight.copy_(a.k_proj.weight[kv_rows])
        b.v_proj.weight.copy_(a.v_proj.weight[kv_rows])
        b.o_proj.weight.copy_(a.o_proj.weight[:, q_rows])
        n.gate_proj.weight.copy_(m.gate_proj.weight[neurons])
        n.up_proj.weight.copy_(m.up_proj.weight[neurons])
        n.down_proj.weight.copy_(m.down_proj.weight[:, neurons])


def test_a_layer_with_permuted_hidden_units_has_similarity_one():
    """The same block with its neurons and heads reordered: similarity 1 for every type. The old measure (Pearson
    correlation of the flattened weights) gives ≈ 0 here, as for any two layers whose hidden units are unaligned."""
    adapter = ModelAdapter(tiny_model("llama"))  # 4 query heads, 2 KV heads: GQA groups move together
    permute_hidden_units(adapter, 0, 1)
    source = WeightSource(adapter)
    result = weight_topology(adapter, model="permuted", n_null=50)
    for mtype in ("q", "k", "v", "o", "gate", "up", "down"):
        assert result.similarities[mtype][0, 1] == pytest.approx(1.0, abs=1e-9), mtype
        row = result.cross_layer.query("type == @mtype and layer_i == 0 and layer_j == 1").iloc[0]
        assert row["p_value"] == pytest.approx(1 / 51)  # above every rotated draw
        assert row["null_q95"] < 0.9
    flat = {w.layer: source.matrix(w).double().flatten().numpy() for w in weight_inventory(adapter) if w.type == "up"}
    assert abs(np.corrcoef(flat[0], flat[1])[0, 1]) < 0.2  # what the old cross-layer number reported
    assert result.summary["cross_layer"]["up"]["strongest_adjacent"]["layers"] == [0, 1]
    assert result.summary["cross_layer"]["up"]["strongest_adjacent"]["similarity"] == pytest.approx(1.0, abs=1e-9)


def test_scaled_copies_have_similarity_one_and_unrelated_layers_sit_in_the_null():
    adapter = ModelAdapter(tiny_model("llama"))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        adapter.mlp(1).up_proj.weight.copy_(adapter.mlp(0).up_proj.weight * 3.0)
        for i in range(3):  # independent Gaussian gate matrices: no shared residual structure
            adapter.mlp(i).gate_proj.weight.copy_(torch.randn(adapter.mlp(i).gate_proj.weight.shape, generator=g))
    result = weight_topology(adapter, model="copies", n_null=200, seed=1)
    assert result.similarities["up"][0, 1] == pytest.approx(1.0, abs=1e-9)
    assert result.summary["cross_layer_adjacent_gram_similarity_up"] == pytest.approx(
        (1.0 + result.similarities["up"][1, 2]) / 2)
    gate = result.cross_layer.query("type == 'gate' and layer_j > layer_i")
    assert (gate["p_value"] > 0.01).all()  # independent matrices are not more similar than rotated ones
    assert (gate["gram_similarity"].abs() < gate["null_q95"] * 3).all()
    assert gate["null_mean"].abs().max() < 0.05  # the null is centred on 0


def test_rotation_null_equals_an_explicit_rotation_of_the_residual_basis():
    """One draw of the null from eigenvalues: ⟨G̃_i, R G̃_j Rᵀ⟩ with R = U Q Vᵀ (U, V the eigenvectors)."""
    rng = np.random.default_rng(7)
    d = 9
    a, b = rng.standard_normal((20, d)), rng.standard_normal((14, d)) * np.linspace(0.2, 3, d)
    grams = [traceless(residual_gram(torch.as_tensor(m), "in")) for m in (a, b)]
    (ga, la), (gb, lb) = grams
    squares = haar_squares(d, 3, seed=2, workers=1)
    null = rotation_null(np.stack([la, lb]), squares)
    assert null.shape == (3, 2, 2)
    # rebuild the Haar draw Q (same seed) and rotate G̃_b explicitly by R = U Q Vᵀ
    g = torch.from_numpy(np.random.default_rng([2, 0xC105, d, 1]).standard_normal((d, d)))
    q, r = torch.linalg.qr(g)
    q = (q * torch.sign(torch.diagonal(r))).numpy()
    np.testing.assert_allclose(q**2, squares[1], rtol=1e-12)
    ea, u = np.linalg.eigh(ga.numpy())
    eb, v = np.linalg.eigh(gb.numpy())
    np.testing.assert_allclose([ea, eb], [la, lb], rtol=1e-9, atol=1e-9)
    rot = u @ q @ v.T
    rotated = rot @ gb.numpy() @ rot.T
    explicit = (ga.numpy() * rotated).sum() / np.sqrt((ga.numpy() ** 2).sum() * (gb.numpy() ** 2).sum())
    assert null[1, 0, 1] == pytest.approx(explicit, rel=1e-9, abs=1e-12)
    # many draws: centred on 0
    many = rotation_null(np.stack([la, lb]), haar_squares(d, 2000, seed=3, workers=1))[:, 0, 1]
    assert abs(many.mean()) < 4 * many.std() / np.sqrt(len(many))


def test_cross_layer_on_gpt2_uses_the_residual_side_of_conv1d_weights():
    adapter = ModelAdapter(tiny_model("gpt2"))
    source = WeightSource(adapter)
    result = cross_layer(source, n_null=20, seed=0, workers=1)
    d = adapter.facts.d_model
    ws = {w.layer: source.matrix(w).double().numpy() for w in weight_inventory(adapter) if w.type == "down"}
    assert ws[0].shape[0] == d  # [d_model, d_ff]: the residual is the output side
    expected = dense_similarity(ws[0].T, ws[2].T)
    assert result["down"].similarity[0, 2] == pytest.approx(expected, rel=1e-5)  # float32 storage of the Grams


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
    assert set(metrics["analysis"]) >= {"sparsity", "qk_circuit", "mlp_neurons", "cross_layer_gram_similarity",
                                        "norm_scale"}
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["uncertainty"]["method"] == "none: deterministic given the weights"
    assert written["cross_layer_null"]["n_null"] == 200


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
