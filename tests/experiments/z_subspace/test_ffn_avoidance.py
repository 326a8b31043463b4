"""ffn_avoidance: the MLP output's energy in each block's Z, against a plain projection and the model's own MLP."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from layerscope.experiments.z_subspace.ffn_avoidance import energy_null, ffn_avoidance, mlp_outputs
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


def test_energy_null_is_centred_on_chance_and_isotropic_energy_is_not_avoided():
    rng = np.random.default_rng(0)
    d, k = 32, 4
    m = rng.standard_normal((200, d)) * np.linspace(0.2, 3.0, d)  # anisotropic outputs
    null = energy_null(m.T @ m, d, k, 400, seed=0, layer=0)
    assert null.mean() == pytest.approx(k / d, abs=4 * null.std() / np.sqrt(400))
    # an explicit check of one draw's meaning: the share of a random subspace from its basis
    q = np.linalg.qr(rng.standard_normal((d, k)))[0]
    assert float(np.sum((m @ q) ** 2) / np.sum(m**2)) == pytest.approx(
        float(np.trace(q.T @ (m.T @ m) @ q) / np.trace(m.T @ m)))
