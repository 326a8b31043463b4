"""Fake quantization: the quantizer's error bound, exact restoration, per-family weight editing, loss effects."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from layerscope import LayerscopeError
from layerscope.data.activations import ActivationCache, TokenSequence, extract_activations
from layerscope.model.adapter import ModelAdapter
from layerscope.engines.weights import WeightEditor, weights_digest
from layerscope.experiments.nonlinearity.quant_methods import METHODS, availability, run_library_methods
from layerscope.experiments.nonlinearity.quantization import (
    allocate, fake_quantize, group_scales, qmax, quantization, rtn,
)
from layerscope.engines.surgery import LossEvaluator
from tests.helpers.cache import random_token_cache
from tests.helpers.tiny_models import tiny_configs, tiny_model

PARAMS = dict(bits=[2, 3, 4, 6, 8], group_size=32, sensitivity_bits=3, matrix_types=True, uniform_bits=[4, 8],
              mixed=True, mixed_bits=3, mixed_step=1, mixed_fraction=0.25, max_prompts=3, heldout_prompts=2,
              max_target_tokens=None, batch_size=4, library_methods=[], seed=0)


@pytest.fixture(autouse=True)
def one_thread():
    """These tests run many tiny ops; on a shared, loaded CPU two OpenMP threads make each one far slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _cache(adapter, tok, folder, n=5, seed=0):
    return random_token_cache(adapter, tok, folder, n=n, first_length=10, step=3, seed=seed)[0]


def _story_cache(adapter, tok, folder, n=5):
    """Real text (stories260K was trained on TinyStories): completions the model predicts well."""
    texts = ["Once upon a time, there was a little girl named Lily. She loved to play outside in the sun.",
             "One day, a big dog saw a ball in the park. The dog ran to the ball and played with it.",
             "Tom and Sue went to the park. They saw a bird in a tree. The bird was happy and sang.",
             "The cat was very hungry. It looked for food in the kitchen and found a fish to eat.",
             "Lily had a red ball. She threw the ball to her mom, and her mom threw it back to her."][:n]
    seqs = []
    for i, text in enumerate(texts):
        ids = tok(text)["input_ids"]
        roles = ["prompt"] * 6 + ["completion"] * (len(ids) - 6)
        seqs.append(TokenSequence(f"story{i}", "story", ids, roles))
    extract_activations(adapter, tok, seqs, folder / "resid.safetensors", folder / "tokens.parquet", batch_size=2)
    return ActivationCache(folder)


# ---------------------------------------------------------------------------- the quantizer


def test_qmax_and_bad_bits():
    assert [qmax(b) for b in (2, 3, 4, 8)] == [1, 3, 7, 127]
    for bad in (1, 0, 2.5):
        with pytest.raises(ValueError):
            qmax(bad)


def test_round_trip_error_equals_the_analytic_bound():
    # one row, two groups of 4; scales are powers of two so every value below is exact in float32
    bits, levels = 3, qmax(3)  # q_max = 3
    s1, s2 = 0.5, 0.25
    row = torch.tensor([[3 * s1, 1.5 * s1, -0.5 * s1, 0.2 * s1,   # group 1: max 3·s1 → scale s1
                         -3 * s2, 2.5 * s2, 1.0 * s2, -1.75 * s2]])  # group 2: max 3·s2 → scale s2
    scales = group_scales(row, bits, 4)
    assert scales.tolist() == [[s1, s2]]
    q = fake_quantize(row, bits, 4)
    err = (row - q).abs()[0]
    # analytic: error = distance to the nearest multiple of the scale; ≤ scale/2 everywhere,
    # = scale/2 exactly for values halfway between levels (1.5·s1, −0.5·s1, 2.5·s2), 0 at the max
    expected = torch.tensor([0, s1 / 2, s1 / 2, 0.2 * s1, 0, s2 / 2, 0, 0.25 * s2])
    torch.testing.assert_close(err, expected, rtol=0, atol=1e-7)
    bound = torch.tensor([s1] * 4 + [s2] * 4) / 2
    assert (err <= bound + 1e-7).all()
    assert set(q[0, :4].div(s1).round().tolist()) <= set(range(-levels, levels + 1))


