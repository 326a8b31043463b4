"""The z_subspace suite: Z-mask, separation, update decomposition, patching, ARD-MMD and bridge.

Every quantity is checked against an independent computation (a dense SVD or eigendecomposition,
a plain loop, the model run block by block, a closed form) or a property it must have.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from layerscope import LayerscopeError
from layerscope.data.activations import extract_activations, sequences_from_completions
from layerscope.model.adapter import load_model
from layerscope.model.generate import generate_completions, stop_token_ids
from layerscope.data.paired_states import PairedStates
from layerscope.data.prompts import PromptSetError, load_prompt_set, zh_en_pairs
from tests.helpers.tiny_models import tiny_configs

from tests.helpers import REPO

DECODERS = [f for f in tiny_configs() if f != "bert"]

PAIRS = {"prompts": [
    {"id": "p1-en", "category": "add", "pair": "p1", "lang": "en", "answer": 5,
     "text": "Tom has 2 apples and gets 3 more. How many apples does he have?"},
    {"id": "p1-zh", "category": "add", "pair": "p1", "lang": "zh", "answer": 5, "text": "汤姆有2个苹果，又得到3个。他有几个苹果？"},
    {"id": "p2-en", "category": "mul", "pair": "p2", "lang": "en", "answer": 12,
     "text": "A box has 4 rows of 3 eggs. How many eggs are in the box?"},
    {"id": "p2-zh", "category": "mul", "pair": "p2", "lang": "zh", "answer": 12,
     "text": "一个盒子里有4排鸡蛋，每排3个。一共有几个鸡蛋？"},
    {"id": "p3-en", "category": "add", "pair": "p3", "lang": "en", "answer": 7,
     "text": "Lily had 10 cats and 3 ran away. How many cats are left?"},
    {"id": "p3-zh", "category": "add", "pair": "p3", "lang": "zh", "answer": 7, "text": "莉莉有10只猫，跑掉了3只。还剩几只猫？"},
    {"id": "p4-en", "category": "mul", "pair": "p4", "lang": "en", "answer": 9,
     "text": "Sam reads 3 books a day for 3 days. How many books does he read?"},
    {"id": "p4-zh", "category": "mul", "pair": "p4", "lang": "zh", "answer": 9, "text": "萨姆每天读3本书，读了3天。一共读了几本书？"},
]}


@pytest.fixture(scope="module")
def paired(tmp_path_factory, stories):
    """stories260K's activation cache of the four tiny pairs, and its Z-mask at layers 1 and 3."""
    from layerscope.experiments.z_subspace.z_mask import z_mask

    adapter, tok = stories
    root = tmp_path_factory.mktemp("paired")
    prompts = root / "pairs.json"
    prompts.write_text(json.dumps(PAIRS, ensure_ascii=False))
    ps = load_prompt_set(prompts)
    comp = generate_completions(adapter, tok, ps, model_dir=root, max_new_tokens=5, batch_size=4, system_prompt=None,
                                chat_template="auto")
    extract_activations(adapter, tok, sequences_from_completions(comp), root / "act/resid.safetensors",
                        root / "act/tokens.parquet", batch_size=3)
    mask = z_mask(adapter, model="stories", layers=[1, 3], k=[4, 16, 64], seed=3).mask
    return PairedStates.open(root / "act", prompts), mask


# ---------------------------------------------------------------------------- pairs


def test_shipped_zh_en_math_pairs():
    ps = load_prompt_set(REPO / "resources/prompt_sets/zh_en_math.json")
    pairs = zh_en_pairs(ps)
    assert len(pairs) >= 20 and len(ps) == 2 * len(pairs)
    assert len({p.category for p in pairs}) == 10
    for p in pairs:
        assert p.en.lang == "en" and p.zh.lang == "zh" and float(p.en.answer) == float(p.zh.answer)
        assert not any("\u4e00" <= c <= "\u9fff" for c in p.en.text)
        assert sum("\u4e00" <= c <= "\u9fff" for c in p.zh.text) > 5
    assert len({p.en.text for p in pairs}) == len(pairs) == len({p.zh.text for p in pairs})
    # round-robin order: the first 10 pairs cover every category, so `limit: 2N` stays balanced
    assert len({p.category for p in pairs[:10]}) == 10


def _write(tmp_path, prompts):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"prompts": prompts}, ensure_ascii=False))
    return path


def _p(pid, pair, lang, answer=3, category="c"):
    return {"id": pid, "category": category, "pair": pair, "lang": lang, "answer": answer, "text": f"text {pid}"}


@pytest.mark.parametrize("prompts, expected", [
    ([_p("a", "x", "en"), _p("b", "x", "zh"), _p("c", "x", "fr")], "exactly two prompts, found 3"),
    ([_p("a", "x", "en"), _p("b", "x", "en")], "both prompts (['a', 'b']) are in language 'en'"),
    ([_p("a", "x", "en"), _p("b", "x", "zh", answer=4)], "the answers differ"),
    ([_p("a", "x", "en"), _p("b", "x", "zh", category="d")], "different categories"),
    ([_p("a", "x", "en"), {**_p("b", "x", "zh"), "answer": None}], "both prompts need an 'answer'"),
    ([_p("a", "x", "en"), {k: v for k, v in _p("b", "x", "zh").items() if k != "lang"}], "have no 'lang'"),
])
def test_bad_pairs_fail_on_load(tmp_path, prompts, expected):
    with pytest.raises(PromptSetError) as info:
        load_prompt_set(_write(tmp_path, prompts))
    assert expected in str(info.value) and "pair 'x'" in str(info.value)


def test_answers_compare_as_numbers(tmp_path):
    ps = load_prompt_set(_write(tmp_path, [_p("a", "x", "en", answer=12), _p("b", "x", "zh", answer="12.0")]))
    assert len(zh_en_pairs(ps)) == 1


def test_zh_en_pairs_needs_whole_zh_en_pairs(tmp_path):
    ps = load_prompt_set(_write(tmp_path, [_p("a", "x", "en"), _p("b", "x", "fr")]))
    with pytest.raises(PromptSetError, match="lang 'fr'"):
        zh_en_pairs(ps)
    ps = load_prompt_set(_write(tmp_path, [_p("a", "x", "en"), _p("b", "x", "zh"), _p("c", "y", "en"),
                                           _p("d", "y", "zh")]), limit=3)
    with pytest.raises(PromptSetError, match="pair 'y' has only its 'en' prompt"):
        zh_en_pairs(ps)
    core = load_prompt_set(REPO / "resources/prompt_sets/core.json")
    with pytest.raises(PromptSetError, match="has no 'pair'"):
        zh_en_pairs(core)


