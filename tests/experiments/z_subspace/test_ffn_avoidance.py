"""ffn_avoidance: the MLP output's energy in each block's Z, against a plain projection and the model's own MLP."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from layerscope.experiments.z_subspace.ffn_avoidance import energy_null, ffn_avoidance, mlp_outputs, projector_diagonals
from tests.experiments.z_subspace.test_z_subspace import paired  # noqa: F401  (the module fixture)


def _hooked_mlp_outputs(adapter, ids, positions):
    """The MLP modules' own outputs in the model's forward (Llama family: no norm after the MLP)."""
    seen = {}
    handles = [adapter.mlp(layer).register_forward_hook(
        lambda module, args, out, layer=layer: seen.__setitem__(layer, out.detach()))
        for layer in range(adapter.n_layers)]
    try:
        with torch.no_grad():
            adapter.model(torch.tensor([ids]))
    finally:
        for h in handles:
            h.remove()
    return [seen[layer][0, positions].double() for layer in range(adapter.n_layers)]


def test_mlp_outputs_are_what_the_models_mlp_writes(paired, stories):
    states, _ = paired
    adapter, _ = stories
    pid = states.pairs[0].zh.id
    ids, positions = states.prompt_ids(pid), states.positions(pid)
    ours = mlp_outputs(adapter, ids, positions)
    theirs = _hooked_mlp_outputs(adapter, ids, positions)
    assert len(ours) == adapter.n_layers and ours[0].shape == (len(positions), adapter.facts.d_model)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_energy_in_z_against_a_plain_numpy_projection(paired, stories):
    states, mask = paired
    adapter, _ = stories
    result = ffn_avoidance(adapter, states, mask, model="s", prompt_set="p", k=[4, 16], n_random_subspaces=50)
    d = adapter.facts.d_model
    per_prompt = []
    for pair in states.pairs:
        for prompt in (pair.zh, pair.en):
            per_prompt.append([m.numpy() for m in _hooked_mlp_outputs(adapter, states.prompt_ids(prompt.id),
                                                                       states.positions(prompt.id))])
    for row in result.summary["by_k"]:
        k = row["k"]
        for layer in range(adapter.n_layers):
            v = mask.basis(layer, k).double().numpy()
            proj = v.T @ v  # P_Z, d × d
            inside = sum(float(np.sum((m[layer] @ proj) ** 2)) for m in per_prompt)
            total = sum(float(np.sum(m[layer] ** 2)) for m in per_prompt)
            assert row["energy_z"][layer] == pytest.approx(inside / total, rel=1e-4)
            assert row["energy_z_over_chance"][layer] == pytest.approx(inside / total / (k / d), rel=1e-4)
            lo, hi = row["energy_z_ci"][layer]
            assert lo <= row["energy_z"][layer] <= hi
    s = result.summary
    assert s["energy_z_over_chance"] == s["by_k"][0]["energy_z_over_chance"] and s["uncertainty"]["unit"] == "pair"
    assert s["min_over_chance"] == min(s["energy_z_over_chance"])
    with pytest.raises(Exception, match="every block"):
        ffn_avoidance(adapter, states, mask, model="s", prompt_set="p", k=[8])


def test_energy_null_is_the_share_of_random_subspaces():
    from layerscope.engines.statistics import random_subspaces

    rng = np.random.default_rng(0)
    d, k, n = 32, 4, 2000
    m = rng.standard_normal((200, d)) * np.linspace(0.2, 3.0, d)  # anisotropic outputs
    m = m @ np.linalg.qr(rng.standard_normal((d, d)))[0]  # not aligned with the axes
    gram = m.T @ m
    null = energy_null(gram, projector_diagonals(d, k, n, seed=0))
    assert null.mean() == pytest.approx(k / d, abs=4 * null.std() / np.sqrt(n))
    # the shortcut (eigenvalues × projector diagonals) has the distribution of the direct share tr(QᵀCQ)/tr(C)
    direct = np.array([np.trace(q.T @ gram @ q) for q in random_subspaces(d, k, n, seed=5)]) / np.trace(gram)
    assert null.std() == pytest.approx(direct.std(), rel=0.1)
    np.testing.assert_allclose(np.quantile(null, [0.1, 0.5, 0.9]), np.quantile(direct, [0.1, 0.5, 0.9]),
                               rtol=0.03)
