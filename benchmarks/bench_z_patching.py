"""Benchmark: z_patching's batched conditions vs one generate call per condition.

Run on demand (not a test):

    python benchmarks/bench_z_patching.py [--model-dir resources/models/smollm2-135m] [--tokens 24]

All conditions of one pair share the English prompt, so z_patching generates them as one
batch without padding (a hook patches each row differently). This times, in one process
and on one real zh_en_math pair, (a) the 29 conditions of the default config (2 layers,
k ∈ {20, 50}, mean and OT sources) generated as one batch and (b) the same patches
generated one call per condition, checks that both give the same tokens, and prints the
ratio. The Z-mask and the sources are built from the weights and a direct forward of the
two prompts (no activation cache is needed).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "resources/models/smollm2-135m"
SYSTEM = "You are a helpful assistant. Answer the user's request directly and concisely. Do not repeat or restate the question."


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    from layerscope.model.adapter import load_model, load_tokenizer
    from layerscope.model.generate import encode_prompts, stop_token_ids
    from layerscope.data.prompts import load_prompt_set, zh_en_pairs
    from layerscope.experiments.z_subspace.z_mask import z_mask
    from layerscope.experiments.z_subspace.z_patching import generate_patched, pair_patches

    torch.set_num_threads(args.threads)
    adapter, tok = load_model(args.model_dir), load_tokenizer(args.model_dir)
    pair = zh_en_pairs(load_prompt_set(REPO / "resources/prompt_sets/zh_en_math.json"))[0]
    zh, en = encode_prompts(tok, [pair.zh, pair.en], system_prompt=SYSTEM, chat_template="auto")
    mask = z_mask(adapter, model="m", layers=[0.89, 0.92], k=[20, 50]).mask

    def text_states(enc, layer):
        with torch.no_grad():
            out = adapter.model(input_ids=torch.tensor([enc.ids]), output_hidden_states=True)
        return out.hidden_states[layer][0, enc.prompt_span[0] : enc.prompt_span[1]].double()

    import numpy as np

    positions = np.arange(*en.prompt_span)
    patches = [None]
    for layer in mask.layers:
        patches += [p for *_, p in pair_patches(text_states(zh, layer), text_states(en, layer), positions, mask, layer,
                                                ["mean", "ot"])]
    stops = stop_token_ids(tok, adapter.config)
    kw = dict(max_new_tokens=args.tokens, stops=stops, pad_id=tok.pad_token_id or 0)
    generate_patched(adapter, en.ids, patches[:2], **kw)  # warm-up

    start = time.perf_counter()
    batched = generate_patched(adapter, en.ids, patches, **kw)
    t_batched = time.perf_counter() - start
    start = time.perf_counter()
    single = [generate_patched(adapter, en.ids, [p], **kw)[0] for p in patches]
    t_single = time.perf_counter() - start
    same = sum(a == b for a, b in zip(batched, single))
    print(f"{len(patches)} conditions, prompt {len(en.ids)} tokens, ≤ {args.tokens} new tokens, {args.threads} threads")
    print(f"one batch:            {t_batched:7.2f} s")
    print(f"one call / condition: {t_single:7.2f} s")
    print(f"ratio (single / batched): {t_single / t_batched:.2f}x; identical outputs: {same}/{len(patches)}")


if __name__ == "__main__":
    main()
