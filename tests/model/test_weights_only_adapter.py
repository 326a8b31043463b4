"""The weights-only view of T5 (two stacks, cross-attention, relative bias) and ViT encoders (CLIP vision, DINOv2)."""

from __future__ import annotations

import json

import pytest
import torch

from layerscope import LayerscopeError
from layerscope.engines.weights import WeightSource, weight_inventory
from layerscope.model.adapter import ModelAdapter, check_supported, load_model
from tests.helpers import save_tiny_model
from tests.helpers.tiny_models import tiny_model, tiny_weights_only_configs

WEIGHTS_ONLY = list(tiny_weights_only_configs())


@pytest.mark.parametrize("family", WEIGHTS_ONLY)
def test_every_weight_of_two_or_more_dimensions_is_covered_exactly_once(family):
    """Enumerated from the model itself, not from the adapter: each ≥2-D parameter, with all its elements,
    once (a parameter left out, listed twice or only partly covered fails)."""
    adapter = ModelAdapter(tiny_model(family))
    params = dict(adapter.model.named_parameters())  # tied weights once
    expected = {n for n, p in params.items() if p.ndim >= 2}
    inventory = weight_inventory(adapter)
    source = WeightSource(adapter)
    covered: dict[str, list[int]] = {}
    for w in inventory:
        covered.setdefault(w.param, []).append(source.matrix(w).numel())  # reshaped 4-D / 3-D kernels counted whole
    extra = set(covered) - expected
    assert {n for n in extra if params[n].ndim != 1} == set()  # beyond them: only CLIP's 1-D class embedding
    assert extra <= {"embeddings.class_embedding"}
    assert expected <= set(covered)
    for name in expected:
        assert sum(covered[name]) == params[name].numel(), name
        assert len(covered[name]) == 1, name  # no split parameters in these families: listed once
    assert not [w for w in inventory if w.type == "other"]
    assert len({w.name for w in inventory}) == len(inventory)


def test_t5_blocks_stacks_and_cross_attention():
    adapter = ModelAdapter(tiny_model("t5_v1_1"))
    f = adapter.facts
    assert (f.kind, f.stacks, f.n_layers, f.head_dim, f.mlp_type, f.position, f.norm_type) == (
        "encoder_decoder", {"encoder": 2, "decoder": 3}, 5, 6, "gated", "relative", "rmsnorm")
    assert [adapter.block_label(i) for i in range(5)] == ["encoder.0", "encoder.1", "decoder.0", "decoder.1",
                                                           "decoder.2"]
    model = adapter.model
    dec1 = model.decoder.block[1]
    proj = adapter.projections(3)  # decoder.1
    assert proj["cross_q"] is not None and torch.equal(proj["cross_q"], dec1.layer[1].EncDecAttention.q.weight)
    assert torch.equal(proj["cross_k"], dec1.layer[1].EncDecAttention.k.weight)
    assert torch.equal(proj["gate"], dec1.layer[2].DenseReluDense.wi_0.weight)  # act(wi_0 x) ⊙ wi_1 x
    assert torch.equal(proj["up"], dec1.layer[2].DenseReluDense.wi_1.weight)
    assert "cross_q" not in adapter.projections(1)  # encoder blocks have no cross-attention
    assert adapter.qk_pairs(3) == [("self", "q", "k"), ("cross", "cross_q", "cross_k")]
    norms = adapter.block_norms(3)
    assert norms["cross_attn"] is dec1.layer[1].layer_norm and getattr(norms["mlp"], "bias", None) is None
    assert [role for role, _ in adapter.model_norms()] == ["encoder.final", "decoder.final"]
    names = {w.name: w for w in weight_inventory(adapter)}
    assert names["decoder.2.cross_o"].type == "decoder.cross_o" and names["decoder.2.cross_o"].layer == 2
    bias = names["encoder.relative_bias"]
    assert WeightSource(adapter).matrix(bias).shape == (8, 4)  # [num_buckets, n_heads]
    assert bias.param == "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"


def test_plain_t5_mlp_is_up_down():
    proj = ModelAdapter(tiny_model("t5")).projections(0)
    assert set(proj) == {"q", "k", "v", "o", "up", "down"}


