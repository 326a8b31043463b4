"""Models bigger than one device: a disk-offloaded or split model gives the in-memory numbers.

Each test loads stories260K twice — in memory (the reference) and placed through accelerate
(disk offload forced by a tiny ``max_memory``, or an explicit cpu/disk split) — and compares
what the experiments read: the activation cache, the logit lens, a knockout sweep of the
loss evaluator, the sub-layers. On a CPU machine every module computes on the CPU, so the
kernels are identical and the numbers must agree to float32 rounding (rel 1e-5; in practice
exactly). The peak-memory test runs both loads in subprocesses on a random ~200 MB model and
reads each one's own peak RSS (VmHWM; ``ru_maxrss`` would report the parent's peak, which a
child inherits through fork).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from layerscope.data.activations import ActivationCache, extract_activations
from layerscope.engines.surgery import LossEvaluator, skip
from layerscope.experiments.lens.logit_lens import lens_arrays
from layerscope.model.adapter import load_model
from layerscope.model.placement import DoesNotFit, Placement, parse_size, use_placements
from tests.helpers import REPO
from tests.helpers.cache import random_token_cache

TINY = {"max_memory": {"cpu": "100KB"}}  # smaller than one block of stories260K: everything to disk
SPLIT = {"device_map": {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                        "model.layers.1": "cpu", "model.layers.2": "cpu", "model.layers.3": "disk",
                        "model.layers.4": "disk", "model.norm": "disk", "lm_head": "disk"}}


def close(a, b, rel=1e-5):
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    assert a.shape == b.shape
    assert np.all(np.abs(a - b) <= rel * np.maximum(np.abs(b), 1e-6) + 1e-7), np.max(np.abs(a - b))


@pytest.fixture(scope="module")
def reference(stories, tmp_path_factory):
    adapter, tok = stories
    folder = tmp_path_factory.mktemp("ref_cache")
    cache, seqs = random_token_cache(adapter, tok, folder, n=3, first_length=8, step=4, seed=3)
    return cache, seqs


@pytest.mark.parametrize("placement", [TINY, SPLIT], ids=["disk", "cpu+disk"])
def test_placed_model_gives_the_in_memory_numbers(stories, stories_dir, reference, placement, tmp_path):
    adapter, tok = stories
    cache, seqs = reference
    placed = load_model(stories_dir, dtype="float32", placement=placement)
    devices = set(placed.model.hf_device_map.values())
    assert "disk" in devices and placed.offloaded and placed.dispatched
    if placement is SPLIT:
        assert devices == {"cpu", "disk"}
    assert placed.device == torch.device("cpu")

    # activation cache: every site of every token
    extract_activations(placed, tok, seqs, tmp_path / "resid.safetensors", tmp_path / "tokens.parquet", batch_size=2)
    mine = ActivationCache(tmp_path)
    for layer in range(adapter.n_layers + 1):
        close(mine.resid(layer).numpy(), cache.resid(layer).numpy())

    # logit lens read-out (final norm and unembedding offloaded)
    ref_lens, lens = lens_arrays(adapter, cache, chunk_tokens=64), lens_arrays(placed, cache, chunk_tokens=64)
    for name in ("rank", "prob", "entropy", "kl"):
        close(getattr(lens, name), getattr(ref_lens, name))
    assert (lens.final_top1 == ref_lens.final_top1).all()

    # knockout sweep: cached prefixes, shared prefixes, packed rows, read-out at the targets
    sequences = [list(range(adapter.n_layers))] + [skip(adapter.n_layers, i) for i in (0, 3)] + [[0, 1, 3, 2, 4]]
    ref_losses = LossEvaluator(adapter, cache, batch_size=2).losses(sequences, per_token=True)
    losses = LossEvaluator(placed, cache, batch_size=2).losses(sequences, per_token=True)
    for a, b in zip(losses, ref_losses):
        close(a, b)

    # the sub-layers of an offloaded block, its norm scale and projections read back from disk
    ids = torch.tensor([seqs[0].ids])
    a, b = adapter.capture_block_inputs(ids), placed.capture_block_inputs(ids)
    h = a.resid0
    with torch.no_grad():
        close(placed.sublayers(4, b).attn(h), adapter.sublayers(4, a).attn(h))
        close(placed.sublayers(4, b).mlp(h), adapter.sublayers(4, a).mlp(h))
    close(placed.norm_scale(placed.final_norm), adapter.norm_scale(adapter.final_norm))
    for t, w in placed.projections(4).items():
        assert torch.equal(w, adapter.projections(4)[t]), t


def test_capture_keeps_the_offload_hooks(stories_dir):
    """Capturing block inputs swaps each block's forward: a dispatched block's forward (accelerate's hook,
    an instance attribute) must come back, or later calls would run on meta weights."""
    placed = load_model(stories_dir, dtype="float32", placement=TINY)
    hooked = [block.__dict__.get("forward") for block in placed.blocks]
    assert all(f is not None for f in hooked)
    ids = torch.tensor([[1, 5, 9, 30, 2]])
    inputs = placed.capture_block_inputs(ids)
    assert [block.__dict__.get("forward") for block in placed.blocks] == hooked
    out = placed.run_blocks(inputs.resid0, range(placed.n_layers), inputs)
    assert out.device.type == "cpu" and torch.isfinite(out).all()


def test_default_placement_loads_plainly(stories_dir, stories):
    """No device_map on a CPU: the model is loaded as before (no hooks, no meta weights, same numbers)."""
    plain = load_model(stories_dir, dtype="float32", placement={})
    assert not plain.dispatched and not plain.offloaded and not hasattr(plain.model, "hf_device_map")
    ids = torch.tensor([[1, 5, 9, 30, 2]])
    assert torch.equal(plain.model(ids).logits, stories[0].model(ids).logits)


def test_job_placement_is_found_by_model_folder(stories_dir):
    with use_placements({stories_dir: TINY}):
        assert load_model(stories_dir, dtype="float32").offloaded
    assert not load_model(stories_dir, dtype="float32").offloaded


def test_does_not_fit_without_offload_folder(stories_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    def no_weights(*args, **kwargs):  # the check comes before any weight is read
        raise AssertionError("from_pretrained called")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_weights)
    with pytest.raises(DoesNotFit, match="does not fit max_memory.*offload_folder is false"):
        load_model(stories_dir, dtype="float32", placement={**TINY, "offload_folder": False})


def test_sizes_and_strategies():
    assert parse_size("2GiB") == 2 * 2**30 and parse_size("500MB") == 500 * 10**6 and parse_size(123) == 123
    assert parse_size("1.5 KiB") == 1536
    with pytest.raises(Exception, match="not a size"):
        parse_size("lots")
    from layerscope.model.placement import resolve_strategy

    assert resolve_strategy(Placement(), "cpu") is None
    assert resolve_strategy(Placement(), "cuda") == "auto"
    assert resolve_strategy(Placement(max_memory={"cpu": "1GiB"}), "cpu") == "auto"
    assert resolve_strategy(Placement(device_map={"lm_head": "cuda:1", "model": "0"}), "cpu") == {"lm_head": 1, "model": 0}


_MEASURE = textwrap.dedent("""
    import json, resource, sys, torch
    from layerscope.model.adapter import load_model
    placement = json.loads(sys.argv[2])
    adapter = load_model(sys.argv[1], dtype="float32", placement=placement)
    ids = torch.randint(0, adapter.facts.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # as every experiment runs (a graph would keep each block's loaded weights alive)
        inputs = adapter.capture_block_inputs(ids)
        out = adapter.readout(adapter.run_blocks(inputs.resid0, range(adapter.n_layers), inputs))
    tied = set(getattr(adapter.model, "all_tied_weights_keys", {}) or {})  # tied copies count once
    offloaded = sum(p.numel() * p.element_size() for n, p in adapter.model.named_parameters()
                    if p.device.type == "meta" and n not in tied)
    block = sum(p.numel() * p.element_size() for p in adapter.blocks[-1].parameters())
    # peak RSS of this process image: VmHWM (ru_maxrss would include the parent's peak, inherited through fork)
    hwm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(json.dumps({"rss": hwm, "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "offloaded": offloaded,
                      "block": block, "checksum": float(out.double().sum())}))
""")


@pytest.fixture(scope="module")
def big_model_dir(tmp_path_factory):
    """A random Llama of ~200 MB (float32) saved as safetensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=14, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("big")
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return folder


def _measure(model_dir, placement) -> dict:
    env_path = f"{REPO / 'src'}"
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(model_dir), json.dumps(placement)], check=True,
                         capture_output=True, text=True, env={"PYTHONPATH": env_path, "OMP_NUM_THREADS": "2",
                                                              "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_disk_offload_lowers_peak_memory_by_the_offloaded_weights(big_model_dir):
    in_memory = _measure(big_model_dir, {})
    offloaded = _measure(big_model_dir, {"max_memory": {"cpu": "40MB"}})
    assert in_memory["offloaded"] == 0 and offloaded["offloaded"] > 150e6
    assert offloaded["checksum"] == pytest.approx(in_memory["checksum"], rel=1e-5)
    # the in-memory weights are file-backed pages of the checkpoint (zero-copy load), so the saving is the
    # offloaded weights less what a forward holds at once: one module's weights read back (at most a block)
    # and allocator / page-cache slack
    saved = in_memory["rss"] - offloaded["rss"]
    assert saved >= offloaded["offloaded"] - offloaded["block"] - 16 * 2**20, (in_memory, offloaded)


def test_config_placement_reaches_the_jobs_only_when_set():
    """A configured placement is validated, enters the params of the model's jobs (extraction, generation,
    experiments by model folder), and a default model's params stay as they were (no reruns)."""
    import copy

    import yaml

    from layerscope.jobs import config as lsconfig
    from layerscope.jobs.config import ConfigError, validate_config

    base = yaml.safe_load((REPO / "config.yaml").read_text())
    schema = REPO / lsconfig.SCHEMA_FILE
    default = validate_config(base, schema, base_dir=REPO)
    model = next(iter(default["models"]))
    pset = next(iter(default["prompt_sets"]))
    assert "placement" not in lsconfig.activation_params(default, model, pset)
    assert "placement" not in lsconfig.generation_params(default, model, pset)
    assert lsconfig.experiment_placements(default, {"model": model}) == {} and not lsconfig.any_placement(default)

    cfg = copy.deepcopy(base)
    cfg["models"][model].update(device_map="auto", max_memory={"cpu": "2GiB", 0: "20GiB"}, offload_folder=False)
    cfg["models"][model]["gpus"] = 2  # the leasing branch's key, read with a default of 1
    try:
        placed = validate_config(cfg, schema, base_dir=REPO)
    except ConfigError as exc:  # `gpus` not in this branch's schema yet
        assert "gpus" in str(exc)
        del cfg["models"][model]["gpus"]
        placed = validate_config(cfg, schema, base_dir=REPO)
    want = {"device_map": "auto", "max_memory": {"cpu": "2GiB", 0: "20GiB"}, "offload_folder": False}
    assert lsconfig.activation_params(placed, model, pset)["placement"] == want
    assert lsconfig.experiment_placements(placed, {"model": model}) == {f"resources/models/{model}": want}
    for bad in ({"max_memory": {"cpu": "lots"}}, {"device_map": "everywhere"}, {"device_map": {"lm_head": "gpu"}}):
        cfg = copy.deepcopy(base)
        cfg["models"][model].update(bad)
        with pytest.raises(ConfigError):
            validate_config(cfg, schema, base_dir=REPO)
