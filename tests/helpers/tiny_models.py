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


def tiny_weights_only_configs() -> dict:
    """Families read for their weights only: T5 (plain and v1.1 gated), CLIP's vision tower, DINOv2 (plain, SwiGLU).

    The T5 stacks differ in depth and d_kv · heads ≠ d_model, so a stack or head-size mix-up shows.
    """
    from transformers import CLIPVisionConfig, Dinov2Config, T5Config

    t5 = dict(vocab_size=512, d_model=32, d_kv=6, d_ff=48, num_layers=2, num_decoder_layers=3, num_heads=4,
              relative_attention_num_buckets=8, relative_attention_max_distance=16, decoder_start_token_id=0,
              pad_token_id=0, eos_token_id=1)
    vit = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, image_size=16, patch_size=4)
    return {
        "t5": T5Config(**t5, feed_forward_proj="relu"),
        "t5_v1_1": T5Config(**t5, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
        "clip_vision": CLIPVisionConfig(**vit, intermediate_size=48),
        "dinov2": Dinov2Config(**vit, mlp_ratio=2, layerscale_value=0.5),
        "dinov2_swiglu": Dinov2Config(**vit, use_swiglu_ffn=True),
    }


def tiny_model(name: str, seed: int = 0):
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    configs = {**tiny_configs(), **tiny_weights_only_configs()}
    config = configs[name]
    torch.manual_seed(seed)
    if name.startswith("t5"):
        cls = AutoModelForSeq2SeqLM
    elif name == "bert" or name in tiny_weights_only_configs():
        cls = AutoModel
    else:
        cls = AutoModelForCausalLM
    model = cls.from_config(config)
    if name.startswith("dinov2"):  # layer scales start constant; make them distinct per dimension
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("lambda1"):
                    p.uniform_(0.1, 1.0)
    model.eval()
    return model
