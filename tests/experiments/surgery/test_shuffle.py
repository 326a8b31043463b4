"""Shuffle recovery: scoring, the blind view of the shuffled model, weights-only orderings, the refiners,
the weight-guided pipeline and the summary over several permutations."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import kendalltau

from layerscope import LayerscopeError
from layerscope.engines.surgery import LossEvaluator, move
from layerscope.experiments.surgery.shuffle import (
    METHODS, REFINERS, WEIGHT_METHODS, ShuffledModel, ShuffleParams, _Search, chain_score, cosine_distances,
    fiedler_order, neighbours, order_profile_chain, outlier_scores, random_permutation, rank_moves, recover,
    refine_guided, residual_profiles, score, shortest_path, shuffle_experiment, weight_geometry,
)
from layerscope.jobs.writer import run_experiment
from tests.helpers.surgery_data import story_cache


@pytest.fixture(scope="module")
def story_evaluator(stories, tmp_path_factory):
    adapter, tok = stories
    cache, _ = story_cache(adapter, tok, tmp_path_factory.mktemp("story"))
    return LossEvaluator(adapter, cache, batch_size=6)


def truth_slots(perm):
    """The slot order that runs blocks 0 … n-1."""
    return [int(s) for s in np.argsort(perm)]


def test_score_against_scipy_and_by_hand():
    assert score([0, 1, 2, 3]) == (1.0, pytest.approx(1.0))
    assert score([3, 2, 1, 0]) == (0.0, pytest.approx(-1.0))
    accuracy, tau = score([0, 2, 1, 3, 4])
    assert accuracy == 0.6 and tau == pytest.approx(kendalltau(range(5), [0, 2, 1, 3, 4]).statistic)
    assert tau == pytest.approx((9 - 1) / 10)  # one discordant pair of ten


def test_random_permutation_is_seeded_and_never_the_identity():
    assert random_permutation(6, 3) == random_permutation(6, 3)
    assert sorted(random_permutation(6, 3)) == list(range(6))
    assert all(random_permutation(2, s) == [1, 0] for s in range(5))


def _reference_2opt(distance, path):
    """2-opt as first written: every reversal scored by recomputing the whole path length."""
    def length(p):
        return sum(distance[a, b] for a, b in zip(p, p[1:]))

    n, best = len(path), length(path)
    improved = True
    while improved:
        improved = False
        for i in range(n - 1):
            for j in range(i + 1, n):
                candidate = path[:i] + path[i : j + 1][::-1] + path[j + 1 :]
                if length(candidate) < best - 1e-12:
                    path, best, improved = candidate, length(candidate), True
    return path


def test_shortest_path_and_fiedler_recover_a_line_and_2opt_matches_a_full_recomputation():
    rng = np.random.default_rng(0)
    x = np.sort(rng.uniform(0, 10, 12))
    perm = rng.permutation(12)
    distance = np.abs(x[perm][:, None] - x[perm][None, :])
    for order in (shortest_path(distance), fiedler_order(distance)):
        recovered = perm[order]
        assert recovered.tolist() in (list(range(12)), list(range(11, -1, -1)))
    # the edge-change 2-opt makes the same moves as a 2-opt that recomputes the path (random metric, no ties)
    for seed in range(5):
        points = np.random.default_rng(seed).normal(size=(9, 3))
        d = np.linalg.norm(points[:, None] - points[None], axis=-1)
        path = shortest_path(d)
        assert _reference_2opt(d, list(path)) == path  # a 2-opt local optimum by the reference's own test
        nn_chains = []
        for start in range(9):
            chain, left = [start], set(range(9)) - {start}
            while left:
                chain.append(min(left, key=lambda j: (d[chain[-1], j], j)))
                left.remove(chain[-1])
            nn_chains.append(chain)
        first = min(nn_chains, key=lambda c: sum(d[a, b] for a, b in zip(c, c[1:])))
        assert path == _reference_2opt(d, first)


def test_residual_profiles_against_the_weights(story_evaluator):
    ev = story_evaluator
    perm = [3, 0, 4, 1, 2]
    model = ShuffledModel(ev, perm)
    profiles = residual_profiles(model)
    d = ev.adapter.facts.d_model
    assert {"read_q", "read_k", "read_v", "read_gate", "read_up", "write_o", "write_down", "gamma_attn",
            "gamma_mlp"} <= set(profiles)
    assert all(t.shape == (5, d) for t in profiles.values())
    for slot, block in enumerate(perm):
        w = ev.adapter.projections(block)
        assert np.allclose(profiles["read_q"][slot], torch.linalg.norm(w["q"].double(), dim=0).numpy())
        assert np.allclose(profiles["write_down"][slot], torch.linalg.norm(w["down"].double(), dim=1).numpy())
        gamma = ev.adapter.norm_scale(ev.adapter.block_norms(block)["mlp"]).double().numpy()
        assert np.allclose(profiles["gamma_mlp"][slot], gamma)
    # cosine distance by hand
    a, b = profiles["read_up"][0], profiles["read_up"][1]
    by_hand = 1 - a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    assert cosine_distances(profiles["read_up"])[0, 1] == pytest.approx(by_hand)


def test_chain_score_and_outliers_on_a_line_with_an_outlier():
    rng = np.random.default_rng(1)
    # 12 points drifting along a line in 20 dimensions, one far from all of them
    direction = rng.normal(size=20)
    points = np.array([t * direction + 0.01 * rng.normal(size=20) for t in range(12)] + [30 * rng.normal(size=20)])
    d = np.linalg.norm(points[:, None] - points[None], axis=-1)
    z = outlier_scores(d)
    assert int(np.argmax(z)) == 12 and z[12] > 5 and (z[:12] < 5).all()
    line = d[:12, :12]
    scatter = rng.normal(size=(12, 20))
    noise = np.linalg.norm(scatter[:, None] - scatter[None], axis=-1)
    assert chain_score(line, shortest_path(line)) > 3 * chain_score(noise, shortest_path(noise))
    assert (outlier_scores(d[:4, :4]) == 0).all()  # too few blocks to call one an outlier


def test_profile_chain_recovers_stories_from_the_weights_alone(story_evaluator):
    for seed in (0, 1, 2):
        perm = random_permutation(5, seed)
        model = ShuffledModel(story_evaluator, perm)
        geometry = weight_geometry(model, 5.0)
        assert geometry.profile and geometry.profile in geometry.chain_scores
        assert [perm[s] for s in order_profile_chain(model, geometry)] == list(range(5)), seed
        assert model.evaluations == 0  # weights only


def test_neighbours_and_their_ranking():
    order = [0, 1, 2, 3, 4]
    cands = neighbours(order)
    assert len(set(cands)) == len(cands) and all(sorted(c) == order for c in cands)
    assert tuple(order) not in cands and tuple(order[::-1]) not in cands
    every_insertion = {tuple(move(order, p, q)) for p in range(5) for q in range(5) if p != q}
    assert every_insertion <= set(cands)
    assert (0, 3, 2, 1, 4) in cands and (3, 4, 0, 1, 2) in cands and (0, 4, 3, 1, 2) in cands  # reverse, segments
    # all reachable orders by brute force: one insertion, one reversal, or one moved stretch of two or three
    reachable = set()
    for perm in itertools.permutations(order):
        for i, j in itertools.combinations(range(6), 2):
            piece, rest = list(perm[i:j]), list(perm[:i] + perm[j:])
            if len(piece) <= 3:
                for q in range(len(rest) + 1):
                    for stretch in (piece, piece[::-1]):
                        if tuple(rest[:q] + stretch + rest[q:]) == tuple(order):
                            reachable.add(perm)
        for i, j in itertools.combinations(range(5), 2):
            if tuple(list(perm[:i]) + list(perm[i:j + 1])[::-1] + list(perm[j + 1:])) == tuple(order):
                reachable.add(perm)
    reachable -= {tuple(order), tuple(order[::-1])}
    assert set(cands) == reachable
    # ranking: by path length through the prior (plain loop), ties to the later first change
    rng = np.random.default_rng(2)
    prior = rng.uniform(size=(5, 5))
    prior = prior + prior.T
    ranked = rank_moves(order, cands, prior)
    lengths = [sum(prior[a, b] for a, b in zip(c, c[1:])) for c in ranked]
    assert all(a <= b + 1e-12 for a, b in zip(lengths, lengths[1:])) and sorted(ranked) == sorted(cands)


def test_the_shuffled_model_maps_slots_to_blocks(story_evaluator):
    ev = story_evaluator
    perm = [3, 0, 4, 1, 2]
    model = ShuffledModel(ev, perm)
    truth = truth_slots(perm)
    assert model.losses([truth])[0] == pytest.approx(ev.baseline(), rel=1e-5)
    assert model.losses([[0, 1, 2, 3, 4]])[0] == pytest.approx(ev.loss(perm), rel=1e-5)
    assert model.evaluations == 2
    # the per-token losses it keeps for the scoring are those of the block sequence it ran
    kept = model.known_per_token(perm)
    assert kept is not None and kept.mean() == pytest.approx(ev.loss(perm), rel=1e-5)
    assert np.allclose(kept, ev.losses([perm], per_token=True)[0], rtol=1e-5, atol=1e-6)
    assert model.known_per_token([0, 1, 2, 4, 3]) is None
    for t in range(5):
        assert (model.projections(truth[t])["q"] == ev.adapter.projections(t)["q"]).all()
    with pytest.raises(LayerscopeError, match="not a permutation"):
        ShuffledModel(ev, [0, 0, 1, 2, 3])


def test_recovering_the_unshuffled_model_gives_tau_1_and_accuracy_1(story_evaluator):
    ev = story_evaluator
    params = ShuffleParams(refine_max_evals=40, anneal_steps=40, pipeline_max_evals=60)
    identity = shuffle_experiment(ev, model="m", prompt_set="p", params=params, permutations=[list(range(5))],
                                  permutation_seeds=[0])
    rows = identity.table.set_index("method")
    assert rows.loc["none", "accuracy"] == 1.0 and rows.loc["none", "loss_ratio"] == pytest.approx(1.0)
    for method in REFINERS + ("profile_chain", "pipeline"):  # they keep (or find) the original order
        assert rows.loc[method, "kendall_tau"] == pytest.approx(1.0) and rows.loc[method, "accuracy"] == 1.0, method
        assert rows.loc[method, "loss_ratio"] == pytest.approx(1.0)
    assert identity.summary["all_exact"] and not identity.summary["underpowered"]


def test_weights_only_methods_ignore_the_presented_order(story_evaluator):
    params = ShuffleParams(methods=WEIGHT_METHODS)
    result = shuffle_experiment(story_evaluator, model="m", prompt_set="p", params=params,
                                permutations=[list(range(5)), [2, 4, 0, 3, 1]], permutation_seeds=[7, 8])
    blocks = result.orders.set_index(["permutation_seed", "method", "position"])["block"].sort_index()
    for method in WEIGHT_METHODS:  # what they recover depends on the blocks, not on the order they are shown in
        assert blocks.loc[(7, method)].tolist() == blocks.loc[(8, method)].tolist(), method


def test_loss_refiners_recover_the_true_order_from_a_shuffled_start(story_evaluator):
    ev = story_evaluator
    for seed in (0, 1):
        perm = random_permutation(5, seed)
        model = ShuffledModel(ev, perm)
        params = ShuffleParams(methods=REFINERS, refine_max_evals=150, anneal_steps=150, reinsert_window=None,
                               seed=seed)
        for result in recover(model, params):
            recovered = [perm[s] for s in result.order]
            assert recovered == list(range(5)), (seed, result.method, recovered)
            assert 0 < result.evaluations <= 150


def test_guided_descent_repairs_misplaced_blocks_and_stops_after_patience_failures(story_evaluator):
    ev = story_evaluator
    perm = random_permutation(5, 3)
    model = ShuffledModel(ev, perm)
    truth = truth_slots(perm)
    prior = weight_geometry(model, 5.0).prior()
    # a start with the last two blocks exchanged and the first moved behind the second: the descent repairs both
    start = move(truth, 0, 1)
    start[3], start[4] = start[4], start[3]
    search = _Search(model, 100)
    value = search.losses([start])[0]
    order, found = refine_guided(search, start, value, prior, patience=30)
    assert order == truth and found == pytest.approx(ev.baseline(), rel=1e-5)
    # from the true order nothing improves: exactly `patience` candidates are evaluated, the order is kept
    search = _Search(model, 100)
    value = search.losses([truth])[0]
    before = model.evaluations
    order, found = refine_guided(search, truth, value, prior, patience=7)
    assert order == truth and found == value and model.evaluations - before == 7 and search.evals == 8


def test_the_pipeline_recovers_three_seeded_permutations_of_stories_exactly(story_evaluator):
    params = ShuffleParams(methods=("pipeline",), pipeline_max_evals=60, pipeline_patience=10)
    result = shuffle_experiment(story_evaluator, model="m", prompt_set="p", params=params, permutation_seeds=[0, 1, 2])
    pipeline = result.table[result.table["method"] == "pipeline"]
    assert len(pipeline) == 3 and pipeline["accuracy"].eq(1.0).all()
    assert np.allclose(pipeline["kendall_tau"], 1.0)
    s = result.summary
    assert s["exact_pipeline"] == 3 and s["all_exact"] and s["best_method"] == "pipeline"
    assert [r["permutation"] for r in s["permutations"]] == [random_permutation(5, k) for k in (0, 1, 2)]
    for seed in (0, 1, 2):
        blocks = result.orders[(result.orders["method"] == "pipeline") & (result.orders["permutation_seed"] == seed)]
        assert blocks.sort_values("position")["block"].tolist() == list(range(5))


def test_evaluation_budgets_are_respected(story_evaluator):
    ev = story_evaluator
    model = ShuffledModel(ev, random_permutation(5, 4))
    results = recover(model, ShuffleParams(methods=("reinsert", "bubble", "anneal", "pipeline"), refine_max_evals=7,
                                           anneal_steps=50, pipeline_max_evals=9, pipeline_patience=50))
    assert [r.evaluations for r in results] == [7, 7, 7, 9]
    assert model.evaluations == 30
    with pytest.raises(LayerscopeError, match="unknown shuffle method"):
        recover(model, ShuffleParams(methods=("sorting_hat",)))


def test_the_per_seed_table_counts_every_loss_evaluation(story_evaluator, monkeypatch):
    """One row per method per permutation; their evaluations add up to the oracle's counter and to the
    sequences the evaluator ran without its cache (the oracle never uses it, the scoring does)."""
    ev = story_evaluator
    oracle_runs = []
    original = LossEvaluator.losses

    def counting(self, sequences, **kwargs):
        sequences = [list(s) for s in sequences]
        if kwargs.get("use_cache") is False:
            oracle_runs.append(len(sequences))
        return original(self, sequences, **kwargs)

    monkeypatch.setattr(LossEvaluator, "losses", counting)
    counters = []
    init = ShuffledModel.__init__

    def remember(self, *args, **kwargs):
        init(self, *args, **kwargs)
        counters.append(self)

    monkeypatch.setattr(ShuffledModel, "__init__", remember)
    params = ShuffleParams(refine_max_evals=6, anneal_steps=6, pipeline_max_evals=15, pipeline_patience=5)
    result = shuffle_experiment(ev, model="m", prompt_set="p", params=params, permutation_seeds=[3, 4, 5])
    table = result.table
    assert len(table) == 3 * (1 + len(METHODS))
    assert table.groupby("permutation_seed")["method"].apply(list).tolist() == [["none", *METHODS]] * 3
    assert len(counters) == 3
    for model, seed, run in zip(counters, (3, 4, 5), result.summary["permutations"]):
        rows = table[table["permutation_seed"] == seed].set_index("method")
        assert rows["evaluations"].sum() == model.evaluations == run["oracle_evaluations"]
        assert rows.loc[list(WEIGHT_METHODS), "evaluations"].eq(0).all()
        assert rows.loc[list(REFINERS), "evaluations"].between(1, 6).all()
        assert 0 < rows.loc["pipeline", "evaluations"] <= 15
        per_method = result.summary["per_method"]
        assert [per_method[m]["evaluations"][run["seed"] - 3] for m in METHODS] == rows.loc[list(METHODS),
                                                                                          "evaluations"].tolist()
    assert sum(oracle_runs) == sum(m.evaluations for m in counters)


def test_shuffle_summary_and_outputs(story_evaluator, stories_dir, tmp_path):
    params = ShuffleParams(refine_max_evals=10, anneal_steps=10, pipeline_max_evals=40, pipeline_patience=8)
    result = shuffle_experiment(story_evaluator, model="stories", prompt_set="p", params=params,
                                permutation_seeds=[5, 6])
    again = shuffle_experiment(story_evaluator, model="stories", prompt_set="p", params=params,
                               permutation_seeds=[5, 6])
    assert result.orders.equals(again.orders)  # deterministic
    s = result.summary
    assert s["permutation_seeds"] == [5, 6] and s["n_permutations"] == 2
    assert [r["permutation"] for r in s["permutations"]] == [random_permutation(5, 5), random_permutation(5, 6)]
    assert [m["method"] for m in s["methods"]] == ["none", *METHODS] * 2
    table = result.table[result.table["method"] != "none"]
    agg = table.groupby("method").agg(exact=("exact", "sum"), accuracy=("accuracy", "mean"),
                                      tau=("kendall_tau", "mean"), loss=("loss", "mean"),
                                      evaluations=("evaluations", "mean")).loc[list(METHODS)]
    # ties: the fewest evaluations, then the first in the order of the methods
    best = max(agg.index, key=lambda m: (agg.loc[m, "exact"], agg.loc[m, "accuracy"], agg.loc[m, "tau"],
                                         -agg.loc[m, "loss"], -agg.loc[m, "evaluations"]))  # max: the first
    assert s["best_method"] == best and s["best_exact"] == agg.loc[best, "exact"]
    for m in METHODS:
        assert s[f"exact_{m}"] == s["per_method"][m]["exact"] == agg.loc[m, "exact"]
        assert s[f"mean_tau_{m}"] == pytest.approx(agg.loc[m, "tau"])
        rows = table[table["method"] == m]
        for key in ("accuracy", "kendall_tau", "loss_ratio", "seconds", "evaluations"):
            assert s["per_method"][m][key] == rows[key].tolist()  # one value per permutation, in seed order
    for row in s["methods"]:
        sub = result.orders[(result.orders["method"] == row["method"])
                            & (result.orders["permutation_seed"] == row["permutation_seed"])]
        seq = sub.sort_values("position")["block"].tolist()
        assert score(seq) == (row["accuracy"], row["kendall_tau"]) and row["exact"] == (seq == list(range(5)))
        assert row["loss"] == pytest.approx(story_evaluator.loss(seq), rel=1e-5)
        # the loss of every order carries an interval over the prompts; so does its ratio to the original's
        assert row["loss_lo"] <= row["loss"] <= row["loss_hi"]
        assert row["loss_ratio_lo"] <= row["loss_ratio"] <= row["loss_ratio_hi"]
    none = [r for r in s["methods"] if r["method"] == "none"]
    assert [(r["accuracy"], r["kendall_tau"]) for r in none] == [score(p["permutation"]) for p in s["permutations"]]
    assert s["baseline_loss"] == story_evaluator.baseline()
    lo, hi = s["baseline_loss_ci"]
    assert lo <= s["baseline_loss"] <= hi and np.isfinite([lo, hi]).all()
    # pooled over the permutations: the mean of the per-permutation losses
    best_rows = result.table[result.table["method"] == s["best_method"]]
    assert s["best_loss"] == pytest.approx(best_rows["loss"].mean(), rel=1e-9)
    assert s["shuffled_loss"] == pytest.approx(np.mean([r["loss"] for r in none]), rel=1e-9)
    assert s["best_loss_ratio_ci"][0] <= s["best_loss_ratio"] <= s["best_loss_ratio_ci"][1]
    assert s["shuffled_loss_ratio_ci"][0] <= s["shuffled_loss_ratio"] <= s["shuffled_loss_ratio_ci"][1]
    assert "one search per method" in s["order_scores_uncertainty"] and not any(k.startswith("best_tau_") for k in s)
    assert s["uncertainty"]["unit"] == "prompt" and s["uncertainty"]["n_units"] == 6
    assert s["prompt_ids"] == [f"story-{i}" for i in range(6)]
    # the registered experiment, run from the model folder and the cache with the same parameters, writes it all
    outputs = {k: tmp_path / name for k, name in [
        ("table_metrics", "metrics.parquet"), ("table_orders", "orders.parquet"), ("figure_methods", "methods.png"),
        ("figure_orders", "orders.png"), ("summary", "summary.json")]}
    defaults = ShuffleParams()
    config = {"max_prompts": None, "batch_size": 6, "layout": "auto", "dtype": "float32", "max_target_tokens": None,
              "permutation_seeds": [5, 6], "methods": list(METHODS), "refine_max_evals": 10,
              "reinsert_window": defaults.reinsert_window, "anneal_steps": 10,
              "anneal_t_start": defaults.anneal_t_start,
              "anneal_t_end": defaults.anneal_t_end, "pipeline_max_evals": 40, "pipeline_patience": 8,
              "outlier_z": defaults.outlier_z, "probe_sequences": defaults.probe_sequences,
              "probe_length": defaults.probe_length, "memo_states": defaults.memo_states, "seed": defaults.seed}
    directory = story_evaluator.cache.directory
    run_experiment("shuffle", {"model": stories_dir, "resid": directory / "resid.safetensors",
                               "tokens": directory / "tokens.parquet"}, outputs, params=config,
                   wildcards={"model": "stories", "pset": "p"})
    assert all(p.is_file() for p in outputs.values())
    written = json.loads(outputs["summary"].read_text())
    assert written["best_method"] == s["best_method"] and written["provenance"]["experiment"] == "shuffle"
    assert written["permutations"][0]["permutation"] == s["permutations"][0]["permutation"]
    pd.testing.assert_frame_equal(pd.read_parquet(outputs["table_orders"]), result.orders)


def test_surgery_config_blocks_fill_defaults_and_reject_bad_values():
    from tests.helpers import REPO
    from layerscope.jobs import config as lsconfig

    def check(experiments):
        cfg = {"models": {"m1": {"source": {"type": "local", "path": "/x"}}},
               "prompt_sets": {"core": {"path": "resources/prompt_sets/core.json"}}, "experiments": experiments}
        return lsconfig.validate_config(cfg, REPO / lsconfig.SCHEMA_FILE, base_dir=REPO)

    cfg = check({"knockout": {}, "swap": {}, "shuffle": {}})
    shuffle = lsconfig.experiment_params(cfg, "shuffle")
    assert shuffle["methods"] == list(METHODS) and shuffle["permutation_seeds"] is None
    assert lsconfig.experiment_params(cfg, "swap")["n_zones"] == 3
    knock = lsconfig.experiment_params(cfg, "knockout")
    assert knock["max_prompts"] == 7 and knock["max_target_tokens"] is None and knock["seed"] == 0
    assert not any(key.startswith("trace") for key in knock)  # causal tracing left knockout
    assert {i.name for i in lsconfig.experiment_infos().values() if i.gpu} >= {"knockout", "swap", "shuffle"}
    for bad, where in [({"shuffle": {"methods": ["sorting_hat"]}}, "config.experiments.shuffle.methods"),
                       ({"shuffle": {"permutation_seeds": [1, 1]}}, "config.experiments.shuffle.permutation_seeds"),
                       ({"shuffle": {"permutation_seeds": []}}, "config.experiments.shuffle.permutation_seeds"),
                       ({"swap": {"n_zones": 0}}, "config.experiments.swap.n_zones"),
                       ({"knockout": {"max_prompts": 0}}, "config.experiments.knockout.max_prompts"),
                       ({"knockout": {"layout": "tree"}}, "config.experiments.knockout.layout"),
                       ({"swap": {"interchangable_ratio": 1.1}}, "interchangable_ratio"),
                       ({"knockout": {"trace_prompts": 2}}, "trace_prompts"),
                       ({"swap": {"max_target_tokens": 0}}, "config.experiments.swap.max_target_tokens")]:
        with pytest.raises(lsconfig.ConfigError, match=where):
            check(bad)


def test_shuffle_job_samples_its_prompts_with_the_engine(story_evaluator, stories_dir, tmp_path):
    """The job's evaluator evaluates a seeded, stratified sample (the old code took the first N prompts)."""
    from layerscope.engines.sampling import sample_cache_prompts
    from layerscope.engines.surgery import surgery_evaluator

    directory = story_evaluator.cache.directory
    params = {"max_prompts": 2, "batch_size": 4, "layout": "auto", "dtype": "float32", "max_target_tokens": 4,
              "seed": 3}
    ev = surgery_evaluator(stories_dir, directory / "resid.safetensors", params=params)
    ids, sample = sample_cache_prompts(story_evaluator.cache.tokens, 2, seed=3)
    assert sorted(p.prompt_id for p in ev.prompts) == sorted(ids) and ev.sample == sample
    assert sample["prompt_categories"] == {"park": 1, "story": 1}  # the first two would be one of each by luck only
    result = shuffle_experiment(ev, model="m", prompt_set="p", params=ShuffleParams(
        methods=("weight_stats", "bubble"), refine_max_evals=5, seed=3))
    s = result.summary
    assert s["permutation_seeds"] == [3, 4, 5]  # the run's seed and the two after it
    assert s["prompt_ids"] == sample["prompt_ids"] and s["prompt_categories"] == sample["prompt_categories"]
    assert s["n_prompts"] == 2 and s["n_tokens"] == 8 and s["underpowered"]
    assert any("only 2 prompts" in r for r in s["underpowered_reasons"])