def test_config_refuses_an_unpaired_prompt_set_for_the_suite():
    from layerscope.jobs import config as lsconfig

    cfg = {
        "models": {"m": {"source": {"type": "local", "path": "/x"}}},
        "prompt_sets": {"core": {"path": "resources/prompt_sets/core.json"},
                        "zh": {"path": "resources/prompt_sets/zh_en_math.json"}},
        "experiments": {"bridge": {"prompt_sets": ["core"]}},
    }
    with pytest.raises(lsconfig.ConfigError, match="bridge needs zh/en paired prompts, but prompt set 'core'"):
        lsconfig.validate_config(cfg, REPO / lsconfig.SCHEMA_FILE, base_dir=REPO)
    cfg["experiments"]["bridge"]["prompt_sets"] = ["zh"]
    cfg["prompt_sets"]["zh"]["limit"] = 3
    with pytest.raises(lsconfig.ConfigError, match="only its 'en' prompt"):
        lsconfig.validate_config(cfg, REPO / lsconfig.SCHEMA_FILE, base_dir=REPO)
    cfg["prompt_sets"]["zh"]["limit"] = 4
    filled = lsconfig.validate_config(cfg, REPO / lsconfig.SCHEMA_FILE, base_dir=REPO)
    assert filled["experiments"]["bridge"]["ridge"][0] == 0
    assert lsconfig.experiment_runs(filled, "bridge") == [{"model": "m", "pset": "zh"}]


# ---------------------------------------------------------------------------- Z-mask


def test_layer_and_k_specs():
    from layerscope.experiments.z_subspace.z_mask import ZMaskError, resolve_ks, resolve_layers

    assert resolve_layers([0.89, 0.92], 36) == [32, 33]  # the seed's layers of Qwen2.5-3B
    assert resolve_layers([0.89, 0.92], 30) == [27, 28]
    assert resolve_layers([0, 1.0, -1, 0.5], 30) == [0, 29, 15]
    assert resolve_layers([3, 0.1], 5) == [3, 1]
    for bad, msg in (([30], "outside"), ([-31], "outside"), ([1.5], "fraction"), ([], "empty"), (["x"], "neither")):
        with pytest.raises(ZMaskError, match=msg):
            resolve_layers(bad, 30)
    assert resolve_ks([20, 50, 1000], 576) == [20, 50, 576]
    assert resolve_ks([1000, 2000], 64) == [64]
    with pytest.raises(ZMaskError):
        resolve_ks([0], 64)


def test_qk_svd_equals_the_dense_svd():
    from layerscope.experiments.z_subspace.z_mask import qk_svd

    g = torch.Generator().manual_seed(0)
    wq, wk = torch.randn(8, 40, generator=g, dtype=torch.float64), torch.randn(8, 40, generator=g, dtype=torch.float64)
    s, vh = qk_svd(wq, wk)
    dense = wq.T @ wk
    s_ref = torch.linalg.svdvals(dense)[:8]
    torch.testing.assert_close(s, s_ref)
    torch.testing.assert_close(vh @ vh.T, torch.eye(8, dtype=torch.float64))
    # the right singular vectors reproduce M: M = Σ σ u vᵀ with u = M v / σ
    u = dense @ vh.T / s
    torch.testing.assert_close(u.T @ u, torch.eye(8, dtype=torch.float64))
    torch.testing.assert_close((u * s) @ vh, dense)


@pytest.mark.parametrize("family", ["stories", "qwen2", "gemma", "gpt2", "phi3"])
def test_head_circuits_map_gqa_heads_to_their_kv_head(family, stories_dir, tiny_dirs):
    from layerscope.experiments.z_subspace.z_mask import head_circuits

    adapter = load_model(stories_dir if family == "stories" else tiny_dirs[family])
    f = adapter.facts
    proj = adapter.projections(1)
    circuits = head_circuits(adapter, 1)
    assert len(circuits) == f.n_heads
    hd = f.head_dim
    for h, (s, vh) in enumerate(circuits):
        g = h * f.n_kv_heads // f.n_heads  # plain loop: the key/value head query head h shares
        dense = proj["q"][h * hd : (h + 1) * hd].double().T @ proj["k"][g * hd : (g + 1) * hd].double()
        u, s_ref, vh_ref = torch.linalg.svd(dense)
        torch.testing.assert_close(s, s_ref[:hd])
        r = int((s_ref > 1e-10 * s_ref[0]).sum())
        torch.testing.assert_close(vh[:r].T @ vh[:r], vh_ref[:r].T @ vh_ref[:r], atol=1e-8, rtol=0)


def test_z_basis_is_the_top_eigenspace_of_the_summed_head_projectors(stories):
    """V_Z from the stacked SVD equals the top-k eigenvectors of Σ_h V_hᵀ V_h (independent computation)."""
    from layerscope.experiments.z_subspace.z_mask import head_circuits, projector, z_basis

    adapter, _ = stories
    circuits = head_circuits(adapter, 2)
    d = adapter.facts.d_model
    for k in (3, 6):
        lm = z_basis(circuits, k, d)
        total = sum(vh[:k].T @ vh[:k] for _, vh in circuits)
        evals, evecs = torch.linalg.eigh(total)
        top = evecs[:, -k:].T
        assert evals[-k - 1] < evals[-k] - 1e-6  # a gap, so the subspace is unique
        torch.testing.assert_close(projector(lm.basis), projector(top), atol=1e-8, rtol=0)


def test_projectors_are_complementary_orthogonal_projectors(paired):
    from layerscope.experiments.z_subspace.z_mask import complement_projector, projector

    _, mask = paired
    d = mask.d_model
    eye = torch.eye(d, dtype=torch.float64)
    for (layer, k), basis in [*mask.bases.items(), *mask.randoms.items()]:
        v = basis.to(torch.float64)
        assert v.shape == (k, d)
        torch.testing.assert_close(v @ v.T, torch.eye(k, dtype=torch.float64), atol=1e-6, rtol=0)  # orthonormal rows
        p, q = projector(v), complement_projector(v)
        for m in (p, q):
            torch.testing.assert_close(m, m.T, atol=1e-6, rtol=0)
            torch.testing.assert_close(m @ m, m, atol=1e-6, rtol=0)
        torch.testing.assert_close(p + q, eye)
        torch.testing.assert_close(p @ q, torch.zeros_like(p), atol=1e-6, rtol=0)
        assert abs(float(torch.trace(p)) - k) < 1e-5 and abs(float(torch.trace(q)) - (d - k)) < 1e-5
    torch.testing.assert_close(projector(mask.basis(1, 64).double()), eye, atol=1e-6, rtol=0)  # k = d: P_Z = I


def test_random_control_is_seeded_and_differs_from_z(paired):
    from layerscope.experiments.z_subspace.z_mask import random_basis

    _, mask = paired
    again = random_basis(64, 16, seed=3, layer=1)
    torch.testing.assert_close(mask.random(1, 16).double(), again, atol=1e-7, rtol=0)
    assert not torch.allclose(random_basis(64, 16, seed=3, layer=3), again)
    assert not torch.allclose(random_basis(64, 16, seed=4, layer=1), again)
    overlap = float((mask.basis(1, 16).double() @ again.T).pow(2).sum() / 16)
    assert overlap < 0.9


