"""The run planner against a real small run: stories260K completions and activation cache, built by the
spine's own stage functions, then compared with what the planner predicted without loading any weights."""

from __future__ import annotations

import json
import os
import struct

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from layerscope.jobs import config as lsconfig
from layerscope.jobs import paths
from layerscope.jobs.pipeline import run_extract, run_generate
from layerscope.model.prepare import prepare_model
from layerscope.plan import NOT_PREPARED, main, parse_bytes, plan_run
from tests.helpers import REPO

PROMPTS = {"prompts": [
    {"id": "a1", "category": "story", "text": "Once upon a time, there was a little girl"},
    {"id": "a2", "category": "story", "text": "The dog ran to the"},
    {"id": "b1", "category": "park", "text": "Tom and Sue went to the park."},
    {"id": "b2", "category": "animals", "text": "A big cat"},
]}


def _config(tmp_path, stories_dir, **model) -> dict:
    (tmp_path / "set.json").write_text(json.dumps(PROMPTS))
    raw = {
        "models": {"stories": {"source": {"type": "local", "path": str(stories_dir)}, **model}},
        "prompt_sets": {"tiny": {"path": "set.json"}},
        "generation": {"max_new_tokens": 20, "batch_size": 2},
        "activations": {"batch_size": 2},
        "experiments": {"logit_lens": {"topk": 5}},
    }
    (tmp_path / "config.yaml").write_text(json.dumps(raw))  # JSON is YAML
    return lsconfig.validate_config(raw, REPO / lsconfig.SCHEMA_FILE, base_dir=tmp_path)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, stories_dir):
    """A real end-to-end run of the spine: completions, then the activation cache; the plan before and after."""
    root = tmp_path_factory.mktemp("planrun")
    config = _config(root, stories_dir)
    model_dir = root / paths.MODEL_DIR.format(model="stories")
    prepare_model(config["models"]["stories"]["source"], model_dir)  # the manifest the cache's header cites
    before = plan_run(config, base_dir=root)  # no completions yet: their bound
    completions = root / paths.COMPLETIONS.format(model="stories", pset="tiny")
    resid = root / paths.RESID.format(model="stories", pset="tiny")
    tokens = root / paths.TOKENS.format(model="stories", pset="tiny")
    cpu = torch.device("cpu")
    run_generate(model_dir, root / "set.json", completions,
                 params=lsconfig.generation_params(config, "stories", "tiny"), device=cpu)
    run_extract(model_dir, resid, tokens, params=lsconfig.activation_params(config, "stories", "tiny"), device=cpu,
                model="stories", prompt_set="tiny", completions=completions, prompt_file=root / "set.json")
    after = plan_run(config, base_dir=root)
    return {"root": root, "config": config, "before": before, "after": after, "resid": resid,
            "completions": pd.read_parquet(completions)}


