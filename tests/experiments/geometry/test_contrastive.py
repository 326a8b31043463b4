"""Contrastive groups: the shipped file and its validation; force-decoding against the activation-cache path
and the model's own logits; KL, cosine and the crossover layer against direct computations."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from tests.helpers import REPO
from layerscope import LayerscopeError
from layerscope.data.activations import ActivationCache, TokenSequence, extract_activations
from layerscope.model.adapter import load_model, load_tokenizer
from layerscope.experiments.geometry.contrastive import (
    RELATIONS, ContrastiveGroupsError, common_prefix_length, contrastive, crossover, encode_groups, force_decode,
    load_groups, sample_groups, shared_prefix, sign_test, trajectory_cosines,
)
from layerscope.jobs.writer import run_experiment
from layerscope.engines.readout import Readout
from tests.helpers.tiny_models import tiny_configs

GROUPS = REPO / "resources" / "contrastive" / "groups.json"
DECODERS = [f for f in tiny_configs() if f != "bert"]


def test_the_shipped_groups():
    groups = load_groups(GROUPS)
    assert len(groups.groups) >= 50 and groups.relations == RELATIONS
    for g in groups.groups:
        texts = g.texts()
        assert len(set(texts)) == len(texts), g.id
    assert len(load_groups(GROUPS, limit=3).groups) == 3


def _mutated(tmp_path, mutate):
    data = json.loads(GROUPS.read_text())
    mutate(data)
    path = tmp_path / "g.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["groups"][1].update(id=d["groups"][0]["id"]), "duplicate id"),
    (lambda d: d["groups"][2]["completions"].pop("antonym"), r"group 2 \(\S+\): completions must have .*missing \['antonym'\]"),
    (lambda d: d["groups"][0]["completions"].update(style=" "), "style completion must be a non-empty string"),
    (lambda d: d["groups"][0]["completions"].update(synonym=d["groups"][0]["anchor"]), "identical to the anchor"),
    (lambda d: d["groups"][0].update(answer="x"), r"unknown key\(s\) \['answer'\]"),
    (lambda d: d["groups"][0].pop("prompt"), r"missing key\(s\) \['prompt'\]"),
    (lambda d: d["groups"][0].update(id="has space"), "id must be a slug"),
    (lambda d: d.update(groups=[]), "non-empty list"),
    (lambda d: d.update(relations=["synonym", "synonym"]), "distinct names"),
    (lambda d: d.update(extra=1), r"unknown key\(s\) \['extra'\]"),
])
def test_bad_groups_are_rejected_with_their_name(tmp_path, mutate, message):
    with pytest.raises(ContrastiveGroupsError, match=message):
        load_groups(_mutated(tmp_path, mutate))


def test_unreadable_groups(tmp_path):
    with pytest.raises(ContrastiveGroupsError, match="file not found"):
        load_groups(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ContrastiveGroupsError, match="not valid JSON"):
        load_groups(tmp_path / "bad.json")


def test_custom_relations(tmp_path):
    def two(d):
        d["relations"] = ["synonym", "paraphrase"]
        for g in d["groups"]:
            g["completions"] = {"synonym": g["completions"]["synonym"], "paraphrase": g["completions"]["style"]}

    groups = load_groups(_mutated(tmp_path, two))
    assert groups.relations == ("synonym", "paraphrase")


def _cache_means(adapter, tok, prompt_ids, completions, folder):
    """Mean of resid.l over each completion's tokens, through the activation-cache path (full sequences)."""
    seqs = [TokenSequence(f"s{i}", "c", prompt_ids + c, ["prompt"] * len(prompt_ids) + ["completion"] * len(c))
            for i, c in enumerate(completions)]
    extract_activations(adapter, tok, seqs, folder / "resid.safetensors", folder / "tokens.parquet", batch_size=5)
    cache = ActivationCache(folder)
    t = cache.tokens
    out = []
    for i in range(len(seqs)):
        rows = t[(t["prompt_id"] == f"s{i}") & (t["role"] == "completion")]["row"].to_numpy()
        out.append(np.stack([cache.resid(l, rows).double().mean(0).numpy() for l in range(adapter.n_layers + 1)]))
    return np.stack(out)


@pytest.mark.parametrize("family", ["stories", *DECODERS])
def test_force_decoding_equals_the_activation_cache_path(family, stories_dir, tiny_dirs, tmp_path):
    folder = stories_dir if family == "stories" else tiny_dirs[family]
    adapter, tok = load_model(folder), load_tokenizer(folder)
    groups = load_groups(GROUPS, limit=2)
    encoded = encode_groups(tok, groups, system_prompt=None, chat_template=False)
    enc = encoded[1]
    expected = _cache_means(adapter, tok, enc.prompt_ids, enc.completion_ids, tmp_path)
    traj, _ = force_decode(adapter, enc.prompt_ids, enc.completion_ids)
    np.testing.assert_allclose(traj, expected, rtol=1e-4, atol=1e-5)
    # continuing a shared prefix's cache changes nothing
    prefix = shared_prefix(adapter, [e.prompt_ids for e in encoded] + [enc.prompt_ids[:3] + [5, 6]])
    assert prefix is not None and prefix.length >= 1
    traj2, _ = force_decode(adapter, enc.prompt_ids, enc.completion_ids, prefix=prefix)
    np.testing.assert_allclose(traj2, expected, rtol=1e-4, atol=1e-5)