def test_mask_file_round_trip_and_mismatch(paired, tmp_path):
    from layerscope.experiments.z_subspace.z_mask import ZMask, ZMaskError

    _, mask = paired
    mask.save(tmp_path / "m.safetensors")
    loaded = ZMask.load(tmp_path / "m.safetensors")
    assert loaded.layers == [1, 3] and loaded.ks == [4, 16, 64] and loaded.d_model == 64 and loaded.n_layers == 5
    for key in mask.bases:
        torch.testing.assert_close(loaded.basis(*key).double(), mask.basis(*key).double(), atol=1e-7, rtol=0)
    with pytest.raises(ZMaskError, match="built for a model with 5 layers"):
        loaded.check_fits(30, 576, "the cache")
    with pytest.raises(ZMaskError, match="no Z-mask"):
        ZMask.load(tmp_path / "missing.safetensors")


def test_z_mask_summary(stories):
    from layerscope.experiments.z_subspace.z_mask import z_mask

    adapter, _ = stories
    result = z_mask(adapter, model="s", layers=[0.89, 0.92, 2], k=[8, 100])
    s = result.summary
    assert s["layers"] == [4, 2] and s["k"] == [8, 64]
    assert s["combos"] == ["L4/k8", "L4/k64", "L2/k8", "L2/k64"]
    assert all(0 < e <= 1 for e in s["stack_energy_captured"]) and s["stack_energy_captured"][1] == pytest.approx(1.0)
    assert all(0 < r <= adapter.facts.head_dim for r in s["qk_effective_rank_per_layer"])
    assert len(result.metrics[result.metrics["metric"] == "qk_effective_rank"]) == 5 * adapter.facts.n_heads


# ---------------------------------------------------------------------------- separation and decomposition


def test_separation_against_a_plain_loop(paired):
    from layerscope.experiments.z_subspace.z_separation import z_separation

    states, mask = paired
    result = z_separation(states, mask, model="s", prompt_set="p", n_random_subspaces=100)
    zh, en = states.pooled(3)
    z = mask.basis(3, 16).double()
    p = z.T @ z
    n = zh.shape[0]
    pz, pe = zh @ p, en @ p
    paired_d = np.mean([float((pz[i] - pe[i]).norm()) for i in range(n)])
    cross = np.mean([float((pz[i] - pe[j]).norm()) for i in range(n) for j in range(n) if i != j])
    delta = zh - en
    lang = sum(float((delta[i] @ p).pow(2).sum()) for i in range(n)) / sum(float(delta[i].pow(2).sum()) for i in range(n))
    row = next(c for c in result.summary["by_combo"] if c["layer"] == 3 and c["k"] == 16)
    assert row["separation_ratio_z"] == pytest.approx(paired_d / cross, rel=1e-9)
    assert row["language_energy_z"] == pytest.approx(lang, rel=1e-9)
    assert row["language_energy_z_perp"] == pytest.approx(1 - lang, rel=1e-9)
    assert row["language_energy_over_chance_z"] == pytest.approx(lang / (16 / 64), rel=1e-9)
    full = next(c for c in result.summary["by_combo"] if c["layer"] == 3 and c["k"] == 64)
    assert full["language_energy_z"] == pytest.approx(1.0) and full["separation_ratio_z"] == pytest.approx(
        full["separation_ratio_full"])
    assert result.summary["combos"][0] == "L1/k4"


def test_pooled_states_are_means_over_the_problem_text(paired):
    states, _ = paired
    tokens = states.cache.tokens
    pair = states.pairs[1]
    rows = tokens[(tokens["prompt_id"] == pair.zh.id) & (tokens["role"] == "prompt")]["row"].to_numpy()
    assert len(rows) > 3 and (np.diff(rows) == 1).all()
    zh, _ = states.pooled(2)
    torch.testing.assert_close(zh[1], states.cache.resid(2, rows).double().mean(0))


def test_last_token_pooling_picks_each_prompts_last_problem_text_token(paired):
    """A plain loop over the token table: the highest position with role 'prompt', per prompt."""
    states, _ = paired
    tokens = states.cache.tokens
    zh, en = states.pooled(2, "last")
    for i, pair in enumerate(states.pairs):
        for prompt, pooled in ((pair.zh, zh), (pair.en, en)):
            mine = tokens[(tokens["prompt_id"] == prompt.id) & (tokens["role"] == "prompt")]
            last = int(mine.loc[mine["position"].idxmax(), "row"])
            torch.testing.assert_close(pooled[i], states.cache.resid(2, np.array([last])).double()[0])
    with pytest.raises(LayerscopeError, match="unknown pooling 'max'"):
        states.pooled(2, "max")


def test_separation_reports_every_pooling_beside_the_first(paired):
    from layerscope.experiments.z_subspace.z_separation import POOLED_KEYS, with_poolings, z_separation

    states, mask = paired
    runs = {p: z_separation(states, mask, model="s", prompt_set="p", n_random_subspaces=50, pooling=p)
            for p in ("mean", "last")}
    merged = with_poolings(runs).summary
    assert merged["poolings"] == ["mean", "last"]
    assert merged["separation_ratio_z"] == runs["mean"].summary["separation_ratio_z"]
    for key in POOLED_KEYS:
        assert merged[f"{key}_last"] == runs["last"].summary[key]
    assert merged["separation_ratio_z_last_ci"] == runs["last"].summary["separation_ratio_z_ci"]
    assert merged["separation_ratio_z_last"] != merged["separation_ratio_z"]  # a different pooled vector
    frame = with_poolings(runs).metrics
    assert set(frame["pooling"]) == {"mean", "last"}


def test_update_decomposition_against_a_plain_loop(paired):
    from layerscope.experiments.z_subspace.update_decomposition import chance_ratio, update_decomposition

    states, mask = paired
    result = update_decomposition(states, mask, model="s", prompt_set="p", n_random_subspaces=100)
    assert result.summary["skipped_combos"] == ["L1/k64", "L3/k64"]  # R is undefined for k = d
    z = mask.basis(1, 4).double()
    p = z.T @ z
    for lang in ("zh", "en"):
        for j in (0, 3):
            ins, outs = [], []
            for pair in states.pairs:
                pid = pair.zh.id if lang == "zh" else pair.en.id
                rows = states.rows[pid]
                upd = (states.cache.resid(j + 1, rows).double() - states.cache.resid(j, rows).double()).mean(0)
                ins.append(float((p @ upd).norm()))
                outs.append(float(((torch.eye(64, dtype=torch.float64) - p) @ upd).norm()))
            assert result.curves[(1, 4)][lang][j] == pytest.approx(np.mean(ins) / np.mean(outs), rel=1e-8)
    assert chance_ratio(16, 64) == pytest.approx(math.sqrt(16 / 48))


def test_random_subspace_ratio_matches_its_expectation():
    """For isotropic updates a random k-subspace gets R ≈ √(k/(d−k))."""
    from layerscope.experiments.z_subspace.update_decomposition import chance_ratio, ratio_curve
    from layerscope.experiments.z_subspace.z_mask import random_basis

    g = torch.Generator().manual_seed(0)
    updates = torch.randn(3, 400, 128, generator=g, dtype=torch.float64)
    r = ratio_curve(updates, random_basis(128, 32, seed=0, layer=0))
    np.testing.assert_allclose(r, chance_ratio(32, 128), rtol=0.05)


