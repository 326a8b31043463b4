"""The spine's stages as plain functions: what each workflow script calls, in one line.

Each takes file paths and the rule's params, loads what it needs, calls the library and
writes its outputs atomically. They run without Snakemake too (tests, notebooks).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import torch

from layerscope import LayerscopeError
from layerscope.data.activations import ActivationCache, extract_activations, sequences_from_completions, sequences_from_prompts
from layerscope.model.adapter import load_model, load_tokenizer
from layerscope.model.generate import generate_completions
from layerscope.jobs.io import read_json, write_parquet
from layerscope.jobs.paths import MODEL_MANIFEST
from layerscope.data.prompts import load_prompt_set

log = logging.getLogger(__name__)


def model_provenance(model_dir: str | Path) -> dict:
    manifest = Path(model_dir) / MODEL_MANIFEST
    if not manifest.is_file():
        raise LayerscopeError(f"{model_dir} is not a prepared model (no {MODEL_MANIFEST}); run prepare_model")
    data = read_json(manifest)
    return {
        "source": json.dumps(data.get("source", {}), sort_keys=True),
        "revision": data.get("resolved_revision") or data.get("source", {}).get("revision", ""),
        "weights_sha256": json.dumps(data.get("weights", {}), sort_keys=True),
    }


def run_generate(model_dir, prompt_file, out_path, *, params: dict, device: torch.device) -> pd.DataFrame:
    prompt_set = load_prompt_set(prompt_file, limit=params.get("limit"))
    adapter = load_model(model_dir, dtype=params["dtype"], device=device, kind="decoder")
    tokenizer = load_tokenizer(model_dir)
    frame = generate_completions(
        adapter, tokenizer, prompt_set, model_dir=model_dir, max_new_tokens=params["max_new_tokens"],
        batch_size=params["batch_size"], system_prompt=params["system_prompt"],
        chat_template=params["chat_template"], backend=params["backend"], dtype=params["dtype"],
        seed=params.get("seed", 0), device=device,
    )
    write_parquet(out_path, frame)
    return frame


def run_extract(model_dir, resid_path, tokens_path, *, params: dict, device: torch.device, model: str,
                prompt_set: str, completions=None, prompt_file=None) -> dict:
    """Activation cache of a decoder's completions, or of an encoder's prompts."""
    adapter = load_model(model_dir, dtype=params["dtype"], device=device, kind=params["kind"])
    tokenizer = load_tokenizer(model_dir)
    prompts = load_prompt_set(prompt_file, limit=params.get("limit")) if prompt_file else None
    if params["kind"] == "decoder":
        if completions is None:
            raise LayerscopeError("a decoder's activations are extracted from its completions")
        sequences = sequences_from_completions(pd.read_parquet(completions))
    else:
        sequences = sequences_from_prompts(tokenizer, prompts.prompts)
    metadata = {
        "model": model,
        "prompt_set": prompt_set,
        "prompt_set_sha256": prompts.sha256 if prompts else "",
        **model_provenance(model_dir),
        "device": device.type,
    }
    return extract_activations(adapter, tokenizer, sequences, resid_path, tokens_path,
                               batch_size=params["batch_size"], storage=params["storage_dtype"], metadata=metadata)


# ---------------------------------------------------------------------------- layer surgery


def surgery_evaluator(model_dir, resid_path, *, params: dict, device="cpu"):
    """The loss evaluator every surgery experiment runs on (model in ``params['dtype']``, cache beside resid)."""
    from layerscope.engines.surgery import LossEvaluator

    adapter = load_model(model_dir, dtype=params.get("dtype", "float32"), device=device, kind="decoder")
    cache = ActivationCache(Path(resid_path).parent)
    evaluator = LossEvaluator(adapter, cache, batch_size=params["batch_size"], device=device,
                              max_prompts=params.get("max_prompts"), layout=params.get("layout", "auto"))
    log.info("surgery on %d prompts (%d completion tokens), %s layout, %d positions per block call",
             len(evaluator.prompts), evaluator.n_targets, evaluator.layout, evaluator.positions_per_block)
    return evaluator


def run_knockout(model_dir, resid_path, outputs, *, params: dict, model: str, prompt_set: str, device="cpu"):
    from layerscope.experiments.surgery.knockout import knockout, write_outputs
    from layerscope.engines.tracing import causal_trace

    evaluator = surgery_evaluator(model_dir, resid_path, params=params, device=device)
    trace = None
    if params["trace_prompts"] > 0:
        trace = causal_trace(evaluator.adapter, evaluator.cache, n_prompts=params["trace_prompts"],
                             n_positions=params["trace_positions"], noise_scale=params["trace_noise"],
                             n_samples=params["trace_samples"], seed=params.get("seed", 0), device=evaluator.device,
                             layout=params.get("layout", "auto"))
    result = knockout(evaluator, model=model, prompt_set=prompt_set, pairwise_top=params["pairwise_top"],
                      top_synergy=params["top_synergy"], trace=trace)
    write_outputs(result, outputs)
    return result


def run_swap(model_dir, resid_path, outputs, *, params: dict, model: str, prompt_set: str, device="cpu"):
    from layerscope.experiments.surgery.swap import swap_experiment, write_outputs

    evaluator = surgery_evaluator(model_dir, resid_path, params=params, device=device)
    result = swap_experiment(evaluator, model=model, prompt_set=prompt_set,
                             interchangeable_ratio=params["interchangeable_ratio"], n_zones=params["n_zones"])
    write_outputs(result, outputs)
    return result


def run_shuffle(model_dir, resid_path, outputs, *, params: dict, model: str, prompt_set: str, device="cpu"):
    from layerscope.experiments.surgery.shuffle import ShuffleParams, shuffle_experiment, write_outputs

    evaluator = surgery_evaluator(model_dir, resid_path, params=params, device=device)
    seed = params.get("seed", 0)
    options = ShuffleParams(
        methods=tuple(params["methods"]), refine_max_evals=params["refine_max_evals"],
        reinsert_window=params["reinsert_window"], anneal_steps=params["anneal_steps"],
        anneal_t_start=params["anneal_t_start"], anneal_t_end=params["anneal_t_end"],
        pipeline_max_evals=params["pipeline_max_evals"], probe_sequences=params["probe_sequences"],
        probe_length=params["probe_length"], memo_states=params["memo_states"], seed=seed,
    )
    permutation_seed = params.get("permutation_seed")
    result = shuffle_experiment(evaluator, model=model, prompt_set=prompt_set, params=options,
                                permutation_seed=seed if permutation_seed is None else permutation_seed)
    write_outputs(result, outputs)
    return result
