"""Completions: greedy, batched with left padding, equal to a plain one-token-at-a-time loop."""

from __future__ import annotations

import copy

import pytest
import torch

from layerscope import LayerscopeError
from layerscope.model.generate import encode_prompts, generate_completions, token_roles
from layerscope.data.prompts import Prompt, PromptSet

PROMPTS = PromptSet("t", (
    Prompt("p1", "story", "Once upon a time, there was a little girl"),
    Prompt("p2", "story", "The dog"),
    Prompt("p3", "other", "Tom and Sue went to the park. They saw a big"),
    Prompt("p4", "other", "One day, a bird"),
    Prompt("p5", "story", "Lily liked to"),
))
CHAT = ("{% for m in messages %}<s>[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}")


def _reference_greedy(model, ids, max_new_tokens, stops):
    """Independent greedy decoding: full forward each step, no cache, no padding."""
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            out.append(token)
            ids.append(token)
            if token in stops:
                break
    return out


def test_batched_greedy_equals_a_plain_loop(stories, stories_dir):
    adapter, tok = stories
    frame = generate_completions(adapter, tok, PROMPTS, model_dir=stories_dir, max_new_tokens=20, batch_size=3,
                                 system_prompt=None, chat_template="auto")
    assert list(frame["prompt_id"]) == [p.id for p in PROMPTS.prompts]
    for row in frame.itertuples():
        expected = _reference_greedy(adapter.model, row.prompt_ids, 20, {tok.eos_token_id})
        assert list(row.completion_ids) == expected, row.prompt_id
        assert row.n_completion_tokens == len(expected)
        assert row.finish_reason == ("stop" if expected[-1] == tok.eos_token_id else "length")
    first = frame.iloc[0]
    assert first["completion"].startswith("named Lily")  # PROVENANCE.md's documented continuation
    assert first["generator"] == "transformers"


def test_generation_is_deterministic_and_batch_size_independent(stories, stories_dir):
    adapter, tok = stories
    kwargs = dict(model_dir=stories_dir, max_new_tokens=12, system_prompt=None, chat_template=False)
    a = generate_completions(adapter, tok, PROMPTS, batch_size=2, **kwargs)
    b = generate_completions(adapter, tok, PROMPTS, batch_size=2, **kwargs)
    c = generate_completions(adapter, tok, PROMPTS, batch_size=5, **kwargs)
    assert a["completion_ids"].map(list).tolist() == b["completion_ids"].map(list).tolist()
    assert a["completion_ids"].map(list).tolist() == c["completion_ids"].map(list).tolist()


def test_chat_template_spans_and_roles(stories):
    adapter, tok = stories
    tok = copy.deepcopy(tok)
    tok.chat_template = CHAT
    system = "Answer briefly."
    encoded = encode_prompts(tok, PROMPTS.prompts, system_prompt=system, chat_template="auto")
    for enc in encoded:
        p0, p1 = enc.prompt_span
        s0, s1 = enc.system_span
        assert tok.decode(enc.ids[p0:p1]).strip() == enc.prompt.text
        assert tok.decode(enc.ids[s0:s1]).strip() == system
        assert s1 <= p0
        roles = token_roles(len(enc.ids) + 2, enc.system_span, enc.prompt_span, len(enc.ids))
        assert roles[p0:p1] == ["prompt"] * (p1 - p0) and roles[s0:s1] == ["system"] * (s1 - s0)
        assert roles[-2:] == ["completion", "completion"] and "template" in roles
    with pytest.raises(LayerscopeError, match="has no chat template"):
        encode_prompts(stories[1], PROMPTS.prompts, system_prompt=None, chat_template=True)


def test_without_chat_template_the_prompt_is_the_text_after_bos(stories):
    _, tok = stories
    enc = encode_prompts(tok, PROMPTS.prompts[:1], system_prompt="ignored", chat_template="auto")[0]
    assert enc.ids[0] == tok.bos_token_id
    assert enc.prompt_span == (1, len(enc.ids)) and enc.system_span == (0, 0)


def test_encoders_have_no_completions(tiny_dirs):
    from layerscope.model.adapter import load_model, load_tokenizer

    adapter = load_model(tiny_dirs["bert"], kind="encoder")
    with pytest.raises(LayerscopeError, match="completions need a decoder"):
        generate_completions(adapter, load_tokenizer(tiny_dirs["bert"]), PROMPTS, model_dir=tiny_dirs["bert"],
                             max_new_tokens=3, batch_size=2, system_prompt=None, chat_template=False)
