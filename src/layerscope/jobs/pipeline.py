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
from layerscope.data.activations import extract_activations, sequences_from_completions, sequences_from_prompts
from layerscope.model.adapter import load_model, load_tokenizer
from layerscope.model.generate import choose_backend, generate_completions
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
    if choose_backend(params["backend"], device) == "vllm":
        # vLLM loads the weights itself (over tensor_parallel_size GPUs): the adapter needs only the architecture
        from layerscope.model.adapter import ModelAdapter, check_supported, resolve_dtype
        from layerscope.model.placement import empty_model
        from transformers import AutoModelForCausalLM

        check_supported(model_dir, "decoder")
        model = empty_model(model_dir, AutoModelForCausalLM, resolve_dtype(params["dtype"], device))
        if (Path(model_dir) / "generation_config.json").is_file():  # its stop tokens, as from_pretrained reads them
            from transformers import GenerationConfig

            model.generation_config = GenerationConfig.from_pretrained(str(model_dir))
        adapter = ModelAdapter(model)
    else:
        adapter = load_model(model_dir, dtype=params["dtype"], device=device, kind="decoder",
                             placement=params.get("placement") or {})
    tokenizer = load_tokenizer(model_dir)
    frame = generate_completions(
        adapter, tokenizer, prompt_set, model_dir=model_dir, max_new_tokens=params["max_new_tokens"],
        batch_size=params["batch_size"], system_prompt=params["system_prompt"],
        chat_template=params["chat_template"], backend=params["backend"], dtype=params["dtype"],
        seed=params.get("seed", 0), device=device, tensor_parallel_size=params.get("tensor_parallel_size", 1),
    )
    write_parquet(out_path, frame)
    return frame


def run_extract(model_dir, resid_path, tokens_path, *, params: dict, device: torch.device, model: str,
                prompt_set: str, completions=None, prompt_file=None) -> dict:
    """Activation cache of a decoder's completions, or of an encoder's prompts."""
    adapter = load_model(model_dir, dtype=params["dtype"], device=device, kind=params["kind"],
                         placement=params.get("placement") or {})
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