def test_the_cache_estimate_matches_the_real_cache(small_run):
    real = os.path.getsize(small_run["resid"])
    entry = small_run["after"]["models"]["stories"]["prompt_sets"]["tiny"]
    assert entry["completions"] == "real"
    assert abs(entry["cache_bytes"] - real) / real < 0.05
    assert abs(entry["cache_bytes"] - real) <= 64  # only the header's hashes are placeholders
    with open(small_run["resid"], "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    assert int(header["__metadata__"]["n_tokens"]) == entry["tokens"]


def test_before_generation_the_estimate_is_an_upper_bound_with_exact_prompt_tokens(small_run):
    before = small_run["before"]["models"]["stories"]["prompt_sets"]["tiny"]
    after = small_run["after"]["models"]["stories"]["prompt_sets"]["tiny"]
    frame = small_run["completions"]
    assert before["completions"] == "upper bound"
    # the prompts rendered by the planner are token for token what generation rendered
    assert before["prompt_tokens"] == after["prompt_tokens"] == sum(len(x) for x in frame["prompt_ids"])
    assert before["completion_tokens"] == 4 * 20 >= after["completion_tokens"]
    assert before["cache_bytes"] >= os.path.getsize(small_run["resid"])


def test_json_output(small_run, monkeypatch, capsys):
    monkeypatch.chdir(small_run["root"])
    assert main(["--configfile", "config.yaml", "--json", "--gpu-memory", "80GiB", "--gpu-count", "2"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert set(plan) == {"devices", "models", "warnings", "total_cache_bytes"}
    assert plan["devices"]["gpu_memory_bytes"] == 80 * 2**30 and plan["devices"]["count"] == 2
    entry = plan["models"]["stories"]
    assert {"kind", "gpus", "status", "n_layers", "d_model", "parameters", "prompt_sets"} <= set(entry)
    tiny = entry["prompt_sets"]["tiny"]
    assert {"prompts", "prompt_tokens", "completion_tokens", "tokens", "completions", "cache_bytes", "jobs",
            "experiments"} <= set(tiny)
    # planned for a GPU: the cache is float16 (storage dtype auto), half the CPU run's float32 cache
    real = os.path.getsize(small_run["resid"])
    assert tiny["cache_dtype_bytes"] == 2
    assert abs(tiny["cache_bytes"] - real / 2) / (real / 2) < 0.01
    assert set(tiny["jobs"]) == {"generate_completions", "extract_activations"}
    assert tiny["experiments"]["logit_lens"]["forward_passes"] == 0
    assert plan["warnings"] == [] and plan["total_cache_bytes"] == tiny["cache_bytes"]


def test_gpu_memory_follows_the_formula_and_a_too_big_job_warns(tmp_path, stories_dir):
    config = _config(tmp_path, stories_dir, gpus=2)
    plan = plan_run(config, base_dir=tmp_path, gpu_memory=parse_bytes("1KiB"), gpu_count=1)
    entry = plan["models"]["stories"]
    n_params = sum(t.numel() for t in load_file(str(stories_dir / "model.safetensors")).values())
    assert entry["parameters"] == n_params
    job = entry["prompt_sets"]["tiny"]["jobs"]["generate_completions"]
    cfg = json.loads((stories_dir / "config.json").read_text())
    seq = entry["prompt_sets"]["tiny"]["max_sequence"]  # every completion at its bound: prompt + 20
    kv_heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    assert job["kv_cache_bytes"] == 2 * cfg["num_hidden_layers"] * kv_heads * head_dim * seq * 2 * 2  # batch 2, bf16
    assert job["weights_bytes"] == n_params * 2
    assert job["peak_bytes_per_gpu"] == n_params + job["activation_bytes"] + job["kv_cache_bytes"]  # weights / 2
    warnings = "\n".join(plan["warnings"])
    assert "stories/tiny: generate_completions needs" in warnings and "raise models.stories.gpus" in warnings
    assert "gpus: 2 but the devices have 1 GPU(s)" in warnings
    roomy = plan_run(config, base_dir=tmp_path, gpu_memory=parse_bytes("80GiB"), gpu_count=2)
    assert roomy["warnings"] == []


def test_an_unprepared_model_is_named_not_guessed(tmp_path, stories_dir):
    config = _config(tmp_path, stories_dir)
    config["models"]["big"] = {**config["models"]["stories"], "source": {"type": "hub", "id": "org/big"}}
    plan = plan_run(config, base_dir=tmp_path)
    assert plan["models"]["big"]["status"] == NOT_PREPARED
    assert any(w.startswith("big: not prepared yet") for w in plan["warnings"])


def test_parse_bytes():
    assert parse_bytes("80GiB") == 80 * 2**30 and parse_bytes("24GB") == 24 * 10**9
    assert parse_bytes("1.5 MiB") == 3 * 2**19 and parse_bytes(1000) == 1000 and parse_bytes(None) is None
    with pytest.raises(Exception, match="not a memory size"):
        parse_bytes("lots")


def test_the_devices_config_block_is_validated_and_used(tmp_path, stories_dir):
    config = _config(tmp_path, stories_dir)
    raw = json.loads((tmp_path / "config.yaml").read_text())
    raw["devices"] = {"gpu_memory": "1KiB", "count": 1}
    config = lsconfig.validate_config(raw, REPO / lsconfig.SCHEMA_FILE, base_dir=tmp_path)
    plan = plan_run(config, base_dir=tmp_path)
    assert plan["devices"]["gpu_memory_bytes"] == 1024 and plan["warnings"]
    raw["devices"] = {"gpu_memory": "lots"}
    with pytest.raises(lsconfig.ConfigError, match="gpu_memory"):
        lsconfig.validate_config(raw, REPO / lsconfig.SCHEMA_FILE, base_dir=tmp_path)
