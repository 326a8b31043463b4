"""The adapter's attention / MLP sub-layer functions: composed they are the block, and each is what the block computes."""

from __future__ import annotations

import pytest
import torch

from layerscope.model.adapter import ModelAdapter
from tests.helpers.tiny_models import tiny_configs, tiny_model

FAMILIES = sorted(tiny_configs())


@pytest.fixture(autouse=True)
def one_thread():
    """These tests run many tiny ops; on a shared, loaded CPU two OpenMP threads make each one far slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _inputs(adapter, padded: bool):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, adapter.facts.vocab_size, (2, 11), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, 7:] = 0
    return adapter.capture_block_inputs(ids, mask)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_attention_then_mlp_is_the_block(family, padded):
    adapter = ModelAdapter(tiny_model(family))
    inputs = _inputs(adapter, padded)
    h = inputs.resid0
    with torch.no_grad():
        for i in range(adapter.n_layers):
            sub = adapter.sublayers(i, inputs)
            reference = adapter.run_block(i, h, inputs)
            torch.testing.assert_close(sub.block(h), reference, rtol=1e-5, atol=1e-6)
            if not sub.parallel:
                torch.testing.assert_close(sub.mlp(sub.attn(h)), reference, rtol=1e-5, atol=1e-6)
            h = reference


@pytest.mark.parametrize("family", FAMILIES)
def test_each_sub_layer_is_what_the_block_computes(family):
    """Hooks on the block's own attention and MLP modules see the same inputs and outputs."""
    adapter = ModelAdapter(tiny_model(family))
    inputs = _inputs(adapter, padded=False)
    i = 1
    h = adapter.run_block(0, inputs.resid0, inputs).detach()
    seen = {}
    block = adapter.blocks[i]
    attention = adapter.attention(i)
    mlp = adapter.mlp(i) if adapter.mlp(i) is not None else block.intermediate  # BERT: intermediate + output
    handles = [
        attention.register_forward_hook(lambda m, a, kw, out: seen.update(attn_in=a[0] if a else kw["hidden_states"],
                                                                          attn_out=out[0]), with_kwargs=True),
        mlp.register_forward_hook(lambda m, a, out: seen.update(mlp_in=a[0], mlp_out=out)),
    ]
    try:
        with torch.no_grad():
            adapter.run_block(i, h, inputs)
    finally:
        for handle in handles:
            handle.remove()
    sub = adapter.sublayers(i, inputs)
    norms = adapter.block_norms(i)
    with torch.no_grad():
        mid = sub.mlp_input(h)
        if adapter.facts.norm_position == "post":
            # BERT: the attention module returns the post-norm sub-layer output itself
            torch.testing.assert_close(sub.attn(h), seen["attn_out"])
            torch.testing.assert_close(mid, seen["mlp_in"])  # the intermediate reads the attention output
        else:
            torch.testing.assert_close(norms["attn"](h), seen["attn_in"])
            attn_update = seen["attn_out"] if "attn_out" not in norms else norms["attn_out"](seen["attn_out"])
            torch.testing.assert_close(sub.attn(h) - h, attn_update, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(norms["mlp"](mid), seen["mlp_in"])
            mlp_update = seen["mlp_out"] if "mlp_out" not in norms else norms["mlp_out"](seen["mlp_out"])
            torch.testing.assert_close(sub.mlp(mid) - mid, mlp_update, rtol=1e-5, atol=1e-6)
    assert sub.parallel == (family == "gpt_neox")


def test_parallel_residual_mlp_reads_the_block_input():
    adapter = ModelAdapter(tiny_model("gpt_neox"))
    inputs = _inputs(adapter, padded=False)
    sub = adapter.sublayers(0, inputs)
    h = inputs.resid0
    assert sub.parallel and sub.mlp_input(h) is h
