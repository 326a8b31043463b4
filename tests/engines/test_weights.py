"""The weight inventory: every linear weight of the whole model analysed exactly once."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from layerscope.model.adapter import ModelAdapter
from layerscope.engines.weights import MODEL_TYPES, WeightSource, numel, parallel_map, weight_inventory
from tests.helpers.tiny_models import tiny_configs, tiny_model

FAMILIES = list(tiny_configs())


def covered_entries(adapter: ModelAdapter) -> dict[str, np.ndarray]:
    """For every parameter: how many inventory matrices cover each of its entries."""
    params = dict(adapter.model.named_parameters())
    counts = {name: np.zeros(tuple(p.shape), dtype=int) for name, p in params.items()}
    for w in weight_inventory(adapter):
        hits = counts[w.param]
        view = hits.T if w.transposed else hits  # [out, in]
        if w.rows is None:
            view += 1
        elif isinstance(w.rows, slice):
            view[w.rows] += 1
        else:
            np.add.at(view, (list(w.rows),), 1)
    return counts


def check_exact_cover(adapter: ModelAdapter, label: str) -> None:
    params = dict(adapter.model.named_parameters())
    linear = {n for n, p in params.items() if p.ndim == 2}
    inventory = weight_inventory(adapter)
    assert {w.param for w in inventory} == linear, label
    counts = covered_entries(adapter)
    for name in linear:
        assert (counts[name] == 1).all(), f"{label}: {name} entries covered {np.unique(counts[name])} times"
    for name in set(params) - linear:
        assert (counts[name] == 0).all()
    # the element count of the analysed matrices is that of the model's 2-D parameters
    assert sum(numel(w, params) for w in inventory) == sum(params[n].numel() for n in linear)
    assert not [w.name for w in inventory if w.type == "other"], f"{label}: unclassified 2-D weights"
    assert len({w.name for w in inventory}) == len(inventory)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_linear_weight_of_each_tiny_architecture_is_covered_once(family):
    check_exact_cover(ModelAdapter(tiny_model(family)), family)


def test_every_linear_weight_of_stories260k_is_covered_once(stories):
    adapter, _ = stories
    check_exact_cover(adapter, "stories260K")
    inventory = weight_inventory(adapter)
    assert [w.name for w in inventory if w.layer is None] == ["embed", "unembed"]  # untied
    assert len(inventory) == 2 + 7 * 5


@pytest.mark.parametrize("family, expected", [
    ("llama", {"embed", "unembed"}),  # untied
    ("qwen2", {"embed"}),  # tied: one matrix
    ("gpt2", {"embed", "position_embed"}),
    ("gpt_neox", {"embed", "unembed"}),
    ("bert", {"embed", "position_embed", "token_type_embed", "pooler"}),
])
def test_model_level_matrices(family, expected):
    inventory = weight_inventory(ModelAdapter(tiny_model(family)))
    model_level = {w.type for w in inventory if w.layer is None}
    assert model_level == expected and model_level <= set(MODEL_TYPES)


@pytest.mark.parametrize("family", FAMILIES)
def test_block_matrices_are_the_adapters_projections(family):
    adapter = ModelAdapter(tiny_model(family))
    source = WeightSource(adapter)
    for w in weight_inventory(adapter):
        if w.layer is not None:
            assert torch.equal(source.matrix(w), adapter.projections(w.layer)[w.type]), (family, w.name)
            assert w.name == f"{w.type}.{w.layer}"


def test_parallel_map_keeps_order_and_thread_count():
    before = torch.get_num_threads()
    assert parallel_map(lambda x: x * x, range(20), workers=3) == [x * x for x in range(20)]
    assert parallel_map(lambda x: torch.get_num_threads(), range(4), workers=2) == [1] * 4
    assert torch.get_num_threads() == before
