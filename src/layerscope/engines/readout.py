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
            # plain copies (a dispatched model's hooks and offloaded weights are not copied, its weights are read back)
            from layerscope.model.placement import standalone_copy

            device = adapter.device
            self.norm = standalone_copy(adapter.final_norm).float().to(device) if adapter.final_norm is not None else None
            self.unembed = standalone_copy(adapter.unembed).float().to(device)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.float().to(self.adapter.device)
        if not self.float_copy:
            return self.adapter.readout(hidden)
        h = self.norm(hidden) if self.norm is not None else hidden
        logits = self.unembed(h)
        cap = self.adapter.facts.final_logit_softcap
        return torch.tanh(logits / cap) * cap if cap else logits
