"""The lens read-out: what a model applies after its last block, in float32.

Shared by the logit lens, the tuned lens and the contrastive trajectories: the model's own
final norm, its unembedding and any final-logit soft-cap, so that reading ``resid.L`` gives
the model's own logits.
"""

from __future__ import annotations

import torch

from layerscope.model.adapter import ModelAdapter


class Readout(torch.nn.Module):
    """The model's post-block read-out, in float32 (a copy when the model runs in lower precision)."""

    def __init__(self, adapter: ModelAdapter):
        super().__init__()
        self.adapter = adapter
        self.float_copy = adapter.dtype != torch.float32
        if self.float_copy:
            import copy

            self.norm = copy.deepcopy(adapter.final_norm).float() if adapter.final_norm is not None else None
            self.unembed = copy.deepcopy(adapter.unembed).float()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.float()
        if not self.float_copy:
            return self.adapter.readout(hidden)
        h = self.norm(hidden) if self.norm is not None else hidden
        logits = self.unembed(h)
        cap = self.adapter.facts.final_logit_softcap
        return torch.tanh(logits / cap) * cap if cap else logits
