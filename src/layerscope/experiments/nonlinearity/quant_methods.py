"""Library quantization methods, compared with the RTN sweep: optional GPU extras.

Enabled by ``experiments.quantization.library_methods`` (a list of names below) and the
``layerscope[quant]`` extra (bitsandbytes, torchao, gptqmodel). Each method quantizes every
block's projections of the whole model and reports its loss on the calibration prompts (the
quantization experiment's stratified sample, given by id) against the full-precision
baseline:

* ``nf4`` — bitsandbytes 4-bit NormalFloat (blocks of 64 weights), as a quantize →
  dequantize round trip written into the projections (weight-only, like the RTN sweep);
* ``torchao_int4`` — torchao's int4 weight-only quantization (``Int4WeightOnlyConfig``, the
  experiment's group size, 128 when unset), likewise dequantized into the projections;
* ``gptq`` — gptqmodel's GPTQ at 4 bits, calibrated on the calibration prompts' token text,
  saved and reloaded with its own kernels (its loss therefore includes float16 compute).

A method runs only with a CUDA GPU and its package installed; otherwise it is skipped with
a logged reason that also lands in ``summary.json`` (``status: skipped``). A method that
raises records ``status: failed`` and its error instead of stopping the whole experiment:
the RTN results stand on their own.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import tempfile
from collections.abc import Sequence

import torch

from layerscope.data.activations import ActivationCache
from layerscope.engines.surgery import LossEvaluator
from layerscope.engines.weights import WeightEditor
from layerscope.model.adapter import ModelAdapter

log = logging.getLogger(__name__)

METHODS = {
    "nf4": "bitsandbytes",
    "torchao_int4": "torchao",
    "gptq": "gptqmodel",
}


def availability(method: str, device: torch.device) -> str | None:
    """None when ``method`` can run here, else the reason it cannot."""
    if method not in METHODS:
        return f"unknown method {method!r}; known: {sorted(METHODS)}"
    if torch.device(device).type != "cuda":
        return f"{method} needs a CUDA GPU; this job runs on {torch.device(device).type}"
    package = METHODS[method]
    if importlib.util.find_spec(package) is None:
        return f"{method} needs the '{package}' package: pip install 'layerscope[quant]'"
    return None


def _nf4(w: torch.Tensor) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(w.contiguous(), blocksize=64, quant_type="nf4")
    return bnbf.dequantize_4bit(packed, state).to(w.dtype).reshape(w.shape)


def _torchao_int4(group_size: int):
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    def quantize(w: torch.Tensor) -> torch.Tensor:
        linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=torch.bfloat16)
        with torch.no_grad():
            linear.weight.copy_(w)
        quantize_(linear, Int4WeightOnlyConfig(group_size=group_size))
        return linear.weight.dequantize().to(w.dtype).reshape(w.shape)

    return quantize


def _gptq(cache: ActivationCache, calib_ids: Sequence[str], model_dir: str, max_target_tokens: int | None) -> float:
    from gptqmodel import GPTQModel, QuantizeConfig

    from layerscope.model.adapter import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    tokens = cache.tokens
    texts = [tokenizer.decode(tokens.loc[tokens["prompt_id"].astype(str) == str(pid), "token_id"].tolist())
             for pid in calib_ids]
    quantized = GPTQModel.load(model_dir, QuantizeConfig(bits=4, group_size=128))
    quantized.quantize(texts, batch_size=1)
    with tempfile.TemporaryDirectory() as folder:
        quantized.save(folder)
        reloaded = GPTQModel.load(folder)
        q_adapter = ModelAdapter(reloaded.model)
        evaluator = LossEvaluator(q_adapter, cache, prompt_ids=list(calib_ids), max_target_tokens=max_target_tokens)
        loss = evaluator.loss(list(range(q_adapter.n_layers)), max_prefix=0)
    return loss


def run_library_methods(methods, adapter: ModelAdapter, cache: ActivationCache, calib_ids: Sequence[str],
                        params: dict, base: float, record, *, model_dir=None) -> dict:
    """Run (or skip, with the reason) each requested method on the calibration prompts ``calib_ids``
    (and ``params['max_target_tokens']``); returns name → result entry."""
    out = {}
    for method in methods:
        reason = availability(method, adapter.device)
        if reason:
            log.warning("quantization: skipping library method %s: %s", method, reason)
            out[method] = {"status": "skipped", "reason": reason}
            continue
        try:
            if method == "gptq":
                if model_dir is None:
                    raise ValueError("gptq needs the prepared model folder")
                loss = _gptq(cache, calib_ids, str(model_dir), params.get("max_target_tokens"))
            else:
                quantizer = _nf4 if method == "nf4" else _torchao_int4(params["group_size"] or 128)
                editor = WeightEditor(adapter)
                evaluator = LossEvaluator(adapter, cache, batch_size=params["batch_size"], prompt_ids=list(calib_ids),
                                          max_target_tokens=params.get("max_target_tokens"))
                with editor.variant():
                    for layer in range(adapter.n_layers):
                        editor.edit(layer, None, quantizer)
                    loss = evaluator.loss(list(range(adapter.n_layers)), max_prefix=0)
        except Exception as exc:  # an optional extra must not sink the RTN results
            log.error("quantization: library method %s failed: %s: %s", method, type(exc).__name__, exc)
            out[method] = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
            continue
        record("library", -1, "all", 4, method, loss, 0, ref=base)
        out[method] = {"status": "ok", "loss": loss, "delta_loss": loss - base, "ppl": math.exp(loss)}
        log.info("quantization: library method %s: Δloss %+.4f", method, loss - base)
    return out
