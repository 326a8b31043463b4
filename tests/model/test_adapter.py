"""The model adapter: one view of every family, checked against the models' own forwards."""

from __future__ import annotations

import json

import pytest
import torch

from layerscope import LayerscopeError
from layerscope.model.adapter import (
    ModelAdapter, UnsupportedArchitecture, check_supported, load_model, supported_model_types,
)
from tests.helpers.tiny_models import tiny_configs, tiny_model

FAMILIES = list(tiny_configs())
DECODERS = [f for f in FAMILIES if f != "bert"]


def _batch(seed=0, vocab=512):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding
    mask[2, 5:] = 0
    return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_block_runner_reproduces_the_model_forward(family):
    model = tiny_model(family)
    adapter = ModelAdapter(model)
    ids, mask = _batch()
    with torch.no_grad():
        inputs = adapter.capture_block_inputs(ids, mask)
        hidden = adapter.run_blocks(inputs.resid0, range(adapter.n_layers), inputs)
        if adapter.facts.kind == "decoder":
            expected = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            got = adapter.readout(hidden)
        else:
            expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
            got = hidden
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", DECODERS)
def test_resid_sites_match_hidden_states_of_the_model(family):
    """resid.i is block i's input; the model's own hidden_states agree except at the last (normed) entry."""
    model = tiny_model(family)
    adapter = ModelAdapter(model)
    ids, mask = _batch(1)
    with torch.no_grad():
        inputs = adapter.capture_block_inputs(ids, mask)
        states = [inputs.resid0]
        for i in range(adapter.n_layers):
            states.append(adapter.run_block(i, states[-1], inputs))
        hf = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states
    real = mask.bool()
    for i in range(adapter.n_layers):
        torch.testing.assert_close(states[i][real], hf[i][real], rtol=1e-5, atol=1e-5)
    # the model's last entry is already normalised; ours is not, and the final norm maps one to the other
    torch.testing.assert_close(adapter.final_norm(states[-1])[real], hf[-1][real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_projections_reproduce_the_modules(family):
    """q/k/v (split from fused weights where fused) applied by hand equal the model's own projections."""
    model = tiny_model(family)
    adapter = ModelAdapter(model)
    facts = adapter.facts
    proj = adapter.projections(1)
    x = torch.randn(5, facts.d_model, generator=torch.Generator().manual_seed(3))
    attn = adapter.attention(1)
    with torch.no_grad():
        if family in ("gpt2",):
            fused = attn.c_attn(x)
            expected = dict(zip("qkv", fused.split(facts.d_model, dim=-1)))
        elif family == "gpt_neox":
            qkv = attn.query_key_value(x).view(5, facts.n_heads, 3 * facts.head_dim)
            q, k, v = qkv.chunk(3, dim=-1)
            expected = {"q": q.reshape(5, -1), "k": k.reshape(5, -1), "v": v.reshape(5, -1)}
        elif family == "phi3":
            fused = attn.qkv_proj(x)
            nq, nkv = facts.n_heads * facts.head_dim, facts.n_kv_heads * facts.head_dim
            expected = {"q": fused[:, :nq], "k": fused[:, nq:nq + nkv], "v": fused[:, nq + nkv:]}
        elif family == "bert":
            expected = {t: getattr(attn.self, n)(x) for t, n in zip("qkv", ("query", "key", "value"))}
        else:
            expected = {t: getattr(attn, f"{t}_proj")(x) for t in "qkv"}
        for t in "qkv":
            bias = expected[t] - x @ proj[t].T
            # what remains is a constant bias row (zero for bias-free projections)
            torch.testing.assert_close(bias, bias[:1].expand_as(bias), rtol=1e-5, atol=1e-5)
    assert proj["q"].shape == (facts.n_heads * facts.head_dim, facts.d_model)
    assert proj["k"].shape == (facts.n_kv_heads * facts.head_dim, facts.d_model)
    expected_types = {"q", "k", "v", "o", "up", "down"} | ({"gate"} if facts.mlp_type == "gated" else set())
    assert set(proj) == expected_types
    assert proj["down"].shape == (facts.d_model, facts.d_ff)


def test_projection_refs_cover_every_block_linear_weight_once():
    for family in FAMILIES:
        adapter = ModelAdapter(tiny_model(family))
        params = dict(adapter.model.named_parameters())
        for i in range(adapter.n_layers):
            prefix = adapter.block_prefix(i) + "."
            linear = {n for n, p in params.items() if n.startswith(prefix) and p.ndim == 2}
            covered = {}
            for ref in adapter.projection_refs(i):
                numel = len(range(*ref.rows.indices(10**9))) if isinstance(ref.rows, slice) else (
                    len(ref.rows) if ref.rows is not None else None)
                covered.setdefault(ref.param, []).append(numel)
            assert set(covered) == linear, family
            for name, parts in covered.items():
                if parts != [None]:  # fused: the parts tile the output dimension exactly
                    out_dim = params[name].shape[1 if "c_attn" in name else 0]
                    assert sum(parts) == out_dim, (family, name)


def test_architecture_facts():
    facts = {f: ModelAdapter(tiny_model(f)).facts for f in FAMILIES}
    assert facts["llama"].norm_type == "rmsnorm" and facts["gpt2"].norm_type == "layernorm"
    assert facts["llama"].gqa_group == 2 and facts["gpt2"].gqa_group == 1
    assert facts["qwen2"].tied_embeddings and not facts["llama"].tied_embeddings
    assert facts["gemma2"].norm_position == "sandwich" and facts["gemma2"].final_logit_softcap == 30.0
    assert facts["gemma"].norm_weight_offset == 1.0
    assert facts["gpt_neox"].parallel_residual
    assert facts["bert"].kind == "encoder" and facts["bert"].norm_position == "post"


def test_stories260k_facts(stories):
    adapter, _ = stories
    f = adapter.facts
    assert (f.family, f.n_layers, f.d_model, f.n_heads, f.n_kv_heads, f.head_dim, f.vocab_size) == (
        "llama", 5, 64, 8, 4, 8, 512)
    assert f.norm_type == "rmsnorm" and not f.tied_embeddings
    assert sum(p.numel() for p in adapter.model.parameters()) == 292_800


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba", "architectures": ["MambaForCausalLM"]}))
    with pytest.raises(UnsupportedArchitecture) as info:
        check_supported(tmp_path)
    message = str(info.value)
    assert "'mamba'" in message
    for supported in ("llama", "qwen2", "qwen3", "mistral", "gemma2", "phi3", "gpt2", "gpt_neox", "bert"):
        assert supported in message
    assert set(supported_model_types()) >= {"llama", "qwen2", "qwen3", "mistral", "gemma2", "phi3", "gpt2",
                                             "gpt_neox", "bert"}


def test_declared_kind_must_match(tiny_dirs):
    with pytest.raises(LayerscopeError, match="set `kind: encoder`"):
        load_model(tiny_dirs["bert"], kind="decoder")