def test_round_trip_bound_holds_on_random_matrices_and_is_attained():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 100, generator=g, dtype=torch.float64)  # 100 = 3 groups of 32 + one of 4
    for bits in (2, 3, 4, 8):
        q = fake_quantize(w, bits, 32)
        assert q.dtype == w.dtype and q.shape == w.shape
        scales = group_scales(w, bits, 32)  # [16, 4]
        per_elem = torch.repeat_interleave(scales, 32, dim=1)[:, :100]
        err = (w - q).abs()
        assert (err <= per_elem / 2 + 1e-12).all()
        # the worst case over many weights comes close to the bound
        assert (err / per_elem).max() > 0.45
        # each group's largest weight is represented exactly
        for r in range(16):
            j = int(w[r, :32].abs().argmax())
            assert err[r, j] < 1e-12
        levels = (q / per_elem).round()
        assert levels.abs().max() <= qmax(bits)
        torch.testing.assert_close(q, levels * per_elem)


def test_per_channel_and_zero_groups():
    w = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, -0.4, 0.2, 0.0]])
    q = fake_quantize(w, 2, None)  # one group per row; ternary grid {−s, 0, s}
    assert q[0].tolist() == [0.0, 0.0, 0.0, 0.0]  # an all-zero group stays zero (no NaN)
    assert q[1].tolist() == [1.0, 0.0, 0.0, 0.0]
    torch.testing.assert_close(fake_quantize(w, 8, 0), fake_quantize(w, 8, None))