def test_lens_at_the_last_layer_is_the_models_own_prediction(stories):
    adapter, tok = stories
    groups = load_groups(GROUPS, limit=1)
    enc = encode_groups(tok, groups, system_prompt=None, chat_template="auto")[0]
    readout = Readout(adapter)
    _, logp = force_decode(adapter, enc.prompt_ids, enc.completion_ids, readout, lens_tokens="last")
    _, logp_all = force_decode(adapter, enc.prompt_ids, enc.completion_ids, readout, lens_tokens="all")
    with torch.no_grad():
        for i, c in enumerate(enc.completion_ids):
            logits = adapter.model(torch.tensor([enc.prompt_ids + c])).logits[0]
            own = torch.log_softmax(logits[-len(c):].double(), -1)
            torch.testing.assert_close(logp[i, -1].double(), own[-1], rtol=1e-4, atol=1e-4)
            mean = own.exp().mean(0).log()
            torch.testing.assert_close(logp_all[i, -1].double(), mean, rtol=1e-4, atol=1e-4)
    with pytest.raises(LayerscopeError, match="lens_tokens"):
        force_decode(adapter, enc.prompt_ids, enc.completion_ids, readout, lens_tokens="first")


def test_cosine_and_kl_equal_a_direct_computation(stories):
    adapter, tok = stories
    groups = load_groups(GROUPS, limit=3)
    result = contrastive(adapter, tok, groups, model="stories", system_prompt=None, n_boot=50)
    encoded = encode_groups(tok, groups, system_prompt=None, chat_template="auto")
    readout = Readout(adapter)
    prefix = shared_prefix(adapter, [enc.prompt_ids for enc in encoded])
    decoded = [force_decode(adapter, enc.prompt_ids, enc.completion_ids, readout, prefix=prefix) for enc in encoded]
    mean = np.concatenate([traj for traj, _ in decoded]).mean(axis=0)  # [L+1, d]: every trajectory of the set
    for enc, (traj, logp) in zip(encoded, decoded):
        for j, relation in enumerate(groups.relations, start=1):
            for layer in (0, 2, adapter.n_layers):
                a, b = traj[0, layer], traj[j, layer]
                raw = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
                ac, bc = a - mean[layer], b - mean[layer]
                centred = ac @ bc / np.linalg.norm(ac) / np.linalg.norm(bc)
                p, q = logp[0, layer].double(), logp[j, layer].double()
                kl = float((p.exp() * (p - q)).sum())
                row = result.per_group[(result.per_group["group"] == enc.group.id)
                                       & (result.per_group["relation"] == relation)
                                       & (result.per_group["layer"] == layer)].iloc[0]
                assert row["cosine"] == pytest.approx(centred, rel=1e-6, abs=1e-9)
                assert row["cosine_raw"] == pytest.approx(raw, rel=1e-6)
                assert row["kl"] == pytest.approx(kl, rel=1e-6, abs=1e-9)
    for relation in groups.relations:
        assert result.summary["mean_cosine_by_layer"][relation] == pytest.approx(
            result.cosine[relation].mean(axis=0).tolist())
    diff = result.cosine["synonym"] - result.cosine["antonym"]
    assert result.summary["synonym_minus_antonym_by_layer"] == pytest.approx(diff.mean(axis=0).tolist())
    for key in ("crossover_layer", "first_flip_layer", "early_order", "crossover_layer_stability",
                "raw_crossover_layer"):
        assert key in result.summary
    assert result.summary["uncertainty"]["unit"] == "group" and result.summary["underpowered"]  # 3 groups


def test_a_common_offset_makes_raw_cosines_one_but_not_centred_ones():
    """Trajectories that share a large offset (the mean / massive directions of the residual stream): every raw
    cosine is ≈ 1 whatever the relation; centred on the set's mean, synonyms stay close and antonyms oppose."""
    rng = np.random.default_rng(0)
    n_groups, d, sites = 40, 16, 3
    offset = 1000.0 * np.eye(d)[0]
    anchor = rng.standard_normal((n_groups, sites, d))
    synonym = anchor + 0.1 * rng.standard_normal((n_groups, sites, d))
    antonym = -anchor + 0.1 * rng.standard_normal((n_groups, sites, d))
    trajectories = np.stack([anchor, synonym, antonym], axis=1) + offset
    centred, raw = trajectory_cosines(trajectories)
    assert (raw > 0.999).all()  # the raw cosine cannot tell the relations apart (the old definition)
    assert (centred[:, 0] > 0.9).all() and (centred[:, 1] < -0.9).all()
    np.testing.assert_allclose(trajectory_cosines(trajectories - offset)[0], centred, atol=1e-9)  # offset-free