# ---------------------------------------------------------------------------- optimal transport


def test_ot_plan_marginals_and_identity_coupling():
    from layerscope.experiments.z_subspace.z_patching import ot_plan, transported_sources

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(4, 5, generator=g, dtype=torch.float64)
    plan = ot_plan(a, b)
    np.testing.assert_allclose(plan.sum(axis=1), np.full(7, 1 / 7), atol=1e-12)
    np.testing.assert_allclose(plan.sum(axis=0), np.full(4, 1 / 4), atol=1e-12)
    assert (plan >= 0).all()
    # it is optimal: no other coupling from a set of random ones is cheaper (and the LP optimum is a vertex)
    cost = torch.cdist(a, b).pow(2).numpy()
    best = (plan * cost).sum()
    from scipy.optimize import linprog

    n, m = cost.shape
    eq = np.zeros((n + m, n * m))
    for i in range(n):
        eq[i, i * m : (i + 1) * m] = 1
    for j in range(m):
        eq[n + j, j::m] = 1
    lp = linprog(cost.ravel(), A_eq=eq, b_eq=np.r_[np.full(n, 1 / n), np.full(m, 1 / m)], bounds=(0, None))
    assert best == pytest.approx(lp.fun, rel=1e-9)
    # identical clouds: the identity coupling, and every token is its own source
    same = ot_plan(a, a.clone())
    np.testing.assert_allclose(same, np.eye(7) / 7, atol=1e-12)
    torch.testing.assert_close(transported_sources(a, same), a)
    # sources are barycentres: their mean over target tokens is the source mean
    torch.testing.assert_close(transported_sources(a, plan).mean(0), a.mean(0))


# ---------------------------------------------------------------------------- patching


def _blockwise_patched_logits(adapter, ids, layer, positions, source, kind, basis):
    """Independent computation: run blocks one by one, patch resid.layer by the textbook formula, read out."""
    inputs = adapter.capture_block_inputs(ids)
    h = adapter.run_blocks(inputs.resid0, range(layer), inputs)
    h = h.clone()
    x = h[0, positions].double()
    s = source.double()
    if kind == "full":
        new = s
    else:
        p = basis.double().T @ basis.double()
        q = torch.eye(p.shape[0], dtype=torch.float64) - p
        new = x @ q + s @ p if kind in ("z", "random") else x @ p + s @ q
    h[0, positions] = new.to(h.dtype)
    h = adapter.run_blocks(h, range(layer, adapter.n_layers), inputs)
    return adapter.readout(h)


