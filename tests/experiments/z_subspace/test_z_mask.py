"""z_mask: the basis lives in the coordinates it is applied in (resid.ℓ, before the attention input norm).

Every reader projects the pre-norm residual resid.ℓ onto V_Z. W_Q and W_K read the *normed* residual
(γ ⊙ x / rms(x), or γ ⊙ Cx / σ(x) + β for LayerNorm), so a basis built from the raw W_Q, W_K — the old
default — is a subspace of the wrong space whenever γ is not uniform. These tests compare the mask with an
explicit dense computation in residual coordinates, with what the model's own norm and key projection read,
and with the old construction.
"""

from __future__ import annotations

import json

import pytest
import torch

from layerscope.experiments.z_subspace.z_mask import (
    ZMask, ZMaskError, head_circuits, norm_fold, projector, z_basis, z_mask,
)
from layerscope.model.adapter import ModelAdapter, load_model
from tests.helpers.tiny_models import tiny_model

LAYER = 2


def with_random_gamma(adapter: ModelAdapter, layer: int, seed: int = 0) -> torch.Tensor:
    """Give the block's attention input norm a strongly non-uniform scale γ (factors e^{±1}); return γ."""
    norm = adapter.block_norms(layer)["attn"]
    g = torch.Generator().manual_seed(seed)
    gamma = torch.exp(torch.randn(adapter.facts.d_model, generator=g))
    with torch.no_grad():
        norm.weight.copy_(gamma - adapter.facts.norm_weight_offset)
    return gamma.double()


@pytest.fixture(scope="module")
def scaled(stories_dir):
    """A private copy of stories260K whose block-2 attention norm has a non-uniform γ."""
    adapter = load_model(stories_dir, dtype="float32")
    return adapter, with_random_gamma(adapter, LAYER)


def dense_z_projector(w_q: torch.Tensor, w_k: torch.Tensor, fold: torch.Tensor, facts, k: int) -> torch.Tensor:
    """P_Z from dense d × d circuits M_h = (W_Q^h F)ᵀ (W_K^g F): top-k eigenvectors of Σ_h V_hᵀ V_h."""
    hd = facts.head_dim
    total = torch.zeros((facts.d_model, facts.d_model), dtype=torch.float64)
    for h in range(facts.n_heads):
        g = h * facts.n_kv_heads // facts.n_heads
        m = (w_q[h * hd:(h + 1) * hd].double() @ fold).T @ (w_k[g * hd:(g + 1) * hd].double() @ fold)
        vh = torch.linalg.svd(m).Vh[: min(k, hd)]
        total += vh.T @ vh
    evals, evecs = torch.linalg.eigh(total)
    assert evals[-k - 1] < evals[-k] - 1e-6  # a gap: the subspace is unique
    top = evecs[:, -k:]
    return top @ top.T


def test_the_mask_is_built_in_residual_coordinates(scaled):
    adapter, gamma = scaled
    facts = adapter.facts
    proj = adapter.projections(LAYER)
    k = 6
    basis = z_mask(adapter, model="s", layers=[LAYER], k=[k]).mask.basis(LAYER, k)
    expected = dense_z_projector(proj["q"], proj["k"], torch.diag(gamma), facts, k)
    torch.testing.assert_close(projector(basis), expected, atol=1e-8, rtol=0)
    # the old construction (raw W_Q, W_K: directions of the normed residual) is another subspace
    old = z_basis(head_circuits(adapter, LAYER), k, facts.d_model).basis
    raw = dense_z_projector(proj["q"], proj["k"], torch.eye(facts.d_model, dtype=torch.float64), facts, k)
    torch.testing.assert_close(projector(old), raw, atol=1e-8, rtol=0)
    assert float(torch.linalg.matrix_norm(projector(old) - expected) ** 2 / 2) > 1.0  # > 1 of k directions differ


def test_projecting_resid_keeps_what_the_keys_read(scaled):
    """With k covering every key head (k = n_kv_heads · head_dim), P_Z y must leave the keys the model computes from
    the residual y unchanged up to the norm's per-token scale. The old basis, applied to resid.ℓ, does not."""
    adapter, _ = scaled
    facts = adapter.facts
    k = facts.n_kv_heads * facts.head_dim
    mask = z_mask(adapter, model="s", layers=[LAYER], k=[k]).mask
    old = z_basis(head_circuits(adapter, LAYER), k, facts.d_model).basis
    norm, k_proj = adapter.block_norms(LAYER)["attn"], adapter.attention(LAYER).k_proj
    y = torch.randn(50, facts.d_model, generator=torch.Generator().manual_seed(1))

    def key_cosines(basis):
        p = projector(basis.double()).float()
        with torch.no_grad():
            full, projected = k_proj(norm(y)), k_proj(norm(y @ p))
        return torch.nn.functional.cosine_similarity(full, projected, dim=-1)

    assert torch.allclose(key_cosines(mask.basis(LAYER, k)), torch.ones(50), atol=1e-5, rtol=0)
    assert float(key_cosines(old).min()) < 0.99