def test_sign_test_at_the_crossover():
    from scipy.stats import binomtest

    assert sign_test(np.array([0.2, -0.1, -0.3, 0.0, -0.2]), late_sign=-1.0) == {
        "n_late_order": 3, "n_groups": 4, "p_value": pytest.approx(binomtest(3, 4, 0.5).pvalue)}
    assert sign_test(np.zeros(3), 1.0)["p_value"] is None


def test_groups_are_a_seeded_sample_not_the_first_n():
    groups = load_groups(GROUPS)
    sample, fragment = sample_groups(groups, 6, seed=0)
    ids = [g.id for g in sample.groups]
    assert len(ids) == 6 and ids != [g.id for g in groups.groups[:6]]
    assert ids == [g.id for g in groups.groups if g.id in ids]  # file order
    assert fragment["prompt_ids"] == ids and fragment["prompt_categories"] == {"contrastive": 6}
    assert [g.id for g in sample_groups(groups, 6, seed=0)[0].groups] == ids
    assert len(sample_groups(groups, None, seed=0)[0].groups) == len(groups.groups)


def test_crossover():
    assert crossover(np.array([0.2, 0.1, -0.1, -0.3])) == {
        "early_order": "synonym>antonym", "first_flip_layer": 2, "crossover_layer": 2}
    assert crossover(np.array([0.0, -0.2, 0.1, -0.1, 0.3, 0.2])) == {
        "early_order": "antonym>synonym", "first_flip_layer": 2, "crossover_layer": 4}
    assert crossover(np.array([0.1, 0.2, 0.3]))["crossover_layer"] is None
    assert crossover(np.array([0.1, -0.2, 0.3, -0.1])) == {
        "early_order": "synonym>antonym", "first_flip_layer": 1, "crossover_layer": 3}
    assert crossover(np.zeros(3))["early_order"] is None


def test_prompt_rendering(stories):
    _, tok = stories
    groups = load_groups(GROUPS, limit=2)
    plain = encode_groups(tok, groups, system_prompt="ignored without a template", chat_template="auto")
    text = groups.groups[0]
    assert plain[0].prompt_ids == tok(text.prompt)["input_ids"]  # BOS + prompt, like generate_completions
    assert plain[0].completion_ids[0] == tok(" " + text.anchor, add_special_tokens=False)["input_ids"]
    with pytest.raises(LayerscopeError, match="no chat template"):
        encode_groups(tok, groups, system_prompt=None, chat_template=True)
    assert common_prefix_length([[1, 2, 3], [1, 2, 4], [1, 2]]) == 1  # at least one token of each is left
    assert common_prefix_length([[1, 2], [3]]) == 0


def test_run_outputs_and_determinism(stories, stories_dir, tmp_path):
    adapter, tok = stories
    outputs = {"summary": tmp_path / "summary.json",
               **{f"table_{k}": tmp_path / f"{k}.parquet" for k in ("metrics", "per_group")},
               **{f"figure_{k}": tmp_path / f"{k}.png" for k in ("cosine", "kl", "crossover", "relations")}}
    params = {"groups": str(GROUPS), "max_groups": 4, "lens_tokens": "last", "seed": 0}
    render = {"dtype": "float32", "system_prompt": None, "chat_template": "auto"}
    result = run_experiment("contrastive", {"model": str(stories_dir), "groups": str(GROUPS)}, outputs,
                            params=params, wildcards={"model": "stories"}, render=render)
    assert all(p.is_file() for p in outputs.values())
    per_group = pd.read_parquet(outputs["table_per_group"])
    assert len(per_group) == 4 * 4 * (adapter.n_layers + 1)
    assert (per_group["kl"] >= 0).all() and (per_group["cosine"] <= 1 + 1e-9).all()
    sample, _ = sample_groups(load_groups(GROUPS), 4, seed=0)
    again = contrastive(adapter, tok, sample, model="stories", system_prompt=None)
    pd.testing.assert_frame_equal(result.tables["per_group"], again.per_group)
    summary = json.loads(outputs["summary"].read_text())
    assert summary["prompt_ids"] == [g.id for g in sample.groups]
    for key in ("cosine_mean_synonym", "cosine_last_antonym", "kl_mean_style"):
        lo, hi = summary[f"{key}_ci"]
        assert lo <= summary[key] <= hi
    assert len(summary["synonym_minus_antonym_by_layer_ci"]) == adapter.n_layers + 1
    assert 0 <= summary["crossover_layer_stability"] <= 1


def test_encoders_are_refused(tiny_dirs):
    adapter, tok = load_model(tiny_dirs["bert"]), load_tokenizer(tiny_dirs["bert"])
    with pytest.raises(LayerscopeError, match="need a decoder"):
        contrastive(adapter, tok, load_groups(GROUPS, limit=1), model="bert", system_prompt=None)
