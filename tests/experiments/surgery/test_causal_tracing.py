"""Causal tracing (ROME): prompt preparation, the invariants of clean / corrupted / restored runs, an
independent Hugging Face forward with hooks on the embeddings and a block, packed against padded rows,
determinism, and the experiment's outputs."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from layerscope.data.prompts import Prompt, load_prompt_set
from layerscope.engines.tracing import (
    POSITION_KINDS, FactPrompt, Tracer, draw_noise, kind_of_positions, noise_std, position_kinds, prepare_prompt,
    trace_prompt,
)
from layerscope.jobs.writer import run_experiment
from layerscope.model.adapter import load_model, load_tokenizer

STORY = "Once upon a time there was a little girl named Lily. She went to the"


def _fact(tok, text=STORY, subject="little girl", answer="park", pid="p0", category="c") -> FactPrompt:
    fp = prepare_prompt(tok, Prompt(pid, category, text, answer=answer, subject=subject))
    assert isinstance(fp, FactPrompt), fp
    return fp


@pytest.fixture(scope="module")
def fact(stories):
    adapter, tok = stories
    fp = _fact(tok)
    sigma = 3 * noise_std(adapter, [fp])
    return adapter, tok, fp, sigma


# ---------------------------------------------------------------------------- preparation


def test_subject_span_and_answer_token(stories):
    _, tok = stories
    fp = _fact(tok)
    assert fp.ids == tuple(tok(STORY)["input_ids"]) and fp.ids[0] == tok.bos_token_id
    assert tok.decode(list(fp.ids[fp.start:fp.end])).strip() == "little girl"
    assert "little" not in tok.decode(list(fp.ids[:fp.start])) and "girl" not in tok.decode(list(fp.ids[fp.end:]))
    full = tok(STORY + " park")["input_ids"]
    assert full[: fp.length] == list(fp.ids) and fp.answer_id == full[fp.length]


class _Shifting:
    """A tokenizer whose encoding of text + answer re-tokenizes the text (what some tokenizers do)."""

    def __init__(self, tok):
        self.tok = tok
        self.all_special_ids = tok.all_special_ids

    def __call__(self, text, **kwargs):
        out = self.tok(text, **kwargs)
        if text.endswith(" park"):
            out = {**out, "input_ids": [out["input_ids"][0], 7] + list(out["input_ids"][2:])}
        return out

    def decode(self, ids):
        return self.tok.decode(ids)


@pytest.mark.parametrize("case, reason", [
    ("no_subject", "no subject and answer annotated"),
    ("whitespace", "is whitespace only"),
    ("shifting", "does not tokenize as a continuation of the text"),
])
def test_prompts_that_cannot_be_traced_say_why(stories, case, reason):
    _, tok = stories
    prompt = Prompt("p", "c", STORY, answer="park", subject="little girl")
    if case == "no_subject":
        prompt = Prompt("p", "c", STORY, answer="park")
    elif case == "whitespace":  # stories260K spells " Paris" as "▁" + "P" + …: the first token says nothing
        prompt = Prompt("p", "c", STORY, answer="Paris", subject="little girl")
    got = prepare_prompt(_Shifting(tok) if case == "shifting" else tok, prompt)
    assert isinstance(got, str) and reason in got


def test_position_kinds_follow_rome():
    kinds = position_kinds(10, 2, 5)
    assert kinds == {"first_subject": [2], "middle_subject": [3], "last_subject": [4], "first_subsequent": [5],
                     "further": [6, 7, 8], "last": [9]}
    assert list(kinds) == list(POSITION_KINDS)
    one = position_kinds(3, 1, 2)  # a one-token subject right before the last token
    assert one["first_subject"] == one["last_subject"] == [1] and one["last"] == [2]
    assert one["middle_subject"] == one["first_subsequent"] == one["further"] == []
    assert kind_of_positions(5, 1, 2) == ["before_subject", "first_subject+last_subject", "first_subsequent",
                                          "further", "last"]
    assert kind_of_positions(3, 0, 3) == ["first_subject", "middle_subject", "last_subject+last"]


def test_noise_unit_is_the_embeddings_std_at_the_subject(fact):
    adapter, _, fp, _ = fact
    rows = adapter.embed.weight.detach()[list(fp.ids[fp.start:fp.end])].double()  # Llama: resid.0 = embeddings
    assert noise_std(adapter, [fp]) == pytest.approx(float(rows.std()), rel=1e-6)


# ---------------------------------------------------------------------------- invariants


def test_without_noise_nothing_changes(fact):
    adapter, _, fp, _ = fact
    trace = trace_prompt(adapter, fp, torch.zeros((3, fp.end - fp.start, adapter.facts.d_model)), all_positions=True)
    assert trace.p_corrupted == pytest.approx(trace.p_clean, rel=1e-5)
    assert np.abs(trace.effect).max() < 1e-6
    assert np.allclose(trace.p_restored, trace.p_clean, rtol=1e-5, atol=0)


def test_noise_touches_only_the_subject_tokens(fact):
    adapter, _, fp, sigma = fact
    tracer = Tracer(adapter, fp, draw_noise(fp, 4, adapter.facts.d_model, sigma, seed=0))
    delta0 = (tracer.corrupted[0] - tracer.clean[0]).abs().amax(dim=(0, 2))
    assert torch.all(delta0[: fp.start] == 0) and torch.all(delta0[fp.end:] == 0)
    assert torch.all(delta0[fp.start: fp.end] > 0)
    for site in range(adapter.n_layers + 1):  # causal attention: positions before the subject never see the noise
        torch.testing.assert_close(tracer.corrupted[site][:, : fp.start],
                                   tracer.clean[site][:, : fp.start].expand(4, -1, -1), rtol=1e-5, atol=1e-6)
        if site:
            assert (tracer.corrupted[site][:, -1] - tracer.clean[site][:, -1]).abs().max() > 1e-4
    assert tracer.p_corrupted != pytest.approx(tracer.p_clean, rel=1e-3)


def test_restoring_the_clean_state_everywhere_gives_the_clean_probability(fact):
    adapter, _, fp, sigma = fact
    tracer = Tracer(adapter, fp, draw_noise(fp, 4, adapter.facts.d_model, sigma, seed=1))
    everywhere = list(range(fp.length))
    for site in range(adapter.n_layers + 1):
        assert tracer.restored(site, [everywhere])[0] == pytest.approx(tracer.p_clean, rel=1e-5)
    # the noise lives in resid.0 at the subject only: restoring those positions there undoes it
    subject = list(range(fp.start, fp.end))
    assert tracer.restored(0, [subject])[0] == pytest.approx(tracer.p_clean, rel=1e-5)
    # one subject position alone does not
    assert tracer.restored(0, [[fp.start]])[0] != pytest.approx(tracer.p_clean, rel=1e-3)


def test_positions_before_the_subject_are_filled_without_a_run_and_equal_a_run(fact):
    adapter, _, fp, sigma = fact
    noise = draw_noise(fp, 4, adapter.facts.d_model, sigma, seed=2)
    run_all = trace_prompt(adapter, fp, noise, all_positions=True)
    filled = trace_prompt(adapter, fp, noise)
    assert np.allclose(run_all.p_restored[:, : fp.start], run_all.p_corrupted, rtol=1e-5, atol=0)
    np.testing.assert_allclose(filled.p_restored, run_all.p_restored, rtol=1e-5)
    assert np.all(filled.effect[:, : fp.start] == 0)
    # the last block's output: the clean output at the last position, invisible elsewhere
    L = adapter.n_layers
    assert run_all.p_restored[L - 1, -1] == run_all.p_clean
    assert np.all(run_all.p_restored[L - 1, :-1] == run_all.p_corrupted)


def _reference(adapter, fp: FactPrompt, noise: torch.Tensor, layer: int | None, position: int | None) -> float:
    """ROME's own scheme, independently: one batch with the clean run in row 0 and the corrupted runs after it,
    noise added by a hook on the token embedding, the clean output of block ``layer`` copied from row 0 at
    ``position`` by a hook on that block; the mean answer probability over the corrupted rows."""
    model, S = adapter.model, noise.shape[0]
    ids = torch.tensor([list(fp.ids)] * (S + 1))

    def add_noise(module, args, out):
        out = out.clone()
        out[1:, fp.start:fp.end] += noise.to(out.dtype)
        return out

    def restore(module, args, out):
        hidden = out[0] if isinstance(out, tuple) else out
        hidden[1:, position] = hidden[0, position]
        return out

    handles = [adapter.embed.register_forward_hook(add_noise)]
    if layer is not None:
        handles.append(adapter.blocks[layer].register_forward_hook(restore))
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits[1:, -1].float()
    finally:
        for h in handles:
            h.remove()
    return float(torch.softmax(logits, -1)[:, fp.answer_id].double().mean())


@pytest.mark.parametrize("family", ["stories", "gpt2", "gpt_neox", "qwen2"])
def test_probabilities_equal_a_plain_forward_with_hooks(family, stories, tiny_dirs):
    if family == "stories":
        adapter, tok = stories
    else:
        adapter, tok = load_model(tiny_dirs[family], dtype="float32"), load_tokenizer(tiny_dirs[family])
    fp = _fact(tok)
    noise = draw_noise(fp, 3, adapter.facts.d_model, 3 * noise_std(adapter, [fp]), seed=3)
    trace = trace_prompt(adapter, fp, noise, all_positions=True)
    assert trace.p_corrupted == pytest.approx(_reference(adapter, fp, noise, None, None), rel=1e-4)
    L, T = adapter.n_layers, fp.length
    for layer, t in [(0, fp.start), (0, fp.end - 1), (1, fp.end), (L - 2, T - 1), (L - 2, 1), (L - 1, T - 1)]:
        assert trace.p_restored[layer, t] == pytest.approx(_reference(adapter, fp, noise, layer, t), rel=1e-4), \
            (layer, t)


@pytest.mark.parametrize("family", ["stories", "llama", "gpt2", "gemma2", "mistral"])
def test_packed_rows_equal_padded_rows(family, stories, tiny_dirs):
    if family == "stories":
        adapter, tok = stories
    else:
        adapter, tok = load_model(tiny_dirs[family], dtype="float32"), load_tokenizer(tiny_dirs[family])
    fp = _fact(tok)
    noise = draw_noise(fp, 3, adapter.facts.d_model, 3 * noise_std(adapter, [fp]), seed=4)
    auto = trace_prompt(adapter, fp, noise, layout="auto", batch_size=5, all_positions=True)
    padded = trace_prompt(adapter, fp, noise, layout="padded", batch_size=3, all_positions=True)
    np.testing.assert_allclose(auto.p_restored, padded.p_restored, rtol=1e-5, atol=1e-9)
    assert auto.p_clean == padded.p_clean and auto.p_corrupted == padded.p_corrupted


def test_seeded_noise_is_deterministic_and_follows_the_prompt(fact):
    adapter, _, fp, sigma = fact
    d = adapter.facts.d_model
    a, b = draw_noise(fp, 3, d, sigma, seed=5), draw_noise(fp, 3, d, sigma, seed=5)
    assert torch.equal(a, b) and not torch.equal(a, draw_noise(fp, 3, d, sigma, seed=6))
    other = FactPrompt(**{**fp.__dict__, "prompt_id": "p1"})
    assert not torch.equal(a, draw_noise(other, 3, d, sigma, seed=5))
    assert a.shape == (3, fp.end - fp.start, d) and float(a.std()) == pytest.approx(sigma, rel=0.1)
    one, two = trace_prompt(adapter, fp, a), trace_prompt(adapter, fp, b)
    assert np.array_equal(one.p_restored, two.p_restored) and one.p_corrupted == two.p_corrupted


# ---------------------------------------------------------------------------- the experiment


def _facts_file(tmp_path):
    prompts = [
        ("story-01", "girl", STORY, "little girl", "park"),
        ("story-02", "girl", "Lily went to the park with her mom. She saw a big", "her mom", "tree"),
        ("story-03", "girl", "One day, a little girl named Sue found a shiny", "Sue", "stone"),
        ("dog-01", "dog", "Once upon a time, there was a big dog named Max. Max liked to", "big dog", "play"),
        ("dog-02", "dog", "The little dog ran to the", "little dog", "park"),
        ("dog-03", "dog", "Tom had a dog. The dog was very", "dog", "happy"),
        ("bad-01", "dog", "The cat sat on the", "cat", "Paris"),  # whitespace answer token for stories260K
        ("bad-02", "girl", "A girl had a", None, "ball"),  # no subject
    ]
    items = []
    for pid, cat, text, subject, answer in prompts:
        item = {"id": pid, "category": cat, "text": text, "answer": answer}
        if subject:
            item["subject"] = subject
        items.append(item)
    path = tmp_path / "facts.json"
    path.write_text(json.dumps({"name": "facts", "prompts": items}))
    return path


def test_the_experiment_writes_intervals_that_hold_their_points(stories_dir, tmp_path):
    path = _facts_file(tmp_path)
    names = ["summary.json", "metrics.parquet", "effects.parquet", "prompts.parquet", "indirect_effect.png"]
    keys = ["summary", "table_metrics", "table_effects", "table_prompts", "figure_indirect_effect"]
    outputs = {k: tmp_path / "out" / n for k, n in zip(keys, names)}
    params = {"max_prompts": 5, "noise": 3.0, "samples": 3, "min_clean_prob": 0.0, "batch_size": 4,
              "layout": "auto", "dtype": "float32", "seed": 0}
    result = run_experiment("causal_tracing", {"model": str(stories_dir), "prompts": str(path)}, outputs,
                            params=params, wildcards={"model": "stories", "pset": "facts"})
    s = json.loads(outputs["summary"].read_text())
    assert s["n_prompts_in_set"] == 8 and s["n_skipped"] == 2
    assert "whitespace" in s["skipped"]["bad-01"] and "no subject" in s["skipped"]["bad-02"]
    assert s["n_traced"] == 5 and len(s["prompt_ids"]) == 5
    assert s["prompt_categories"] in ({"girl": 2, "dog": 3}, {"girl": 3, "dog": 2})
    assert s["uncertainty"]["unit"] == "prompt" and s["uncertainty"]["n_units"] == s["n_included"] == 5
    assert s["underpowered"] and any("fewer than 10" in r for r in s["underpowered_reasons"])
    assert any("3 noise draws" in r for r in s["underpowered_reasons"])
    L = s["n_layers"]
    for key in ("p_clean_mean", "p_corrupted_mean", "total_effect_mean", "peak_ie", "subject_peak_ie"):
        lo, hi = s[key + "_ci"]
        assert np.isfinite([lo, hi]).all() and lo <= s[key] <= hi, key
    for key in ("ie_last_subject_by_layer", "ie_last_token_by_layer"):
        assert len(s[key]) == len(s[key + "_ci"]) == L
        for v, (lo, hi) in zip(s[key], s[key + "_ci"]):
            assert lo <= v <= hi
    assert s["ie_last_token_by_layer"][L - 1] == pytest.approx(s["total_effect_mean"], rel=1e-9)
    assert s["peak_position_kind"] in POSITION_KINDS and 0 <= s["peak_layer"] < L - 1
    assert 0 <= s["peak_stability"] <= 1 and 0 <= s["subject_peak_layer_stability"] <= 1
    half = 0.5 * s["total_effect_mean"]
    last, subject = np.array(s["ie_last_token_by_layer"]), np.array(s["ie_last_subject_by_layer"])
    assert s["late_site_onset_layer"] == int(np.flatnonzero(last >= half)[0])  # the last block always reaches it
    early = np.flatnonzero(subject >= half)
    assert s["early_site_last_layer"] == (int(early[-1]) if early.size else None)
    assert 0 <= s["late_site_onset_layer_stability"] <= 1

    prompts = pd.read_parquet(outputs["table_prompts"])
    assert len(prompts) == 8 and prompts["traced"].sum() == 5
    assert set(prompts.loc[prompts["skip_reason"] != "", "prompt_id"]) == {"bad-01", "bad-02"}
    effects = pd.read_parquet(outputs["table_effects"])
    traced = prompts[prompts["traced"]]
    assert len(effects) == L * traced["n_tokens"].sum()
    # the averages are means over prompts of each prompt's mean over the positions of a kind
    last_subject = effects[effects["position_kind"].str.contains("last_subject")]
    by_prompt = last_subject.groupby(["prompt_id", "layer"])["indirect_effect"].mean().groupby("layer").mean()
    np.testing.assert_allclose(by_prompt.to_numpy(), s["ie_last_subject_by_layer"], rtol=1e-9)
    metrics = pd.read_parquet(outputs["table_metrics"])
    assert len(metrics) == len(POSITION_KINDS) * L
    assert result.summary["p_clean_mean"] == pytest.approx(traced["p_clean"].mean())


def test_min_clean_prob_leaves_prompts_out_of_the_averages_and_counts_them(stories_dir, tmp_path):
    path = _facts_file(tmp_path)
    prompts = load_prompt_set(path)
    adapter, tok = load_model(stories_dir, dtype="float32"), load_tokenizer(stories_dir)
    from layerscope.experiments.surgery.causal_tracing import causal_tracing

    everything = causal_tracing(adapter, tok, prompts, model="m", prompt_set_name="facts", max_prompts=4,
                                samples=2, min_clean_prob=0.0)
    p = everything.prompts.set_index("prompt_id")["p_clean"].dropna()
    threshold = float(p.median())
    kept = causal_tracing(adapter, tok, prompts, model="m", prompt_set_name="facts", max_prompts=4, samples=2,
                          min_clean_prob=threshold)
    s = kept.summary
    assert s["n_traced"] == 4 and s["n_included"] == int((p >= threshold).sum()) < 4
    assert sorted(s["below_min_clean_prob"]) == sorted(p[p < threshold].index)
    assert s["p_clean_mean"] == pytest.approx(float(p[p >= threshold].mean()))
    nobody = causal_tracing(adapter, tok, prompts, model="m", prompt_set_name="facts", max_prompts=2, samples=2,
                            min_clean_prob=1.0)
    assert nobody.summary["n_included"] == 0 and nobody.summary["underpowered"]
    assert nobody.summary["uncertainty"]["n_units"] == 0 and nobody.metrics.empty


def test_the_shipped_facts_prepare_with_a_real_tokenizer(stories):
    """Every shipped fact locates its subject; with stories260K's tiny vocabulary some answers start with a bare
    '▁' token and are skipped for that reason, never for another."""
    _, tok = stories
    from tests.helpers import REPO

    for p in load_prompt_set(REPO / "resources/prompt_sets/facts.json").prompts:
        got = prepare_prompt(tok, p)
        if isinstance(got, str):
            assert "whitespace only" in got, (p.id, got)
        else:
            assert got.start < got.end <= got.length and got.subject == p.subject
