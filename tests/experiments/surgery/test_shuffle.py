"""Shuffle recovery: scoring, the blind view of the shuffled model, weights-only orderings and the refiners."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy.stats import kendalltau

from layerscope import LayerscopeError
from layerscope.experiments.surgery.shuffle import (
    METHODS, REFINERS, WEIGHT_METHODS, ShuffledModel, ShuffleParams, fiedler_order, random_permutation, recover,
    score, shortest_path, shuffle_experiment,
)
from layerscope.engines.surgery import LossEvaluator
from layerscope.jobs.writer import run_experiment
from tests.helpers.surgery_data import story_cache


@pytest.fixture(scope="module")
def story_evaluator(stories, tmp_path_factory):
    adapter, tok = stories
    cache, _ = story_cache(adapter, tok, tmp_path_factory.mktemp("story"))
    return LossEvaluator(adapter, cache, batch_size=6)


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


def test_shortest_path_and_fiedler_recover_a_line():
    rng = np.random.default_rng(0)
    x = np.sort(rng.uniform(0, 10, 12))
    perm = rng.permutation(12)
    distance = np.abs(x[perm][:, None] - x[perm][None, :])
    for order in (shortest_path(distance), fiedler_order(distance)):
        recovered = perm[order]
        assert recovered.tolist() in (list(range(12)), list(range(11, -1, -1)))


def test_the_shuffled_model_maps_slots_to_blocks(story_evaluator):
    ev = story_evaluator
    perm = [3, 0, 4, 1, 2]
    model = ShuffledModel(ev, perm)
    truth = list(np.argsort(perm))  # slot order that runs blocks 0 … 4
    assert model.losses([truth])[0] == pytest.approx(ev.baseline(), rel=1e-5)
    assert model.losses([[0, 1, 2, 3, 4]])[0] == pytest.approx(ev.loss(perm), rel=1e-5)
    for t in range(5):
        assert model.projections(truth[t])["q"] is not None
        assert (model.projections(truth[t])["q"] == ev.adapter.projections(t)["q"]).all()
    with pytest.raises(LayerscopeError, match="not a permutation"):
        ShuffledModel(ev, [0, 0, 1, 2, 3])


def test_methods_keep_an_unshuffled_model_and_weights_only_methods_ignore_the_presented_order(story_evaluator):
    ev = story_evaluator
    params = ShuffleParams(refine_max_evals=40, anneal_steps=40, pipeline_max_evals=60)
    identity = shuffle_experiment(ev, model="m", prompt_set="p", params=params, permutation=list(range(5)))
    rows = identity.table.set_index("method")
    for method in REFINERS + ("pipeline",):
        assert rows.loc[method, "kendall_tau"] == pytest.approx(1.0) and rows.loc[method, "accuracy"] == 1.0, method
        assert rows.loc[method, "loss_ratio"] == pytest.approx(1.0)
    assert not identity.summary["underpowered"]  # 6 prompts, and the best order is the true one
    shuffled = shuffle_experiment(ev, model="m", prompt_set="p", params=params, permutation=[2, 4, 0, 3, 1])
    a = identity.orders.set_index(["method", "position"])["block"]
    b = shuffled.orders.set_index(["method", "position"])["block"]
    for method in WEIGHT_METHODS:  # what they recover depends on the blocks, not on the order they are shown in
        assert a.loc[method].tolist() == b.loc[method].tolist(), method


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


def test_evaluation_budgets_are_respected(story_evaluator):
    ev = story_evaluator
    model = ShuffledModel(ev, random_permutation(5, 4))
    results = recover(model, ShuffleParams(methods=("reinsert", "bubble", "anneal", "pipeline"), refine_max_evals=7,
                                           anneal_steps=50, pipeline_max_evals=9))
    assert [r.evaluations for r in results] == [7, 7, 7, 9]
    assert model.evaluations == 30
    with pytest.raises(LayerscopeError, match="unknown shuffle method"):
        recover(model, ShuffleParams(methods=("sorting_hat",)))


def test_shuffle_summary_and_outputs(story_evaluator, stories_dir, tmp_path):
    params = ShuffleParams(refine_max_evals=30, anneal_steps=30, pipeline_max_evals=40)
    result = shuffle_experiment(story_evaluator, model="stories", prompt_set="p", params=params, permutation_seed=5)
    again = shuffle_experiment(story_evaluator, model="stories", prompt_set="p", params=params, permutation_seed=5)
    assert result.orders.equals(again.orders)  # deterministic
    s = result.summary
    assert s["permutation"] == random_permutation(5, 5)
    assert [m["method"] for m in s["methods"]] == ["none", *METHODS]
    best = max((m for m in s["methods"] if m["method"] != "none"),
               key=lambda m: (m["accuracy"], m["kendall_tau"], -m["loss"]))
    assert s["best_method"] == best["method"] and s["best_tau"] == best["kendall_tau"]
    none = s["methods"][0]
    assert (none["accuracy"], none["kendall_tau"]) == score(s["permutation"])
    for row in s["methods"]:
        seq = result.orders[result.orders["method"] == row["method"]].sort_values("position")["block"].tolist()
        assert score(seq) == (row["accuracy"], row["kendall_tau"])
        assert row["loss"] == pytest.approx(story_evaluator.loss(seq), rel=1e-5)
        # the loss of every order carries an interval over the prompts; so does its ratio to the original's
        assert row["loss_lo"] <= row["loss"] <= row["loss_hi"] and row["loss_hi"] > row["loss_lo"]
        assert row["loss_ratio_lo"] <= row["loss_ratio"] <= row["loss_ratio_hi"]
    assert s["baseline_loss"] == story_evaluator.baseline()
    lo, hi = s["baseline_loss_ci"]
    assert lo <= s["baseline_loss"] <= hi and np.isfinite([lo, hi]).all()
    assert s["best_loss_ratio_ci"][0] <= s["best_loss_ratio"] <= s["best_loss_ratio_ci"][1]
    assert s["shuffled_loss_ratio_ci"][0] <= s["shuffled_loss_ratio"] <= s["shuffled_loss_ratio_ci"][1]
    assert "one search" in s["order_scores_uncertainty"] and not any(k.startswith("best_tau_") for k in s)
    assert s["uncertainty"]["unit"] == "prompt" and s["uncertainty"]["n_units"] == 6
    assert s["prompt_ids"] == [f"story-{i}" for i in range(6)]
    # the registered experiment, run from the model folder and the cache with the same parameters, writes it all
    outputs = {k: tmp_path / name for k, name in [
        ("table_metrics", "metrics.parquet"), ("table_orders", "orders.parquet"), ("figure_methods", "methods.png"),
        ("figure_orders", "orders.png"), ("summary", "summary.json")]}
    defaults = ShuffleParams()
    config = {"max_prompts": None, "batch_size": 6, "layout": "auto", "dtype": "float32", "max_target_tokens": None,
              "permutation_seed": 5,
              "methods": list(METHODS), "refine_max_evals": 30, "reinsert_window": defaults.reinsert_window,
              "anneal_steps": 30, "anneal_t_start": defaults.anneal_t_start, "anneal_t_end": defaults.anneal_t_end,
              "pipeline_max_evals": 40, "probe_sequences": defaults.probe_sequences,
              "probe_length": defaults.probe_length, "memo_states": defaults.memo_states, "seed": defaults.seed}
    directory = story_evaluator.cache.directory
    run_experiment("shuffle", {"model": stories_dir, "resid": directory / "resid.safetensors",
                               "tokens": directory / "tokens.parquet"}, outputs, params=config,
                   wildcards={"model": "stories", "pset": "p"})
    assert all(p.is_file() for p in outputs.values())
    written = json.loads(outputs["summary"].read_text())
    assert written["best_method"] == s["best_method"]
    assert written["permutation"] == s["permutation"] and written["provenance"]["experiment"] == "shuffle"
    pd.testing.assert_frame_equal(pd.read_parquet(outputs["table_orders"]), result.orders)


def test_surgery_config_blocks_fill_defaults_and_reject_bad_values():
    from tests.helpers import REPO
    from layerscope.jobs import config as lsconfig

    def check(experiments):
        cfg = {"models": {"m1": {"source": {"type": "local", "path": "/x"}}},
               "prompt_sets": {"core": {"path": "resources/prompt_sets/core.json"}}, "experiments": experiments}
        return lsconfig.validate_config(cfg, REPO / lsconfig.SCHEMA_FILE, base_dir=REPO)

    cfg = check({"knockout": {}, "swap": {}, "shuffle": {}})
    assert lsconfig.experiment_params(cfg, "shuffle")["methods"] == list(METHODS)
    assert lsconfig.experiment_params(cfg, "swap")["n_zones"] == 3
    knock = lsconfig.experiment_params(cfg, "knockout")
    assert knock["max_prompts"] == 7 and knock["max_target_tokens"] is None and knock["seed"] == 0
    assert not any(key.startswith("trace") for key in knock)  # causal tracing left knockout
    assert {i.name for i in lsconfig.experiment_infos().values() if i.gpu} >= {"knockout", "swap", "shuffle"}
    for bad, where in [({"shuffle": {"methods": ["sorting_hat"]}}, "config.experiments.shuffle.methods"),
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
        methods=("weight_stats", "bubble"), refine_max_evals=5))
    s = result.summary
    assert s["prompt_ids"] == sample["prompt_ids"] and s["prompt_categories"] == sample["prompt_categories"]
    assert s["n_prompts"] == 2 and s["n_tokens"] == 8 and s["underpowered"]
    assert any("only 2 prompts" in r for r in s["underpowered_reasons"])