def test_more_bits_less_error():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    errors = [float((w - fake_quantize(w, b, 64)).norm()) for b in (2, 3, 4, 6, 8)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.01 * float(w.norm())


# ---------------------------------------------------------------------------- editing weights


@pytest.mark.parametrize("family", sorted(tiny_configs()))
def test_editor_quantizes_exactly_the_chosen_matrix_and_restores(family):
    adapter = ModelAdapter(tiny_model(family))
    editor = WeightEditor(adapter)
    before = {n: p.detach().clone() for n, p in adapter.model.named_parameters()}
    digest = weights_digest(adapter.model)
    original = {layer: {t: w.clone() for t, w in adapter.projections(layer).items()} for layer in range(3)}
    refs = {r.type: r.param for r in adapter.projection_refs(1)}
    for t in editor.types():
        with editor.variant():
            editor.edit(1, [t], rtn(2, 8))
            # the chosen matrix (even a slice of a fused or transposed parameter) is its RTN value
            for layer in range(3):
                for other, w in adapter.projections(layer).items():
                    if layer == 1 and other == t:
                        torch.testing.assert_close(w, fake_quantize(original[1][t], 2, 8), rtol=0, atol=0)
                    else:  # every other matrix, in this block and the others, is untouched
                        assert torch.equal(w, original[layer][other]), (family, t, layer, other)
            changed = [n for n, p in adapter.model.named_parameters() if not torch.equal(p, before[n])]
            assert changed == [refs[t]], (family, t, changed)
        assert weights_digest(adapter.model) == digest


def test_sweep_restores_the_model_exactly(stories, tmp_path):
    adapter, tok = stories
    cache = _cache(adapter, tok, tmp_path)
    digest = weights_digest(adapter.model)
    state = {k: v.clone() for k, v in adapter.model.state_dict().items()}
    result = quantization(adapter, cache, model="stories", prompt_set="t", params=dict(PARAMS, bits=[2, 8], sensitivity_bits=2))
    assert result.summary["weights_restored"] is True
    # 3 bits (the mean of the mixed allocations) is not in this sweep: the ranking falls back, and says so
    assert "not in the sweep" in result.summary["mixed"]["sensitivity_rule"]
    assert weights_digest(adapter.model) == digest
    for k, v in adapter.model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_digest_sees_a_one_ulp_change():
    adapter = ModelAdapter(tiny_model("llama"))
    digest = weights_digest(adapter.model)
    p = adapter.blocks[2].mlp.down_proj.weight
    with torch.no_grad():
        p[0, 0] = torch.nextafter(p[0, 0], torch.tensor(1.0))
    assert weights_digest(adapter.model) != digest


# ---------------------------------------------------------------------------- loss effects on the real model


def test_eight_bits_barely_moves_the_loss_two_bits_moves_it_a_lot(stories, tmp_path):
    adapter, tok = stories
    cache = _story_cache(adapter, tok, tmp_path)
    ev = LossEvaluator(adapter, cache)
    base = ev.baseline()
    editor = WeightEditor(adapter)
    losses = {}
    for bits in (2, 8):
        with editor.variant():
            for layer in range(adapter.n_layers):
                editor.edit(layer, None, rtn(bits, 32))
            losses[bits] = ev.loss(list(range(adapter.n_layers)), max_prefix=0)
    assert base < 2.5  # the model knows these stories
    assert abs(losses[8] - base) < 0.01 * base
    assert losses[2] - base > 0.5  # ternary weights in every block: much worse
    assert abs(losses[8] - base) < 0.05 * (losses[2] - base)


def test_sweep_numbers_match_direct_recomputation(stories, tmp_path):
    adapter, tok = stories
    cache = _cache(adapter, tok, tmp_path, n=6)
    result = quantization(adapter, cache, model="stories", prompt_set="t", params=PARAMS)
    s, m = result.summary, result.metrics
    assert len(s["calibration_prompt_ids"]) == 3
    ev = LossEvaluator(adapter, cache, prompt_ids=s["calibration_prompt_ids"])
    full = list(range(5))
    base = ev.loss(full, use_cache=False)
    assert s["baseline_loss"] == pytest.approx(base, rel=1e-5)
    editor = WeightEditor(adapter)
    # one block: recompute from the embeddings (no cached prefix) through the model's own layers
    with editor.variant():
        editor.edit(3, None, rtn(3, 32))
        direct = ev.loss(full, use_cache=False)
    # the sweep starts from the cached resid.3, the check runs from the embeddings: two float32 paths, each
    # loss a mean of log-softmaxes over the vocabulary, so they agree to ~1e-5 of the loss, not bit for bit
    tol = 1e-5 * base
    assert s["sensitivity"]["3"][3] == pytest.approx(direct - base, abs=tol)
    # one matrix type everywhere
    with editor.variant():
        for layer in range(5):
            editor.edit(layer, ["gate"], rtn(2, 32))
        direct = ev.loss(full, use_cache=False)
    assert s["matrix_sensitivity"]["2"]["gate"] == pytest.approx(direct - base, abs=tol)
    # ppl columns are exp(loss)
    row = m[(m["scope"] == "uniform") & (m["bits"] == 4)].set_index("metric")["value"]
    assert row["ppl"] == pytest.approx(math.exp(row["loss"]))
    assert s["uniform_4bit_delta_loss"] == pytest.approx(row["delta_loss"])
    # headline ranks follow the sweep
    sens = np.asarray(s["sensitivity"]["3"])
    assert s["most_sensitive_layer"] == int(sens.argmax()) and s["least_sensitive_layer"] == int(sens.argmin())
    assert s["most_sensitive_matrix"] == max(s["matrix_sensitivity"]["3"], key=s["matrix_sensitivity"]["3"].get)


def test_mixed_precision_allocations_have_equal_average_bits(stories, tmp_path):
    adapter, tok = stories
    cache = _cache(adapter, tok, tmp_path, n=6)
    params = dict(PARAMS, bits=[2, 3], matrix_types=False, uniform_bits=[4], mixed_fraction=0.4)
    summary = quantization(adapter, cache, model="stories", prompt_set="t", params=params).summary
    mixed = summary["mixed"]
    assert mixed["split"] == "heldout" and mixed["n_heldout_prompts"] == 2
    for name, entry in mixed["allocations"].items():
        assert entry["avg_bits"] == pytest.approx(3.0)
        bits = mixed["bits_by_layer"][name]
        assert sorted(bits) == ([3] * 5 if name == "uniform" else [2, 2, 3, 4, 4])
    # measured rule: the two blocks least hurt at 2 bits go down, the two most hurt at 3 bits (of the rest) go up
    alloc = mixed["bits_by_layer"]["sensitivity"]
    at2, at3 = np.asarray(summary["sensitivity"]["2"]), np.asarray(summary["sensitivity"]["3"])
    assert mixed["score_by_layer"]["sensitivity_down"] == pytest.approx(at2.tolist())
    lowered = set(np.argsort(at2, kind="stable")[:2].tolist())
    assert {i for i, b in enumerate(alloc) if b == 2} == lowered
    rest = [i for i in np.argsort(-at3, kind="stable") if i not in lowered]
    assert {i for i, b in enumerate(alloc) if b == 4} == set(rest[:2])
    assert {"heldout_delta_loss", "calibration_delta_loss"} <= set(mixed["allocations"]["spectrum"])
    # the held-out numbers are the per-token losses of the held-out prompts only
    heldout_ids = summary["heldout_prompt_ids"]
    assert len(heldout_ids) == 2 and not set(heldout_ids) & set(summary["calibration_prompt_ids"])
    ev = LossEvaluator(adapter, cache, prompt_ids=heldout_ids)
    heldout = slice(None)
    editor = WeightEditor(adapter)
    base = ev.loss(list(range(5)), per_token=True, max_prefix=0)[heldout].mean()
    with editor.variant():
        for layer, b in enumerate(mixed["bits_by_layer"]["spectrum"]):
            editor.edit(layer, None, rtn(b, PARAMS["group_size"]))
        loss = ev.loss(list(range(5)), per_token=True, max_prefix=0)[heldout].mean()
    # the experiment packs calibration and held-out prompts together, this check only the held-out ones:
    # different float32 accumulation, so the tolerance is relative to the loss (~6 nats), not exact
    assert mixed["allocations"]["spectrum"]["heldout_delta_loss"] == pytest.approx(loss - base, abs=5e-5)


def _category_cache(adapter, tok, folder, per_category=(3, 3, 2, 2), seed=0):
    """Random-token prompts in file order by category (like a real prompt set), of different lengths,
    plus one prompt with an empty completion."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for c, n in enumerate(per_category):
        for i in range(n):
            length = 8 + 3 * ((c + i) % 3)
            ids = [1] + torch.randint(3, adapter.facts.vocab_size, (length - 1,), generator=g).tolist()
            roles = ["template"] + ["prompt"] * 3 + ["completion"] * (length - 4)
            seqs.append(TokenSequence(f"k{c}-{i}", f"cat{c}", ids, roles))
    seqs.append(TokenSequence("empty", "cat0", [1, 5, 6, 7], ["template", "prompt", "prompt", "prompt"]))
    extract_activations(adapter, tok, seqs, folder / "resid.safetensors", folder / "tokens.parquet", batch_size=4)
    return ActivationCache(folder)


SMALL = dict(PARAMS, bits=[2, 4], sensitivity_bits=2, matrix_types=False, uniform_bits=[4], mixed_bits=3,
             max_prompts=4, heldout_prompts=4)


def test_calibration_and_heldout_prompts_are_stratified_disjoint_and_seeded(stories, tmp_path):
    """The old code took the first N prompts of the file as calibration and the next ones as held-out:
    here that would be category cat0 only, and cat0/cat1 for the held-out set."""
    adapter, tok = stories
    cache = _category_cache(adapter, tok, tmp_path)
    s = quantization(adapter, cache, model="stories", prompt_set="t", params=SMALL).summary
    calib, heldout = s["calibration_prompt_ids"], s["heldout_prompt_ids"]
    assert len(calib) == 4 and len(heldout) == 4 and not set(calib) & set(heldout)
    assert s["calibration_prompt_categories"] == {"cat0": 1, "cat1": 1, "cat2": 1, "cat3": 1}
    assert s["heldout_prompt_categories"] == {"cat0": 1, "cat1": 1, "cat2": 1, "cat3": 1}
    assert sorted(s["prompt_ids"]) == sorted(calib + heldout)
    assert s["n_empty_completions"] == 1 and "empty" not in s["prompt_ids"]
    assert s["n_prompts"] == 4 and s["n_heldout_prompts"] == 4
    other = quantization(adapter, cache, model="stories", prompt_set="t", params=dict(SMALL, seed=3)).summary
    assert other["calibration_prompt_ids"] != calib or other["heldout_prompt_ids"] != heldout


def test_intervals_are_bootstraps_over_prompts_of_token_pooled_losses(stories, tmp_path):
    from layerscope.engines.statistics import Bootstrap

    adapter, tok = stories
    cache = _category_cache(adapter, tok, tmp_path)
    s = quantization(adapter, cache, model="stories", prompt_set="t", params=SMALL).summary
    ev = LossEvaluator(adapter, cache, prompt_ids=s["calibration_prompt_ids"])
    full = list(range(5))
    base_tokens = ev.loss(full, per_token=True, use_cache=False)
    editor = WeightEditor(adapter)
    with editor.variant():
        for layer in range(5):
            editor.edit(layer, None, rtn(4, PARAMS["group_size"]))
        q_tokens = ev.loss(full, per_token=True, use_cache=False)
    # the point value is the token-pooled Δloss (every completion token weighs the same), not a mean of
    # per-prompt means (the prompts have different numbers of tokens, so the two differ)
    pooled = float(q_tokens.mean() - base_tokens.mean())
    _, base_sums, counts = ev.per_prompt(base_tokens)
    _, q_sums, _ = ev.per_prompt(q_tokens)
    per_prompt_mean = float(np.mean(q_sums / counts - base_sums / counts))
    assert abs(pooled - per_prompt_mean) > 1e-4
    assert s["uniform_4bit_delta_loss"] == pytest.approx(pooled, abs=1e-5 * float(base_tokens.mean()))
    assert s["baseline_loss"] == pytest.approx(float(base_tokens.mean()), rel=1e-5)
    # the interval: the same bootstrap over the 4 calibration prompts of their Δloss sums and token counts
    point, ci = Bootstrap(4, seed=0).interval(q_sums - base_sums, counts,
                                              statistic=lambda a, n: a.sum(1) / n.sum(1))
    np.testing.assert_allclose(s["uniform_4bit_delta_loss_ci"], ci, atol=1e-5 * float(base_tokens.mean()))
    assert s["uncertainty"]["unit"] == "prompt" and s["uncertainty"]["n_units"] == 4
    assert s["underpowered"] and any("only 4 prompts" in r for r in s["underpowered_reasons"])
    # per-block sensitivity has one interval per block, each containing its point value
    for b in ("2", "4"):
        pairs = np.asarray(s["sensitivity_ci"][b], dtype=float)
        assert pairs.shape == (5, 2) and np.all(np.isfinite(pairs))
        assert np.all((pairs[:, 0] <= s["sensitivity"][b]) & (np.asarray(s["sensitivity"][b]) <= pairs[:, 1]))
    assert 0 < s["most_sensitive_layer_stability"] <= 1
    lo, hi = s["max_layer_delta_loss_ci"]
    assert lo <= s["max_layer_delta_loss"] <= hi


def test_mixed_precision_comparison_carries_intervals_and_flags_an_unseparated_best(stories, tmp_path):
    adapter, tok = stories
    cache = _category_cache(adapter, tok, tmp_path)
    s = quantization(adapter, cache, model="stories", prompt_set="t", params=SMALL).summary
    mixed = s["mixed"]
    assert mixed["uncertainty"]["n_units"] == 4 and mixed["split"] == "heldout"
    allocations = mixed["allocations"]
    for name in ("uniform", "sensitivity", "spectrum"):
        lo, hi = s[f"mixed_{name}_delta_loss_ci"]
        assert lo <= s[f"mixed_{name}_delta_loss"] <= hi
        assert allocations[name]["heldout_delta_loss_ci"] == [lo, hi]
    # the difference of two allocations is the difference of their Δloss on the same prompts
    diff = s["mixed_sensitivity_minus_uniform"]
    assert diff == pytest.approx(allocations["sensitivity"]["heldout_delta_loss"]
                                 - allocations["uniform"]["heldout_delta_loss"], abs=1e-9)
    lo, hi = s["mixed_sensitivity_minus_uniform_ci"]
    assert lo <= diff <= hi
    best = s["mixed_best"]
    assert best == min(allocations, key=lambda n: allocations[n]["heldout_delta_loss"])
    # a best allocation whose difference from another includes 0 is flagged, not stated
    for key in ("sensitivity_minus_uniform", "spectrum_minus_uniform", "sensitivity_minus_spectrum"):
        lo, hi = s[f"mixed_{key}_ci"]
        a, b = key.split("_minus_")
        if best in (a, b) and lo <= 0 <= hi:
            other = b if best == a else a
            assert any(f"mixed_best: {best} is not separated from {other}" in r for r in s["underpowered_reasons"])


def test_allocate():
    assert allocate(np.array([0.1, 0.9, 0.5, 0.3]), mean_bits=4, step=2, fraction=0.25) == [2, 6, 4, 4]
    assert allocate(np.zeros(3), mean_bits=3, step=1, fraction=0.0) == [3, 3, 3]
    assert allocate(np.arange(4.0), mean_bits=3, step=1, fraction=0.9) == [2, 2, 4, 4]  # at most half each way
    # separate scores for lowering: block 1 is lowered first, so the next-highest up-score is raised instead
    assert allocate(np.array([0.0, 9.0, 5.0, 1.0]), mean_bits=4, step=1, fraction=0.25,
                    down_scores=np.array([3.0, 0.0, 2.0, 1.0])) == [4, 3, 5, 4]


def test_bad_parameters_are_named(stories, tmp_path):
    adapter, tok = stories
    cache = _cache(adapter, tok, tmp_path)
    with pytest.raises(LayerscopeError, match="sensitivity_bits 5 is not in bits"):
        quantization(adapter, cache, model="s", prompt_set="t", params=dict(PARAMS, sensitivity_bits=5))
    with pytest.raises(LayerscopeError, match="at least 2 bits"):
        quantization(adapter, cache, model="s", prompt_set="t", params=dict(PARAMS, mixed_bits=2, mixed_step=1))


# ---------------------------------------------------------------------------- library methods (GPU extras)


def test_library_methods_are_skipped_with_a_reason_without_a_gpu(stories, tmp_path, caplog):
    adapter, tok = stories
    cache = _cache(adapter, tok, tmp_path)
    recorded = []
    with caplog.at_level("WARNING"):
        out = run_library_methods(list(METHODS), adapter, cache, ["s0", "s1"], dict(PARAMS), 1.0,
                                  lambda *a, **k: recorded.append(a))
    assert set(out) == set(METHODS)
    for method, entry in out.items():
        assert entry["status"] == "skipped" and "CUDA GPU" in entry["reason"], entry
        assert method in caplog.text
    assert recorded == []  # no number is made up for a skipped method


def test_availability_reasons(monkeypatch):
    assert "unknown method" in availability("awq", torch.device("cpu"))
    assert "CUDA GPU" in availability("nf4", torch.device("cpu"))
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    reason = availability("gptq", torch.device("cuda"))
    assert "gptqmodel" in reason and "layerscope[quant]" in reason


def test_a_failing_library_method_is_recorded_not_fatal(stories, tmp_path, monkeypatch):
    adapter, tok = stories
    cache = _cache(adapter, tok, tmp_path)
    import layerscope.experiments.nonlinearity.quant_methods as qm

    monkeypatch.setattr(qm, "availability", lambda method, device: None)  # pretend the GPU and package exist

    def broken(w):
        raise RuntimeError("kernel not built for this GPU")

    monkeypatch.setattr(qm, "_nf4", broken)
    digest = weights_digest(adapter.model)
    out = run_library_methods(["nf4"], adapter, cache, ["s0", "s1"], dict(PARAMS), 1.0, lambda *a, **k: None)
    assert out["nf4"] == {"status": "failed", "reason": "RuntimeError: kernel not built for this GPU"}
    assert weights_digest(adapter.model) == digest


def test_a_library_method_that_runs_is_evaluated_like_the_sweep(stories, tmp_path, monkeypatch):
    """The GPU path's plumbing, with RTN standing in for the library kernel."""
    adapter, tok = stories
    cache = _cache(adapter, tok, tmp_path)
    import layerscope.experiments.nonlinearity.quant_methods as qm

    monkeypatch.setattr(qm, "availability", lambda method, device: None)
    monkeypatch.setattr(qm, "_nf4", lambda w: fake_quantize(w, 4, 64))
    ev = LossEvaluator(adapter, cache, prompt_ids=["s1", "s3"])
    base = ev.baseline()
    out = run_library_methods(["nf4"], adapter, cache, ["s1", "s3"], dict(PARAMS), base, lambda *a, **k: None)
    editor = WeightEditor(adapter)
    with editor.variant():
        for layer in range(5):
            editor.edit(layer, None, rtn(4, 64))
        expected = ev.loss(list(range(5)), max_prefix=0)
    # the same kernels on the same inputs; rel 1e-5 leaves room for float32 accumulation order
    assert out["nf4"]["status"] == "ok" and out["nf4"]["loss"] == pytest.approx(expected, rel=1e-5)