@pytest.mark.parametrize("family", ["stories", "qwen2", "gpt2"])
def test_patched_forward_equals_a_blockwise_computation(family, stories_dir, tiny_dirs):
    from layerscope.experiments.z_subspace.z_mask import random_basis
    from layerscope.experiments.z_subspace.z_patching import Patch, patched_logits

    adapter = load_model(stories_dir if family == "stories" else tiny_dirs[family])
    d = adapter.facts.d_model
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 500, (1, 12), generator=g)
    positions = np.arange(3, 9)
    source = torch.randn(len(positions), d, generator=g) * 2
    basis = random_basis(d, d // 4, seed=0, layer=0).float()
    layer = 1
    for kind in ("z", "z_perp", "full", "random"):
        patch = Patch(layer, kind, None if kind == "full" else basis, positions, source)
        got = patched_logits(adapter, ids, [patch])[0]
        ref = _blockwise_patched_logits(adapter, ids, layer, positions, source, kind, basis)[0]
        torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)
        plain = adapter.model(input_ids=ids).logits[0]
        # positions before the first patched one are untouched (causal), later ones change; the
        # products that compute them also hold the patched rows, so agreement is to float32 rounding
        torch.testing.assert_close(got[:3], plain[:3], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(got[9:], plain[9:])


def _own_states(adapter, ids, layer):
    """The states that reach block `layer` during a batched forward of `ids`, recorded by a hook."""
    seen = {}

    def hook(module, args, kwargs):
        seen["h"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    handle = adapter.blocks[layer].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            adapter.model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    return seen["h"]


def test_patching_with_own_states_reproduces_the_unpatched_model(paired, stories):
    from layerscope.experiments.z_subspace.z_patching import Patch, generate_patched, patch_states, patched_logits

    adapter, tok = stories
    states, mask = paired
    pair = states.pairs[0]
    prompt = states.prompt_ids(pair.en.id)
    positions = states.positions(pair.en.id)
    kinds = ["z", "z_perp", "full", "random"]
    ids = torch.tensor([prompt] * (len(kinds) + 1))
    # each row is patched with its own recorded state: a batched CPU matmul need not give every row
    # bit-identical results, so row 0's state is not row 4's to the last bit
    own = _own_states(adapter, ids, 3)[:, positions]
    patches = [None] + [Patch(3, kind, None if kind == "full" else mask.basis(3, 16), positions, own[row])
                        for row, kind in enumerate(kinds, start=1)]
    # the patch itself is exact: h + P(h − h) is h bit for bit (the same arithmetic on the same inputs)
    for row, kind in enumerate(kinds, start=1):
        h = own[row]
        assert torch.equal(patch_states(h, h, kind, None if kind == "full" else mask.basis(3, 16)), h)
    # the two forwards run along different code paths (a hooked block clones its input), so the
    # logits agree to float32 accumulation, not necessarily bit for bit on every machine
    logits = patched_logits(adapter, ids, patches)
    plain = patched_logits(adapter, ids, [None] * len(patches))
    torch.testing.assert_close(logits, plain, rtol=1e-5, atol=1e-5)
    stops = stop_token_ids(tok, adapter.config)
    gen = generate_patched(adapter, prompt, patches, max_new_tokens=8, stops=stops, pad_id=0)
    with torch.no_grad():
        ref = adapter.model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                                     pad_token_id=0, eos_token_id=stops)[0, len(prompt):].tolist()
    from layerscope.model.generate import _cut

    assert all(g == _cut(ref, set(stops), 8)[0] for g in gen)
    assert states.cached_completion(pair.en.id)[:5] == gen[0][:5]


def test_z_patching_with_k_equal_d_is_full_patching(paired, stories):
    from layerscope.experiments.z_subspace.z_patching import Patch, generate_patched, patched_logits

    adapter, tok = stories
    states, mask = paired
    pair = states.pairs[2]
    prompt = states.prompt_ids(pair.en.id)
    positions = states.positions(pair.en.id)
    zh = states.layer_states(1)[pair.zh.id].float()
    source = zh.mean(0).expand(len(positions), -1)
    patches = [Patch(1, "z", mask.basis(1, 64), positions, source), Patch(1, "full", None, positions, source),
               Patch(1, "z_perp", mask.basis(1, 64), positions, source)]
    logits = patched_logits(adapter, torch.tensor([prompt] * 3), patches)
    torch.testing.assert_close(logits[0], logits[1], atol=1e-4, rtol=1e-4)
    plain = adapter.model(input_ids=torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(logits[2], plain, atol=1e-4, rtol=1e-4)  # Z⊥ is empty: nothing changes
    assert not torch.allclose(logits[1], plain, atol=1e-2)
    gen = generate_patched(adapter, prompt, patches, max_new_tokens=8, stops=stop_token_ids(tok, adapter.config),
                           pad_id=0)
    assert gen[0] == gen[1]


def test_positions_all_patches_every_generated_token(paired, stories):
    from layerscope.experiments.z_subspace.z_patching import PatchHooks, pair_patches

    adapter, tok = stories
    states, mask = paired
    pair = states.pairs[0]
    prompt = states.prompt_ids(pair.en.id)
    positions = states.positions(pair.en.id)
    ls = states.layer_states(3)
    conds = pair_patches(ls[pair.zh.id], ls[pair.en.id], positions, mask, 3, ["mean"], positions="all")
    full = next(p for c, _, _, _, p in conds if c == "full")
    seen = []

    def after(module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    with PatchHooks(adapter, [full]), torch.no_grad():
        # registered after the patch hook, so it sees the patched states
        handle = adapter.blocks[3].register_forward_pre_hook(after, with_kwargs=True)
        try:
            adapter.model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=4, min_new_tokens=4,
                                   do_sample=False, pad_token_id=0)
        finally:
            handle.remove()
    target = ls[pair.zh.id].float().mean(0)
    prefill = seen[0][0]
    torch.testing.assert_close(prefill[positions], target.expand(len(positions), -1))
    assert not torch.allclose(prefill[: positions.min()], target.expand(int(positions.min()), -1))
    assert len(seen) == 4  # prefill + 3 decoding steps (the 4th token needs no forward)
    for step in seen[1:]:
        torch.testing.assert_close(step[0, -1], target)


def test_z_patching_outputs(paired, stories):
    from layerscope.experiments.z_subspace.z_patching import z_patching

    adapter, tok = stories
    states, mask = paired
    result = z_patching(adapter, tok, states, mask, model="s", prompt_set="p", max_new_tokens=6, sources=["mean", "ot"])
    table = result.table
    n_cond = 1 + 2 * 2 + 2 * 3 * 3 * 2  # none + full(layer, source) + 3 subspaces x (layer, k, source)
    assert len(table) == 4 * n_cond
    assert set(table["condition"]) == {"none", "z", "z_perp", "full", "random"}
    s = result.summary
    assert s["n_pairs"] == 4 and len(s["combos"]) == 2 * 3 * 2 and len(s["verdict"]) == 12
    assert s["n_double_dissociation"] + s["n_partial"] + s["n_null"] + s["n_insufficient_data"] == 12
    assert s["baseline_matches_cached_completion"] == 1.0
    # 4 pairs: exact intervals are wide, so no verdict can separate Z from Z⊥, and the summary says so
    assert s["n_insufficient_data"] == 12 and s["underpowered"]
    assert any("only 4 pairs" in r for r in s["underpowered_reasons"])
    assert s["uncertainty"]["unit"] == "pair" and "Clopper" in s["uncertainty"]["method"]
    assert s["prompt_ids"] == ["p1", "p2", "p3", "p4"] and s["prompt_categories"] == {"add": 2, "mul": 2}
    for key in ("z_answer_change", "z_perp_answer_change", "random_answer_change", "z_language_preservation"):
        for value, (lo, hi) in zip(s[key], s[f"{key}_ci"]):
            assert 0 <= lo <= value <= hi <= 1 and hi - lo > 0.39  # n = 4: [0, 0.60] at best
    # k = d: Z-patching gives the full patch's output, Z⊥-patching the unpatched one
    for source in ("mean", "ot"):
        z = table[(table.condition == "z") & (table.k == 64) & (table.layer == 3) & (table.source == source)]
        f = table[(table.condition == "full") & (table.layer == 3) & (table.source == source)]
        zp = table[(table.condition == "z_perp") & (table.k == 64) & (table.layer == 3) & (table.source == source)]
        none = table[table.condition == "none"]
        assert z["text"].tolist() == f["text"].tolist()
        assert zp["text"].tolist() == none["text"].tolist()
    row = next(r for r in s["by_combo"] if r["k"] == 64 and r["layer"] == 3 and r["source"] == "mean")
    assert row["full_resemblance_z"] == 1.0 and row["z_perp_answer_change"] == 0.0
    assert "| problem | answer | original (en)" in result.markdown


# ---------------------------------------------------------------------------- reading outputs, verdict


def test_answer_extraction_and_language():
    from layerscope.experiments.z_subspace.z_patching import cjk_fraction, extract_answer, language

    assert extract_answer("First 3 + 4 = 7, so the answer is 1,500 apples.") == 1500
    assert extract_answer("答案是１２个。") == 12  # full-width digits
    assert extract_answer("It costs 2.5 dollars.") == 2.5
    assert extract_answer("-4 degrees") == -4
    assert extract_answer("no number here") is None
    assert cjk_fraction("abc") == 0 and cjk_fraction("苹果") == 1 and math.isnan(cjk_fraction("12 + 3"))
    assert cjk_fraction("ab苹果") == 0.5
    assert language("The answer is 5.") == "en"
    assert language("他有5个苹果。") == "zh"
    assert language("He has 5 苹果 apples 个") == "mixed"
    assert language("5 + 3") == "none"


def test_verdict_rules():
    from layerscope.experiments.z_subspace.z_patching import mcnemar_p, verdict_point

    base = dict(z_answer_change=0.8, z_language_preservation=0.9, z_perp_language_disruption=0.7,
                z_perp_answer_change=0.1)
    assert verdict_point(base) == "double_dissociation"
    assert verdict_point({**base, "z_language_preservation": 0.2}) == "partial"
    assert verdict_point({**base, "z_perp_answer_change": 0.7}) == "null"
    assert verdict_point({**base, "z_answer_change": 0.3, "z_perp_answer_change": 0.1}) == "partial"
    assert verdict_point({**base, "z_answer_change": 0.25, "z_perp_answer_change": 0.1}) == "null"
    assert mcnemar_p([True] * 8, [False] * 8) == pytest.approx(2 / 2**8)
    assert mcnemar_p([True, False], [True, False]) == 1.0


# ---------------------------------------------------------------------------- MMD and ARD


def _mmd_loop(x, y, ls):
    """The unbiased MMD² by its definition, in plain Python loops over numpy rows."""
    k = lambda a, b: math.exp(-0.5 * float((((a - b) / ls) ** 2).sum()))  # noqa: E731
    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return xx + yy - 2 * xy


def test_unbiased_mmd_against_the_definition_and_batched():
    from layerscope.experiments.z_subspace.ard_mmd import BucketedClouds, PaddedClouds, batched_mmd2, mmd2_unbiased

    g = torch.Generator().manual_seed(0)
    clouds = [(torch.randn(6 + i, 4, generator=g, dtype=torch.float64),
               torch.randn(5 + 2 * i, 4, generator=g, dtype=torch.float64) + 0.5) for i in range(3)]
    ls = torch.tensor([0.7, 1.0, 2.0, 3.0], dtype=torch.float64)
    for x, y in clouds:
        assert float(mmd2_unbiased(x, y, ls)) == pytest.approx(_mmd_loop(x.numpy(), y.numpy(), ls.numpy()), rel=1e-10)
    reference = torch.stack([mmd2_unbiased(x, y, ls) for x, y in clouds])
    torch.testing.assert_close(batched_mmd2(PaddedClouds.build(clouds, dtype=torch.float64), ls), reference)
    # buckets of similar sizes, returned in the pairs' own order (the largest pair comes first here)
    bucketed = BucketedClouds(clouds[::-1], bucket=2, dtype=torch.float64)
    assert [len(g) for g in bucketed.groups] == [2, 1]
    torch.testing.assert_close(bucketed.mmd2(ls), reference.flip(0))


def test_unbiased_mmd_is_zero_for_one_distribution_and_positive_for_a_shift():
    from layerscope.experiments.z_subspace.ard_mmd import mmd2_unbiased

    g = torch.Generator().manual_seed(0)
    same = [float(mmd2_unbiased(torch.randn(150, 3, generator=g), torch.randn(120, 3, generator=g), 1.5))
            for _ in range(20)]
    shifted = [float(mmd2_unbiased(torch.randn(150, 3, generator=g), torch.randn(120, 3, generator=g) + 0.7, 1.5))
               for _ in range(20)]
    assert abs(np.mean(same)) < 0.005 and max(abs(v) for v in same) < 0.03
    assert min(shifted) > 0.05
    with pytest.raises(LayerscopeError, match="at least 2 samples"):
        mmd2_unbiased(torch.randn(1, 3), torch.randn(5, 3))


@pytest.fixture
def one_thread():
    """Hundreds of tiny autograd steps: one thread avoids synchronisation costs on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_ard_shuts_off_dimensions_without_a_difference(one_thread):
    from layerscope.experiments.z_subspace.ard_mmd import BucketedClouds, median_scale, optimise, standardise

    g = torch.Generator().manual_seed(0)
    d, clouds = 8, []
    for _ in range(10):
        x, y = torch.randn(30, d, generator=g), torch.randn(25, d, generator=g)
        y[:, :2] += 1.0  # only dimensions 0 and 1 tell the samples apart
        clouds.append((x, y))
    padded = BucketedClouds(standardise(clouds), bucket=4)
    init = torch.zeros(d)
    scale = median_scale(padded, init)
    for lam in (0.01, 0.1):
        run = optimise(padded, init, scale, lam, steps=200, lr=0.05, tol=1e-3)
        log10 = run.log_ratio / math.log(10)
        assert (log10[2:] > 1.0).all(), log10  # shut off: ℓ > 10 s
        assert (log10[:2] < 0.0).all(), log10  # the informative dimensions stay sensitive
        assert run.mmd[-1] > run.mmd[0]
        assert len(run.objective) == 201


def test_ard_mmd_outputs(paired):
    from layerscope.experiments.z_subspace.ard_mmd import ard_mmd

    states, mask = paired
    result = ard_mmd(states, mask, model="s", prompt_set="p", lambdas=[0.01, 0.1], steps=30, lr=0.05, warm_start_k=16)
    s = result.summary
    assert s["combos"] == ["L1/λ0.01", "L1/λ0.1", "L3/λ0.01", "L3/λ0.1"]
    for key in ("mmd_init", "mmd_final"):
        for value, (lo, hi) in zip(s[key], s[f"{key}_ci"]):
            assert np.isfinite([lo, hi]).all() and lo <= value <= hi
    for run, row in zip(result.runs.values(), s["by_run"]):
        assert row["mmd_final"] == pytest.approx(float(run.mmd[-1]), rel=1e-5)  # float32 mean vs float64 mean
    assert s["uncertainty"]["unit"] == "pair" and s["underpowered"]  # 4 pairs
    assert all(p != p or 0 < p <= 1 for p in s["overlap_z_k16_p_value"])
    assert s["warm_start_k"] == 16 and all(0 <= n <= 64 for n in s["n_active"])
    assert len(result.trajectory) == 4 * 31 and len(result.lengthscales) == 4 * 64
    assert all(0 <= o <= 1 for o in s["overlap_z_k16"] if o == o)
    assert all(0 <= c <= 1 for c in s["changed_from_warm_start"])
    with pytest.raises(LayerscopeError, match="warm_start_k = 5"):
        ard_mmd(states, mask, model="s", prompt_set="p", lambdas=[0.1], steps=2, lr=0.05, warm_start_k=5)


def test_ard_mmd_over_a_grid_of_layers(paired):
    """A grid beyond the mask's own layers: one run per (layer, λ), each warm-started from that block's own Z."""
    from layerscope.experiments.z_subspace.ard_mmd import ard_mmd
    from layerscope.experiments.z_subspace.z_mask import energy_per_dimension

    states, mask = paired
    result = ard_mmd(states, mask, model="s", prompt_set="p", lambdas=[0.01, 0.1], steps=3, lr=0.05,
                     warm_start_k=16, layers=[0, 2, 4])
    s = result.summary
    assert s["layers"] == [0, 2, 4] and len(s["by_run"]) == 6
    assert [(r["layer"], r["lambda"]) for r in s["by_run"]] == [(0, 0.01), (0, 0.1), (2, 0.01), (2, 0.1),
                                                               (4, 0.01), (4, 0.1)]
    assert s["by_run"][2]["active_at_warm_start"] != s["by_run"][4]["active_at_warm_start"] or \
        not np.allclose(energy_per_dimension(mask.basis(2, 16)), energy_per_dimension(mask.basis(4, 16)))
    fractions = ard_mmd(states, mask, model="s", prompt_set="p", lambdas=[0.1], steps=2, lr=0.05, warm_start_k=16,
                        layers=[0.0, 0.5])
    assert fractions.summary["layers"] == [0, 3]  # fractions of the 5-block depth, rounded as z_mask.layers
    with pytest.raises(LayerscopeError, match="ard_mmd.layers: layer 9 is outside"):
        ard_mmd(states, mask, model="s", prompt_set="p", lambdas=[0.1], steps=2, lr=0.05, warm_start_k=16, layers=[9])


def test_separation_over_a_k_sweep(paired):
    from layerscope.experiments.z_subspace.z_separation import z_separation

    states, mask = paired
    result = z_separation(states, mask, model="s", prompt_set="p", n_random_subspaces=20, ks=[4, 16])
    assert result.summary["k"] == [4, 16] and result.summary["combos"] == ["L1/k4", "L1/k16", "L3/k4", "L3/k16"]
    with pytest.raises(LayerscopeError, match=r"no basis of size \[8\]"):
        z_separation(states, mask, model="s", prompt_set="p", n_random_subspaces=20, ks=[8])


def test_overlap_with_energy():
    from layerscope.experiments.z_subspace.ard_mmd import overlap_with_energy, warm_start

    energy = np.array([0.9, 0.8, 0.1, 0.05, 0.0])
    assert overlap_with_energy(np.array([1, 1, 0, 0, 0], bool), energy) == 1.0
    assert overlap_with_energy(np.array([0, 0, 0, 1, 1], bool), energy) == 0.0
    assert math.isnan(overlap_with_energy(np.zeros(5, bool), energy))
    theta = warm_start(torch.tensor(energy), 0.1)
    assert (torch.diff(theta) > 0).all()  # more Z energy, shorter lengthscale


# ---------------------------------------------------------------------------- bridge


def test_bridge_recovers_a_planted_rotation():
    from layerscope.experiments.z_subspace.bridge import bridge_fit

    rng = np.random.default_rng(0)
    k, n = 6, 20
    rot, _ = np.linalg.qr(rng.standard_normal((k, k)))
    x = rng.standard_normal((n, k))
    for intercept in (True, False):
        y = x @ rot + (np.arange(k) if intercept else 0)
        fit = bridge_fit(x, y, [0, 0.01, 1], intercept=intercept)
        assert fit.alpha_rel == 0
        assert fit.r2 == pytest.approx(1.0) and fit.loo_r2 == pytest.approx(1.0)
        assert fit.orthogonality_error < 1e-10
        np.testing.assert_allclose(fit.singular_values, 1.0, atol=1e-10)
        # deranged pairings predict nothing: the planted map is above every one of them
        assert fit.null_summary["null_mean"] < 0.5 and fit.null_summary["percentile"] == 100
        assert fit.null_summary["p_value"] == pytest.approx(1 / (fit.null.size + 1))
    from layerscope.experiments.z_subspace.bridge import fit_bridge

    np.testing.assert_allclose(fit_bridge(x, x @ rot, 0).w, rot, atol=1e-10)


def test_bridge_loo_is_low_for_noise_and_matches_the_closed_form():
    from layerscope.experiments.z_subspace.bridge import bridge_fit, loo_predictions

    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((25, 5)), rng.standard_normal((25, 5))
    fit = bridge_fit(x, y, [0, 0.1, 1, 10], n_shuffles=200)
    assert fit.r2 > 0 and fit.loo_r2 < 0.1 and fit.null_summary["p_value"] > 0.05
    # PRESS residuals of least squares with an intercept in closed form: e_i / (1 − h_ii), hat matrix of [1, X]
    a = np.c_[np.ones(25), x]
    hat = a @ np.linalg.solve(a.T @ a, a.T)
    press = (y - hat @ y) / (1 - np.diag(hat))[:, None]
    np.testing.assert_allclose(loo_predictions(x, y, 0.0), y - press, atol=1e-10)
    # with a ridge, each fold is the ridge fit of the other pairs (α relative to that fold's own scale)
    keep = np.arange(25) != 7
    xc = x[keep] - x[keep].mean(0)
    alpha = 0.3 * (xc**2).sum() / 5
    w = np.linalg.solve(xc.T @ xc + alpha * np.eye(5), xc.T @ (y[keep] - y[keep].mean(0)))
    np.testing.assert_allclose(loo_predictions(x, y, 0.3)[7], (x[7] - x[keep].mean(0)) @ w + y[keep].mean(0),
                               atol=1e-10)


def test_bridge_on_the_cache(paired):
    from layerscope.experiments.z_subspace.bridge import bridge

    states, mask = paired
    result = bridge(states, mask, model="s", prompt_set="p", ridge=[0, 0.1, 1], n_shuffles=50)
    s = result.summary
    assert len(s["loo_r2"]) == 6 and all(a in (0, 0.1, 1) for a in s["alpha_rel"])
    assert s["n_shuffles"] == 50 and all(0 < p <= 1 for p in s["loo_r2_p_value"])
    for value, (lo, hi) in zip(s["loo_r2"], s["loo_r2_ci"]):
        assert lo <= value <= hi
    row = s["by_combo"][0]
    assert row["underdetermined"] and row["r2"] <= 1
    assert set(result.metrics["metric"]) >= {"loo_r2", "r2", "orthogonality_error", "singular_value_0"}



# ---------------------------------------------------------------------------- the registry: every run function


def _defaults(name, **overrides):
    from layerscope.experiments.registry import get

    params = {key: spec["default"] for key, spec in get(name).params.items()}
    return {**params, "seed": 0, **overrides}


def _check_uncertainty(summary):
    """Every summary says how sure it is; every interval is finite and holds its point value."""
    assert set(summary["uncertainty"]) == {"unit", "n_units", "n_boot", "level", "method"}
    assert summary["uncertainty"]["unit"] == "pair" and isinstance(summary["underpowered"], bool)
    assert summary["underpowered"] == bool(summary["underpowered_reasons"])

    def check(point, ci):
        if isinstance(point, list):
            assert isinstance(ci, list) and len(ci) == len(point)
            for p, c in zip(point, ci):
                check(p, c)
        elif isinstance(point, (int, float)) and not isinstance(point, bool) and math.isfinite(point):
            lo, hi = ci
            assert math.isfinite(lo) and math.isfinite(hi) and lo - 1e-9 <= point <= hi + 1e-9, (point, ci)

    n = 0
    for key, ci in summary.items():
        if key.endswith("_ci") and key[:-3] in summary:
            check(summary[key[:-3]], ci)
            n += 1
    assert n >= 1


def test_the_suite_runs_through_the_registry(paired, stories_dir, tmp_path):
    """z_mask writes its mask as a file output; the five readers read it as input "mask" and write what they declare."""
    from safetensors import safe_open

    from layerscope.experiments.registry import get
    from layerscope.experiments.z_subspace.bridge import bridge
    from layerscope.experiments.z_subspace.z_mask import ZMask
    from layerscope.jobs.writer import run_experiment

    states, _ = paired
    act = states.cache.directory
    prompts = act.parent / "pairs.json"

    def outputs(name):
        exp = get(name)
        return {key: str(tmp_path / name / Path(pattern).name) for key, pattern in exp.outputs("png").items()}

    out = outputs("z_mask")
    run_experiment("z_mask", {"model": str(stories_dir)}, out, params=_defaults("z_mask", layers=[1, 3], k=[4, 16]),
                   wildcards={"model": "stories"})
    mask = ZMask.load(out["file_z_mask"])
    assert Path(out["file_z_mask"]).name == "z_mask.safetensors" and mask.layers == [1, 3] and mask.ks == [4, 16]
    inputs = {"mask": out["file_z_mask"], "resid": str(act / "resid.safetensors"),
              "tokens": str(act / "tokens.parquet"), "prompts": str(prompts)}
    overrides = {"z_patching": {"max_pairs": 2, "max_new_tokens": 4, "sources": ["mean"]},
                 "ard_mmd": {"lambdas": [0.01], "steps": 10, "lr": 0.05},
                 "bridge": {"ridge": [0, 0.1], "n_shuffles": 50},
                 "z_separation": {"n_random_subspaces": 50}, "update_decomposition": {"n_random_subspaces": 50}}
    results = {}
    for name in ("z_separation", "update_decomposition", "z_patching", "ard_mmd", "bridge"):
        exp = get(name)
        assert exp.data == "paired" and exp.section == "z_subspace" and "mask" in exp.inputs
        job_inputs = {**inputs, **({"model": str(stories_dir)} if "model" in exp.inputs else {})}
        out = outputs(name)
        results[name] = run_experiment(name, job_inputs, out, params=_defaults(name, **overrides.get(name, {})),
                                       wildcards={"model": "stories", "pset": "pairs"},
                                       render={"dtype": "float32"} if exp.render else None)
        assert all(Path(path).is_file() for path in out.values()), name
        summary = json.loads(Path(out["summary"]).read_text())
        assert summary["provenance"]["experiment"] == name and summary["n_pairs"] == (2 if name == "z_patching" else 4)
        _check_uncertainty(summary)
        # the pair sample: stratified by category (one of each for 2 pairs), listed by pair id
        assert summary["prompt_categories"] == ({"add": 1, "mul": 1} if name == "z_patching" else {"add": 2, "mul": 2})
        assert len(summary["prompt_ids"]) == summary["n_pairs"] and summary["n_pairs_available"] == 4
    assert (tmp_path / "z_patching/table.md").read_text().count("## layer") == 2 * 2
    direct = bridge(states, mask, model="stories", prompt_set="pairs", ridge=[0, 0.1], intercept=True, seed=0,
                    n_shuffles=50)
    assert results["bridge"].summary == direct.summary
    with safe_open(str(tmp_path / "z_mask/z_mask.safetensors"), framework="pt") as handle:
        assert "z.1.4" in handle.keys()


# ---------------------------------------------------------------------------- report


def test_model_report_groups_the_suite_into_one_section(tmp_path):
    from layerscope.report.pages import model_report

    paths = []
    for where, exp in (("m/core", "logit_lens"), ("m", "z_mask"), ("m/zh", "z_separation"), ("m/zh", "z_patching")):
        folder = tmp_path / "results" / where / exp
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text(json.dumps({"model": "m", "n": 1, "verdict": ["null"]}))
        paths.append(folder / "summary.json")
    (tmp_path / "results/m/zh/z_patching/table.md").write_text("| a |\n")
    out = tmp_path / "results/report"
    model_report("m", paths, None, out / "m.md", out / "m.html")
    md = (out / "m.md").read_text()
    assert md.count("## z_subspace") == 1 and "## logit_lens" in md
    assert "### z_mask — weights" in md and "### z_patching — prompt set `zh`" in md
    assert md.index("## z_subspace") < md.index("### z_separation")
    assert "Table: [table.md](../m/zh/z_patching/table.md)" in md
    assert "### prompt set `core`" in md  # single-experiment sections read as before


# ---------------------------------------------------------------------------- the workflow: reuse of intermediates


def _suite_config(workdir, models, **overrides):
    import yaml

    experiments = {
        "z_mask": {"layers": [1, 0.6], "k": [4, 8]},
        "z_separation": {},
        "update_decomposition": {},
        "z_patching": {"max_pairs": 2, "max_new_tokens": 4},
        "ard_mmd": {"lambdas": [0.01], "steps": 10, "lr": 0.05},
        "bridge": {"ridge": [0, 0.1]},
    }
    for name, values in overrides.items():
        experiments[name] = {**experiments[name], **values}
    config = {
        "models": models,
        "prompt_sets": {"pairs": {"path": "pairs.json"}},
        "generation": {"max_new_tokens": 4, "batch_size": 4},
        "activations": {"batch_size": 4},
        "experiments": experiments,
    }
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))


@pytest.fixture(scope="module")
def suite_run(tmp_path_factory, stories_dir):
    from tests.helpers import snakemake

    workdir = tmp_path_factory.mktemp("suite")
    (workdir / "pairs.json").write_text(json.dumps(PAIRS, ensure_ascii=False))
    models = {"stories": {"source": {"type": "local", "path": str(stories_dir)}}}
    _suite_config(workdir, models)
    snakemake(workdir, "--cores", "2")
    return workdir, models


SUITE = ("z_separation", "update_decomposition", "z_patching", "ard_mmd", "bridge")
REPORTS = {"model_report": 1, "cross_model_report": 1, "report_index": 1}


@pytest.mark.slow
def test_the_suite_runs_end_to_end(suite_run):
    from tests.helpers import planned_jobs

    workdir, _ = suite_run
    mask = workdir / "results/stories/z_mask"
    assert (mask / "z_mask.safetensors").is_file() and (mask / "spectra.png").is_file()
    for name in SUITE:
        summary = json.loads((workdir / f"results/stories/pairs/{name}/summary.json").read_text())
        assert summary["n_pairs"] == (2 if name == "z_patching" else 4)
    assert (workdir / "results/stories/pairs/z_patching/table.md").read_text().count("## layer") == 2 * 2 * 2
    report = (workdir / "results/report/stories.md").read_text()
    assert report.count("## z_subspace") == 1 and "### bridge — prompt set `pairs`" in report
    assert (workdir / "results/logs/z_patching/stories_pairs.log").is_file()
    assert planned_jobs(workdir) == []


@pytest.mark.slow
def test_the_suite_figures_are_in_the_snakemake_report(suite_run, tmp_path):
    from tests.helpers import snakemake

    workdir, _ = suite_run
    out = tmp_path / "report.html"
    snakemake(workdir, "--report", str(out))
    text = out.read_text(errors="replace")
    for name in ("z_subspace", "z_mask", "z_patching", "ard_mmd", "bridge", "update_decomposition", "z_separation"):
        assert name in text


def _copy(suite_run, tmp_path):
    import shutil

    workdir, models = suite_run
    copy = tmp_path / "w"
    shutil.copytree(workdir, copy, symlinks=True)
    return copy, models


@pytest.mark.slow
def test_changing_the_ridge_grid_reruns_only_the_bridge(suite_run, tmp_path):
    from collections import Counter

    from tests.helpers import planned_jobs

    workdir, models = _copy(suite_run, tmp_path)
    _suite_config(workdir, models, bridge={"ridge": [0, 0.1, 1]})
    assert Counter(rule for rule, _ in planned_jobs(workdir)) == Counter({"bridge": 1, **REPORTS})


@pytest.mark.slow
def test_changing_k_reruns_the_mask_and_its_readers_but_not_the_cache(suite_run, tmp_path):
    from collections import Counter

    from tests.helpers import planned_jobs

    workdir, models = _copy(suite_run, tmp_path)
    _suite_config(workdir, models, z_mask={"k": [4, 16]})
    jobs = Counter(rule for rule, _ in planned_jobs(workdir))
    assert jobs == Counter({"z_mask": 1, **{name: 1 for name in SUITE}, **REPORTS})
    assert not {"prepare_model", "generate_completions", "extract_activations"} & set(jobs)


@pytest.mark.slow
def test_changing_a_patching_parameter_reruns_only_patching(suite_run, tmp_path):
    from collections import Counter

    from tests.helpers import planned_jobs

    workdir, models = _copy(suite_run, tmp_path)
    _suite_config(workdir, models, z_patching={"sources": ["ot"]})
    assert Counter(rule for rule, _ in planned_jobs(workdir)) == Counter({"z_patching": 1, **REPORTS})
