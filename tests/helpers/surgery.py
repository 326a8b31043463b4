"""Independent references for the layer-surgery tests: the Hugging Face forward with its layer list
replaced, and small token caches (one with a shared prompt prefix)."""

from __future__ import annotations

import numpy as np
import torch

from layerscope.data.activations import ActivationCache, TokenSequence, extract_activations
from layerscope.engines.surgery import LossEvaluator
from tests.helpers.cache import random_token_cache


def token_cache(adapter, tok, folder, seed=0, n=5):
    return random_token_cache(adapter, tok, folder, n=n, first_length=8, step=4, seed=seed)


def reference_loss(adapter, seqs, sequence):
    """Independent: HF model forward with its layer list replaced, cross-entropy on completion tokens."""
    base_layers = adapter.blocks
    container = adapter.base
    name = adapter.family.blocks
    original = getattr(container, name)
    setattr(container, name, torch.nn.ModuleList([base_layers[i] for i in sequence]))
    n_layers_attr = adapter.config.num_hidden_layers
    adapter.config.num_hidden_layers = len(sequence)
    if hasattr(adapter.config, "layer_types") and adapter.config.layer_types:
        saved_types = list(adapter.config.layer_types)
        adapter.config.layer_types = [saved_types[i] for i in sequence]
    else:
        saved_types = None
    try:
        nll = []
        with torch.no_grad():
            for seq in seqs:
                logits = adapter.model(torch.tensor([seq.ids]), use_cache=False).logits[0].double()
                logp = torch.log_softmax(logits, -1)
                for t in range(len(seq.ids) - 1):
                    if seq.roles[t + 1] == "completion":
                        nll.append(-float(logp[t, seq.ids[t + 1]]))
    finally:
        setattr(container, name, original)
        adapter.config.num_hidden_layers = n_layers_attr
        if saved_types is not None:
            adapter.config.layer_types = saved_types
    return float(np.mean(nll))


def shared_prefix_cache(adapter, tok, folder, n=5, shared=7, seed=4):
    """Prompts that share their first ``shared`` tokens (like a system message), completions differ."""
    g = torch.Generator().manual_seed(seed)
    head = [1] + torch.randint(3, adapter.facts.vocab_size, (shared - 1,), generator=g).tolist()
    seqs = []
    for i in range(n):
        tail = torch.randint(3, adapter.facts.vocab_size, (6 + 3 * i,), generator=g).tolist()
        ids = head + tail
        roles = ["template"] + ["system"] * (shared - 1) + ["prompt"] * 3 + ["completion"] * (len(tail) - 3)
        seqs.append(TokenSequence(f"p{i}", "c", ids, roles))
    # one prompt whose completion starts inside the shared head's continuation
    extract_activations(adapter, tok, seqs, folder / "resid.safetensors", folder / "tokens.parquet", batch_size=2)
    return ActivationCache(folder), seqs


class Reference(LossEvaluator):
    """Every sequence from the embeddings, alone, in padded batches: the plain computation."""

    def __init__(self, adapter, cache, **kwargs):
        super().__init__(adapter, cache, layout="padded", **kwargs)

    def losses(self, sequences, **kwargs):
        return super().losses(sequences, **{**kwargs, "use_cache": False, "share_prefixes": False, "memo": None})