def test_layernorm_centring_is_folded_too():
    """GPT-2: LN(y) = γ ⊙ Cy/σ(y) + β. The folded mask is orthogonal to the all-ones direction (C removes it), and
    P_Z y gives the same centred keys W_K(LN(·) − β) as y, up to scale."""
    adapter = ModelAdapter(tiny_model("gpt2"))
    facts = adapter.facts
    d = facts.d_model
    with_random_gamma(adapter, 1, seed=3)
    fold = norm_fold(adapter, 1)
    torch.testing.assert_close(fold @ torch.ones(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64),
                               atol=1e-12, rtol=0)
    k = d - 1  # W_K F has rank d − 1
    basis = z_mask(adapter, model="g", layers=[1], k=[k]).mask.basis(1, k).double()
    assert float((basis @ torch.ones(d, dtype=torch.float64)).abs().max()) < 1e-10
    norm = adapter.block_norms(1)["attn"]
    w_k = adapter.projections(1)["k"]
    y = torch.randn(20, d, generator=torch.Generator().manual_seed(2)) + 3.0  # a common offset: centring matters
    with torch.no_grad():
        full = (norm(y) - norm.bias) @ w_k.T
        projected = (norm(y @ projector(basis).float()) - norm.bias) @ w_k.T
    cos = torch.nn.functional.cosine_similarity(full, projected, dim=-1)
    assert torch.allclose(cos, torch.ones(20), atol=1e-5, rtol=0)


def test_summary_and_file_say_which_coordinates(scaled, tmp_path):
    adapter, _ = scaled
    result = z_mask(adapter, model="s", layers=[LAYER], k=[4])
    s = result.summary
    assert "fold_norm" not in s and s["coordinates"].startswith("resid.layer")
    assert s["uncertainty"]["method"] == "none: deterministic given the weights" and s["underpowered"] is False
    json.dumps(s)
    result.mask.save(tmp_path / "m.safetensors")
    assert ZMask.load(tmp_path / "m.safetensors").metadata["coordinates"] == "residual"


def test_a_mask_file_built_in_normed_coordinates_is_refused(tmp_path):
    """A file written by the old code (raw W_Q, W_K, fold_norm False) would be applied to the wrong space."""
    from safetensors.torch import save_file

    basis = torch.eye(4, 8)
    save_file({"z.1.4": basis, "random.1.4": basis.clone()}, str(tmp_path / "old.safetensors"),
              metadata={"layers": "[1]", "k": "[4]", "d_model": "8", "n_layers": "3", "fold_norm": "False"})
    with pytest.raises(ZMaskError, match="normed residual"):
        ZMask.load(tmp_path / "old.safetensors")


def test_no_fold_norm_parameter_remains():
    from layerscope.experiments.z_subspace.z_mask import EXPERIMENT

    assert "fold_norm" not in EXPERIMENT.params  # the mask is always built in the coordinates it is applied in


# ---------------------------------------------------------------------------- Z at every block; adjacent overlap


def test_principal_cosines_agree_with_scipy_and_the_overlap_with_its_extremes():
    import numpy as np
    from scipy.linalg import subspace_angles

    from layerscope.experiments.z_subspace.z_mask import principal_cosines, random_basis, subspace_overlap

    d = 40
    a, b = random_basis(d, 6, seed=1, layer=0), random_basis(d, 6, seed=2, layer=0)
    expected = np.sort(np.cos(subspace_angles(a.numpy().T, b.numpy().T)))[::-1]
    np.testing.assert_allclose(principal_cosines(a, b), expected, rtol=1e-10, atol=1e-12)
    assert subspace_overlap(a, b) == pytest.approx(float(np.mean(expected**2)), rel=1e-10)
    rotated = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))[0] @ a  # another basis of the same subspace
    assert subspace_overlap(a, rotated) == pytest.approx(1.0, abs=1e-12)
    eye = torch.eye(d, dtype=torch.float64)
    assert subspace_overlap(eye[:6], eye[6:12]) == 0.0 and subspace_overlap(eye[:6], eye[:6]) == 1.0


def test_overlap_null_is_centred_on_k_over_d():
    import numpy as np

    from layerscope.experiments.z_subspace.z_mask import overlap_null

    null = overlap_null(64, 8, 400, seed=0)
    assert null.shape == (400,) and ((null >= 0) & (null <= 1)).all()
    assert null.mean() == pytest.approx(8 / 64, abs=4 * null.std() / np.sqrt(400))


def test_every_block_has_z_and_adjacent_overlaps_match_a_plain_computation(stories, tmp_path):
    import numpy as np

    adapter, _ = stories
    facts = adapter.facts
    result = z_mask(adapter, model="s", layers=[2], k=[4], k_sweep=[2, 4, 16], n_random_subspaces=200, seed=1)
    mask, s = result.mask, result.summary
    assert s["every_layer_k"] == [2, 4, 16] and mask.combos() == [(2, 4)]
    for layer in range(facts.n_layers):
        circuits = head_circuits(adapter, layer, fold_norm=True)
        for k in (2, 16):
            torch.testing.assert_close(mask.basis(layer, k), z_basis(circuits, k, facts.d_model).basis)
    for row in s["adjacent_overlap"]:
        k = row["k"]
        plain = [float(np.linalg.norm(mask.basis(l, k).numpy() @ mask.basis(l + 1, k).numpy().T) ** 2 / k)
                 for l in range(facts.n_layers - 1)]
        np.testing.assert_allclose(row["overlap"], plain, rtol=1e-10)
        assert row["max_overlap"] == pytest.approx(max(plain), rel=1e-10) and row["max_pair"][0] == int(np.argmax(plain))
        assert row["null_mean"] == pytest.approx(k / facts.d_model, rel=0.2)
    mask.save(tmp_path / "m.safetensors")
    loaded = ZMask.load(tmp_path / "m.safetensors")
    assert loaded.every_layer_ks == [2, 4, 16] and loaded.has_every_layer(16) and not loaded.has_every_layer(8)
    torch.testing.assert_close(loaded.basis(0, 16).double(), mask.basis(0, 16), atol=1e-7, rtol=0)
