"""Tiny randomly initialised models of every family the adapter claims (milliseconds each)."""

from __future__ import annotations

import torch

COMMON = dict(
    vocab_size=512, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=128,
    bos_token_id=1, eos_token_id=2, pad_token_id=0,
)


def tiny_configs() -> dict:
    from transformers import (
        BertConfig, Gemma2Config, GemmaConfig, GPT2Config, GPTNeoXConfig, LlamaConfig, MistralConfig,
        Phi3Config, Qwen2Config, Qwen3Config,
    )

    gated = dict(COMMON, intermediate_size=48, num_key_value_heads=2)
    return {
        "llama": LlamaConfig(**gated, tie_word_embeddings=False),
        "mistral": MistralConfig(**gated, sliding_window=8),
        "qwen2": Qwen2Config(**gated, tie_word_embeddings=True),
        "qwen3": Qwen3Config(**gated, head_dim=8),
        "gemma": GemmaConfig(**gated, head_dim=8),
        "gemma2": Gemma2Config(**gated, head_dim=8, sliding_window=4, final_logit_softcapping=30.0,
                               attn_logit_softcapping=50.0),
        "phi3": Phi3Config(**gated),
        "gpt2": GPT2Config(
            vocab_size=512, n_embd=32, n_layer=3, n_head=4, n_positions=128, n_inner=48,
            bos_token_id=1, eos_token_id=2, pad_token_id=0,
        ),
        "gpt_neox": GPTNeoXConfig(**dict(COMMON, intermediate_size=48), use_parallel_residual=True),
        "bert": BertConfig(**dict(COMMON, intermediate_size=48)),
    }


def tiny_model(name: str, seed: int = 0):
    from transformers import AutoModel, AutoModelForCausalLM

    config = tiny_configs()[name]
    torch.manual_seed(seed)
    cls = AutoModel if name == "bert" else AutoModelForCausalLM
    model = cls.from_config(config)
    model.eval()
    return model