@pytest.mark.parametrize("family", ["clip_vision", "dinov2"])
def test_patch_embedding_reshape_is_the_convolution(family):
    """Row o of the [out, in·kh·kw] matrix applied to a flattened patch equals the convolution's channel o."""
    adapter = ModelAdapter(tiny_model(family))
    w = next(w for w in weight_inventory(adapter) if w.type == "patch_embed")
    matrix = WeightSource(adapter).matrix(w)
    conv = adapter.embed
    assert isinstance(conv, torch.nn.Conv2d) and matrix.shape == (32, 3 * 4 * 4)
    image = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = torch.nn.functional.conv2d(image, conv.weight, stride=conv.stride)  # no bias
    for r, c in ((0, 0), (2, 3)):
        patch = image[0, :, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4].reshape(-1)
        torch.testing.assert_close(matrix @ patch, out[0, :, r, c], rtol=1e-5, atol=1e-6)


def test_vit_tokens_and_layer_scales():
    clip = ModelAdapter(tiny_model("clip_vision"))
    names = {w.name: w for w in weight_inventory(clip)}
    source = WeightSource(clip)
    assert source.matrix(names["class_token"]).shape == (1, 32)  # a 1-D parameter as one row
    assert source.matrix(names["position_embed"]).shape == (17, 32)  # class token + 4 × 4 patches
    assert [r for r, _ in clip.model_norms()] == ["embed", "final"]  # pre_layrnorm, post_layernorm
    dino = ModelAdapter(tiny_model("dinov2"))
    names = {w.name: w for w in weight_inventory(dino)}
    source = WeightSource(dino)
    assert source.matrix(names["position_embed"]).shape == (17, 32)  # [1, 17, 32] squeezed
    assert {"class_token", "mask_token"} <= set(names)
    scale = dino.block_norms(1)["mlp_layer_scale"]
    torch.testing.assert_close(dino.norm_scale(scale), dino.model.encoder.layer[1].layer_scale2.lambda1.detach())
    assert dino.facts.d_ff == 64 and ModelAdapter(tiny_model("dinov2_swiglu")).facts.mlp_type == "gated"


@pytest.mark.parametrize("family", ["t5", "clip_vision"])
def test_forward_paths_refuse_a_weights_only_model(family, tmp_path, stories_dir):
    """A prompt experiment's load (no weights_only) fails from config.json alone, naming the model and kind."""
    folder = save_tiny_model(family, tmp_path / f"my-{family}", stories_dir)
    kind = "encoder_decoder" if family == "t5" else "vision"
    with pytest.raises(LayerscopeError) as info:
        load_model(folder, kind="decoder")
    message = str(info.value)
    assert f"my-{family}" in message and kind in message and "weight_spectra" in message
    with pytest.raises(LayerscopeError, match=kind):
        ModelAdapter(tiny_model(family)).capture_block_inputs(torch.ones(1, 3, dtype=torch.long))
    adapter = load_model(folder, dtype="float32", weights_only=True)
    assert adapter.facts.kind == kind
    ref = tiny_model(family).state_dict()
    for name, value in adapter.model.state_dict().items():
        torch.testing.assert_close(value, ref[name], rtol=0, atol=0)


def test_declared_kind_must_match_for_weights_only(tmp_path, stories_dir):
    folder = save_tiny_model("dinov2", tmp_path / "dino", stories_dir)
    with pytest.raises(LayerscopeError, match="set `kind: vision`"):
        check_supported(folder, "encoder")


def test_full_clip_checkpoint_is_read_through_its_vision_tower(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                         vocab_size=100, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                           image_size=16, patch_size=4), projection_dim=16)
    torch.manual_seed(0)
    full = CLIPModel(config)
    full.save_pretrained(tmp_path / "clip")
    assert json.loads((tmp_path / "clip" / "config.json").read_text())["model_type"] == "clip"
    adapter = load_model(tmp_path / "clip", dtype="float32", weights_only=True)
    assert adapter.facts.n_layers == 2 and "text tower" in adapter.facts.not_read
    torch.testing.assert_close(adapter.projections(1)["q"], full.vision_model.encoder.layers[1].self_attn.q_proj.weight,
                               rtol=0, atol=0)


@pytest.mark.parametrize("family, kind", [("t5", "encoder_decoder"), ("clip_vision", "vision"), ("dinov2", "vision")])
def test_a_local_folder_is_prepared(family, kind, tmp_path, stories_dir):
    """prepare_model's check (meta-device load + adapter) for each weights-only family; a vision folder needs no
    tokenizer."""
    from layerscope.model.prepare import prepare_model

    folder = save_tiny_model(family, tmp_path / "src", stories_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if kind == "vision":
            (folder / name).unlink()
    manifest = prepare_model({"type": "local", "path": str(folder)}, tmp_path / "out", kind=kind)
    assert manifest["kind"] == kind and manifest["architecture"]["kind"] == kind
    assert load_model(tmp_path / "out", dtype="float32", weights_only=True).facts.kind == kind
