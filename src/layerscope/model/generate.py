"""Greedy completions of a prompt set, stored as token ids.

Every prompt is rendered once — through the tokenizer's chat template for instruct models,
with a system message asking the model to answer rather than restate the prompt — and the
resulting token ids are kept with the spans of the system message and the user's prompt,
so later stages never re-tokenise text (which can change the tokens).

Generation is greedy (temperature 0). vLLM is used when it is installed and a GPU is
present; otherwise transformers' ``generate`` runs batched with left padding. A completion
ends at the first end-of-sequence token, which is kept as part of it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch

from layerscope import LayerscopeError
from layerscope.data.prompts import Prompt, PromptSet
from layerscope.progress import tqdm_factory, track

log = logging.getLogger(__name__)

ROLES = ("system", "template", "prompt", "completion")


@dataclass
class EncodedPrompt:
    prompt: Prompt
    ids: list[int]
    system_span: tuple[int, int]  # token positions [start, end) of the system message (0, 0 if none)
    prompt_span: tuple[int, int]  # token positions [start, end) of the user's prompt text


def uses_chat_template(tokenizer, chat_template: str | bool) -> bool:
    has = bool(getattr(tokenizer, "chat_template", None))
    if chat_template == "auto":
        return has
    if chat_template and not has:
        raise LayerscopeError("chat_template is true for this model but its tokenizer has no chat template")
    return bool(chat_template)


def _char_span_to_tokens(offsets: Sequence[tuple[int, int]], start: int, end: int) -> tuple[int, int]:
    inside = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
    return (inside[0], inside[-1] + 1) if inside else (0, 0)


def encode_prompts(
    tokenizer, prompts: Sequence[Prompt], *, system_prompt: str | None, chat_template: str | bool
) -> list[EncodedPrompt]:
    """Render and tokenise every prompt; locate the system and prompt spans in token positions."""
    chat = uses_chat_template(tokenizer, chat_template)
    if not getattr(tokenizer, "is_fast", False):
        raise LayerscopeError("layerscope needs a fast (Rust) tokenizer to locate prompt tokens; this model has none")
    encoded = []
    for prompt in prompts:
        if chat:
            messages = [{"role": "user", "content": prompt.text}]
            if system_prompt:
                messages.insert(0, {"role": "system", "content": system_prompt})
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            p_start = text.rfind(prompt.text)
            s_start = text.find(system_prompt) if system_prompt else -1
        else:
            text = prompt.text
            enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
            p_start, s_start = 0, -1
        if p_start < 0:
            raise LayerscopeError(f"prompt {prompt.id}: the chat template does not contain the prompt text verbatim")
        offsets = enc["offset_mapping"]
        prompt_span = _char_span_to_tokens(offsets, p_start, p_start + len(prompt.text))
        system_span = (
            _char_span_to_tokens(offsets, s_start, s_start + len(system_prompt)) if s_start >= 0 else (0, 0)
        )
        encoded.append(EncodedPrompt(prompt, list(enc["input_ids"]), system_span, prompt_span))
    return encoded


def stop_token_ids(tokenizer, model_config, generation_config=None) -> list[int]:
    ids: list[int] = []
    for source in (generation_config, model_config):
        eos = getattr(source, "eos_token_id", None) if source is not None else None
        if eos is None:
            continue
        ids.extend(eos if isinstance(eos, (list, tuple)) else [eos])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(int(i) for i in ids))


def _cut(ids: Sequence[int], stops: set[int], max_new_tokens: int) -> tuple[list[int], str]:
    out = []
    for token in ids:
        out.append(int(token))
        if token in stops:
            return out, "stop"
    return out[:max_new_tokens], "length"


@torch.no_grad()
def _generate_transformers(model, encoded, *, max_new_tokens, batch_size, stops, pad_id, device):
    from transformers import GenerationConfig

    gen_config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad_id,
        eos_token_id=sorted(stops) or None,
    )
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i].ids), i))
    results: dict[int, tuple[list[int], str]] = {}
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    for batch in track(batches, "generate completions", total=len(order), weight=len, unit="prompts"):
        width = max(len(encoded[i].ids) for i in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids = encoded[i].ids
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            mask[row, width - len(ids) :] = 1
        out = model.generate(
            input_ids=input_ids.to(device), attention_mask=mask.to(device), generation_config=gen_config
        )
        for row, i in enumerate(batch):
            results[i] = _cut(out[row, width:].tolist(), stops, max_new_tokens)
    return [results[i] for i in range(len(encoded))]


def _generate_vllm(model_dir, encoded, *, max_new_tokens, stops, dtype, seed, tensor_parallel_size=1):
    from vllm import LLM, SamplingParams  # optional extra: pip install layerscope[gpu]

    # the model's weights split over the job's GPUs (tensor parallelism); 1: one GPU
    llm = LLM(model=str(model_dir), dtype=dtype if dtype != "auto" else "bfloat16", seed=seed, enforce_eager=True,
              tensor_parallel_size=int(tensor_parallel_size))
    # keep the stop token in the output, as transformers does (vLLM drops it by default)
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop_token_ids=sorted(stops), seed=seed,
                            include_stop_str_in_output=True, skip_special_tokens=False)
    # progress into the job's log (a vLLM whose use_tqdm takes only a bool draws its own bar there instead)
    outputs = llm.generate([{"prompt_token_ids": e.ids} for e in encoded], params,
                           use_tqdm=tqdm_factory("generate completions (vllm)", unit="prompts"))
    results = []
    for output in outputs:
        completion = output.outputs[0]
        ids = list(completion.token_ids)
        stop_reason = getattr(completion, "stop_reason", None)
        if completion.finish_reason == "stop" and (not ids or ids[-1] not in stops) and isinstance(stop_reason, int):
            ids.append(stop_reason)  # older vLLM versions omit the matched stop token
        results.append(_cut(ids, stops, max_new_tokens))
    return results


def vllm_usable() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def choose_backend(backend: str, device: torch.device) -> str:
    if backend == "vllm":
        if not vllm_usable():
            raise LayerscopeError("generation.backend is 'vllm' but vLLM is not installed or no GPU is visible")
        return "vllm"
    if backend == "auto" and device.type == "cuda" and vllm_usable():
        return "vllm"
    return "transformers"


def generate_completions(
    adapter,
    tokenizer,
    prompt_set: PromptSet,
    *,
    model_dir: str | Path,
    max_new_tokens: int,
    batch_size: int,
    system_prompt: str | None,
    chat_template: str | bool,
    backend: str = "auto",
    dtype: str = "auto",
    seed: int = 0,
    device: torch.device | None = None,
    tensor_parallel_size: int = 1,
) -> pd.DataFrame:
    """Greedy completions of every prompt, one row per prompt (see module docstring).

    ``tensor_parallel_size`` is vLLM's (the GPUs of the job); transformers runs the adapter's model,
    dispatched over its devices if it was loaded so (inputs go to its main device)."""
    if adapter.facts.kind != "decoder":
        raise LayerscopeError("completions need a decoder; encoders are encoded from their prompts directly")
    device = device or adapter.device
    encoded = encode_prompts(tokenizer, prompt_set.prompts, system_prompt=system_prompt, chat_template=chat_template)
    stops = set(stop_token_ids(tokenizer, adapter.config, getattr(adapter.model, "generation_config", None)))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (min(stops) if stops else 0)
    chosen = choose_backend(backend, device)
    log.info("generating %d completions with %s (max %d new tokens)", len(encoded), chosen, max_new_tokens)
    if chosen == "vllm":
        outs = _generate_vllm(model_dir, encoded, max_new_tokens=max_new_tokens, stops=stops, dtype=dtype, seed=seed,
                              tensor_parallel_size=tensor_parallel_size)
    else:
        outs = _generate_transformers(
            adapter.model, encoded, max_new_tokens=max_new_tokens, batch_size=batch_size, stops=stops,
            pad_id=pad_id, device=adapter.device,
        )
    rows = []
    for enc, (completion, finish) in zip(encoded, outs):
        p = enc.prompt
        rows.append(
            {
                "prompt_id": p.id,
                "category": p.category,
                "prompt": p.text,
                "completion": tokenizer.decode(completion, skip_special_tokens=True),
                "prompt_ids": enc.ids,
                "completion_ids": completion,
                "system_start": enc.system_span[0],
                "system_end": enc.system_span[1],
                "prompt_start": enc.prompt_span[0],
                "prompt_end": enc.prompt_span[1],
                "n_prompt_tokens": len(enc.ids),
                "n_completion_tokens": len(completion),
                "finish_reason": finish,
                "generator": chosen,
                "answer": None if p.answer is None else str(p.answer),
                "lang": p.lang,
                "pair": p.pair,
            }
        )
    return pd.DataFrame(rows)


def token_roles(n_tokens: int, system_span, prompt_span, n_prompt_tokens: int) -> list[str]:
    """Role of every position of prompt + completion: system / template / prompt / completion."""
    roles = []
    for t in range(n_tokens):
        if t >= n_prompt_tokens:
            roles.append("completion")
        elif prompt_span[0] <= t < prompt_span[1]:
            roles.append("prompt")
        elif system_span[0] <= t < system_span[1]:
            roles.append("system")
        else:
            roles.append("template")
    return roles
