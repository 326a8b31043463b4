"""The run planner: what a configured run will cost, printed before anything heavy runs.

    python -m layerscope.plan [--configfile F] [--json] [--gpu-memory 80GiB] [--gpu-count 4]
    snakemake plan                      # the same, as a rule (not part of `all`)

Per model and prompt set it reports the tokens of the activation cache (each prompt rendered as
the run renders it — system message, chat template, prompt — counted with the model's own
tokenizer, plus its completion), the size of ``resid.safetensors`` on disk, the peak GPU memory of
every GPU job of the model, the forward passes of each experiment, and a warning wherever a job
cannot fit the configured devices (``devices.gpu_memory`` / ``devices.count`` in the config, or
the options). Nothing is loaded but ``config.json``, the tokenizer and the safetensors *headers*
of the prepared model folder, so it takes seconds whatever the model's size.

Completions: where ``results/{model}/{pset}/completions.parquet`` already exists its real lengths
are used (the estimate is then exact up to the header); otherwise every completion is taken at its
bound, ``max_new_tokens`` (an upper bound: completions that stop early make the cache smaller).
``"completions": "real" | "upper bound"`` says which.

Memory of a GPU job, per device: weights (parameters × the compute dtype's size) / the model's
``gpus``, plus the activations of one batch (hidden states, MLP intermediate, attention scores,
last-position logits) and the KV cache ``2 · n_layers · n_kv_heads · head_dim · seq · batch · bytes``
(seq = the longest rendered prompt + max_new_tokens). Activations and KV cache are not divided over
devices (conservative). Forward passes are full-model equivalents, estimated from each experiment's
parameters (``null`` where no estimate exists; ``0`` for experiments that only read the cache).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layerscope import LayerscopeError
from layerscope.jobs import config as lsconfig
from layerscope.jobs import paths

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8,
               "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_UNITS = {"": 1, "B": 1, "K": 1000, "KB": 1000, "M": 1000**2, "MB": 1000**2, "G": 1000**3, "GB": 1000**3,
          "T": 1000**4, "TB": 1000**4, "KI": 1024, "KIB": 1024, "MI": 1024**2, "MIB": 1024**2, "GI": 1024**3,
          "GIB": 1024**3, "TI": 1024**4, "TIB": 1024**4}
NOT_PREPARED = "not prepared yet: run prepare_model first"


def parse_bytes(value: str | int | float | None) -> int | None:
    """'80GiB', '24GB', '512MiB' or a number of bytes -> bytes (None stays None)."""
    if value is None or isinstance(value, (int, float)):
        return None if value is None else int(value)
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B?|B)?\s*", value, re.I)
    if not m:
        raise LayerscopeError(f"not a memory size: {value!r} (e.g. 80GiB, 24GB, 512MiB)")
    return int(float(m[1]) * _UNITS[(m[2] or "").upper()])


def human(n: int | float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# ---------------------------------------------------------------------------- the model, without its weights


@dataclass
class ModelShape:
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    vocab: int
    n_params: int | None  # from the safetensors headers
    file_bytes: int | None


def safetensors_params(folder: Path) -> tuple[int, int] | None:
    """(parameters, bytes on disk) of every *.safetensors file of a folder, from the headers alone."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    count = size = 0
    for file in files:
        with open(file, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for name, entry in header.items():
            if name != "__metadata__":
                count += math.prod(entry["shape"])
        size += file.stat().st_size
    return count, size


def model_shape(folder: Path) -> ModelShape:
    cfg = json.loads((folder / "config.json").read_text())
    cfg = cfg.get("text_config", cfg) if "num_hidden_layers" not in cfg and "n_layer" not in cfg else cfg
    d = cfg.get("hidden_size") or cfg.get("n_embd") or cfg["d_model"]
    heads = cfg.get("num_attention_heads") or cfg.get("n_head")
    head_dim = cfg.get("head_dim") or d // heads
    found = safetensors_params(folder)
    return ModelShape(
        n_layers=cfg.get("num_hidden_layers") or cfg["n_layer"], d_model=d, n_heads=heads,
        n_kv_heads=cfg.get("num_key_value_heads") or heads, head_dim=head_dim,
        d_ff=cfg.get("intermediate_size") or cfg.get("n_inner") or 4 * d, vocab=cfg.get("vocab_size", 0),
        n_params=found[0] if found else None, file_bytes=found[1] if found else None,
    )


def model_folder(config: dict, model: str, base_dir: Path) -> Path | None:
    """The prepared folder, or a local source folder that already is one; None when neither is there."""
    prepared = base_dir / paths.MODEL_DIR.format(model=model)
    if (prepared / "config.json").is_file():
        return prepared
    source = config["models"][model]["source"]
    if source["type"] == "local":
        local = Path(source["path"])
        local = local if local.is_absolute() else base_dir / local
        if (local / "config.json").is_file():
            return local
    return None


# ---------------------------------------------------------------------------- tokens


def sequence_lengths(config: dict, model: str, pset: str, folder: Path, base_dir: Path) -> dict:
    """Rendered prompt tokens and completion tokens of every prompt (real completions where they exist)."""
    import pandas as pd

    from layerscope.data.prompts import load_prompt_set
    from layerscope.model.adapter import load_tokenizer
    from layerscope.model.generate import encode_prompts

    spec = config["models"][model]
    ps = lsconfig.prompt_set_spec(config, pset)
    prompts = load_prompt_set(base_dir / ps["path"], limit=ps.get("limit")).prompts
    tokenizer = load_tokenizer(folder)
    completions_file = base_dir / paths.COMPLETIONS.format(model=model, pset=pset)
    if spec["kind"] == "encoder":
        prompt_tokens = [len(tokenizer(p.text, add_special_tokens=True)["input_ids"]) for p in prompts]
        return {"prompts": len(prompts), "prompt_tokens": prompt_tokens, "completion_tokens": [0] * len(prompts),
                "max_new_tokens": 0, "completions": "none (encoder)"}
    gen = lsconfig.generation_params(config, model, pset)
    if completions_file.is_file():
        frame = pd.read_parquet(completions_file, columns=["prompt_ids", "completion_ids"])
        return {"prompts": len(frame), "prompt_tokens": [len(x) for x in frame["prompt_ids"]],
                "completion_tokens": [len(x) for x in frame["completion_ids"]],
                "max_new_tokens": gen["max_new_tokens"], "completions": "real"}
    encoded = encode_prompts(tokenizer, prompts, system_prompt=gen["system_prompt"],
                             chat_template=gen["chat_template"])
    return {"prompts": len(encoded), "prompt_tokens": [len(e.ids) for e in encoded],
            "completion_tokens": [gen["max_new_tokens"]] * len(encoded), "max_new_tokens": gen["max_new_tokens"],
            "completions": "upper bound"}


def storage_bytes(config: dict, planning_gpu: bool) -> int:
    name = config["activations"]["dtype"]
    if name == "auto":
        name = "float16" if planning_gpu else "float32"
    return DTYPE_BYTES[name]


def cache_bytes(shape: ModelShape, n_tokens: int, n_sequences: int, itemsize: int, metadata: dict) -> int:
    """resid.safetensors as data.activations writes it: 8-byte length, JSON header (padded to 8), tensors."""
    tensor = n_tokens * shape.d_model * itemsize
    header = {"__metadata__": {k: str(v) for k, v in metadata.items()}}
    for k in range(shape.n_layers + 1):
        header[f"resid.{k}"] = {"dtype": "F32", "shape": [n_tokens, shape.d_model],
                                "data_offsets": [k * tensor, (k + 1) * tensor]}
    blob = len(json.dumps(header, separators=(",", ":")).encode())
    blob += -blob % 8
    return 8 + blob + (shape.n_layers + 1) * tensor


def _cache_metadata(config: dict, model: str, pset: str, folder: Path, shape: ModelShape, n_tokens: int,
                    n_sequences: int) -> dict:
    """What the extraction writes into the header (hashes as placeholders of the same length)."""
    from layerscope import __version__
    from layerscope.data.activations import SITE_DOC

    manifest = folder / paths.MODEL_MANIFEST
    weights = json.loads(manifest.read_text()).get("weights", {}) if manifest.is_file() else {}
    return {"model": model, "prompt_set": pset, "prompt_set_sha256": "0" * 64,
            "source": json.dumps(config["models"][model]["source"], sort_keys=True), "revision": "",
            "weights_sha256": json.dumps(weights, sort_keys=True), "device": "cpu",
            "layerscope_version": __version__, "n_layers": shape.n_layers, "d_model": shape.d_model,
            "n_tokens": n_tokens, "n_sequences": n_sequences, "storage_dtype": "float32",
            "compute_dtype": "float32", "model_type": "x" * 8, "sites": SITE_DOC}


# ---------------------------------------------------------------------------- GPU memory


def job_memory(shape: ModelShape, *, gpus: int, weight_bytes: int, batch: int, seq: int, act_bytes: int,
               kv: bool) -> dict:
    weights = (shape.n_params or 0) * weight_bytes
    activations = batch * seq * (2 * shape.d_model + shape.d_ff) * act_bytes \
        + batch * shape.n_heads * seq * seq * act_bytes + batch * shape.vocab * 4
    kv_cache = 2 * shape.n_layers * shape.n_kv_heads * shape.head_dim * seq * batch * act_bytes if kv else 0
    return {"weights_bytes": weights, "activation_bytes": activations, "kv_cache_bytes": kv_cache,
            "peak_bytes_per_gpu": math.ceil(weights / gpus) + activations + kv_cache}


def compute_bytes(dtype: str, planning_gpu: bool) -> int:
    if dtype == "auto":
        return 2 if planning_gpu else 4
    return DTYPE_BYTES[dtype]


# ---------------------------------------------------------------------------- forward passes


def forward_passes(name: str, params: dict, shape: ModelShape, n_prompts: int) -> tuple[int | None, str]:
    """Full-model forward equivalents of one run of an experiment, and how they are counted."""
    L = shape.n_layers
    sample = min(params.get("max_prompts") or n_prompts, n_prompts)
    if name == "knockout":
        k = params.get("pairwise_top", 0)
        return 1 + L + k * (k - 1) // 2, f"(1 + {L} blocks + pairs of top {k}) loss evaluations on {sample} prompts"
    if name == "swap":
        return 1 + L * (L - 1) // 2, f"(1 + {L}·{L - 1}/2 swaps) loss evaluations on {sample} prompts"
    if name == "shuffle":
        n = 3 * params.get("refine_max_evals", 0) + params.get("pipeline_max_evals", 0) + 1
        return n, f"≤ {n} loss evaluations on {sample} prompts (3 refiners + pipeline)"
    if name == "quantization":
        bits = len(params.get("bits", []))
        n = 1 + L * bits + 7 * bits + len(params.get("uniform_bits", [])) + 6
        return n, f"≈ {n} loss evaluations ({L} blocks × {bits} widths, matrix types, uniform, mixed) on {sample}" \
                  f" (+{params.get('heldout_prompts', 0)} held-out) prompts"
    if name == "linearization":
        n = params.get("n_sequences", 0) * params.get("tokens_per_sequence", 0) * params.get("n_directions", 0)
        per = len(params.get("eps", [])) + 2 * params.get("power_iterations", 0)
        total = math.ceil(n * L * per / 2)
        return total, f"{n} perturbations × {L} blocks × {per} runs of the blocks above (≈ half a forward each)"
    if name == "causal_tracing":
        n = params.get("max_prompts") or n_prompts
        total = math.ceil(min(n, n_prompts) * params.get("samples", 10) * L / 2)
        return total, f"{min(n, n_prompts)} prompts × {params.get('samples', 10)} draws × L²/2 block calls"
    if name == "z_patching":
        pairs = min(params.get("max_pairs") or n_prompts // 2, n_prompts // 2)
        return None, f"{pairs} pairs × ~{L - 1} conditions, each generating ≤ {params.get('max_new_tokens')} tokens"
    if name == "contrastive":
        return None, "one forward per prompt of the groups file"
    if name == "layer_repeat":
        repeats = max(int(params.get("max_repeats", 3)) - 1, 0)
        pairs = (L - 1) if params.get("pairs", True) else 0
        n = 1 + L * repeats + L + pairs
        return n, f"(1 + {L} blocks × {repeats} repeat counts + {L} skips + {pairs} pairs) loss evaluations on " \
                  f"{sample} prompts"
    if name == "tuned_lens":
        return 0, "reads the activation cache (trains one translator per layer on it)"
    if name == "ffn_avoidance":
        pairs = min(params.get("max_pairs") or n_prompts // 2, n_prompts // 2)
        return 2 * pairs, f"one forward per prompt of {pairs} pairs (each block's MLP output)"
    if name == "ard_mmd":
        return 0, "optimisation on cached states (no model forward)"
    return 0, "reads the activation cache"


# ---------------------------------------------------------------------------- the plan


def _runs_by_pair(config: dict) -> tuple[dict, dict]:
    """(model, pset) -> [experiment rules reading its cache]; model -> [rules without a prompt set]."""
    infos = lsconfig.experiment_infos()
    pairs: dict[tuple[str, str], list[str]] = {}
    per_model: dict[str, list[str]] = {}
    for name in lsconfig.enabled_rules(config):
        for run in lsconfig.experiment_runs(config, name):
            models = [run[k] for k in ("model", "model_a", "model_b") if k in run]
            for m in models:
                if "pset" in run:
                    pairs.setdefault((m, run["pset"]), [])
                    if name not in pairs[(m, run["pset"])]:
                        pairs[(m, run["pset"])].append(name)
                else:
                    per_model.setdefault(m, [])
                    if name not in per_model[m]:
                        per_model[m].append(name)
    return pairs, per_model


def plan_run(config: dict, *, base_dir: str | Path = ".", gpu_memory: int | None = None,
             gpu_count: int | None = None) -> dict:
    """The plan of a validated config as a dict (what ``--json`` prints)."""
    base_dir = Path(base_dir)
    devices = config.get("devices", {})
    gpu_memory = gpu_memory if gpu_memory is not None else parse_bytes(devices.get("gpu_memory"))
    gpu_count = gpu_count if gpu_count is not None else devices.get("count")
    planning_gpu = gpu_memory is not None
    infos = lsconfig.experiment_infos()
    pairs, per_model = _runs_by_pair(config)
    out: dict[str, Any] = {
        "devices": {"gpu_memory_bytes": gpu_memory, "count": gpu_count,
                    "dtypes": "GPU (auto: bfloat16 compute, float16 cache)" if planning_gpu else
                              "CPU (auto: float32 compute and cache)"},
        "models": {}, "warnings": [], "total_cache_bytes": 0,
    }
    for model in config["models"]:
        spec = config["models"][model]
        gpus = lsconfig.model_gpus(config, model)
        entry: dict[str, Any] = {"kind": spec["kind"], "gpus": gpus, "prompt_sets": {},
                                 "experiments": per_model.get(model, [])}
        out["models"][model] = entry
        folder = model_folder(config, model, base_dir)
        if folder is None:
            entry["status"] = NOT_PREPARED
            out["warnings"].append(f"{model}: {NOT_PREPARED} (nothing estimated)")
            continue
        shape = model_shape(folder)
        entry.update({"status": "prepared", "folder": str(folder), "n_layers": shape.n_layers,
                      "d_model": shape.d_model, "parameters": shape.n_params, "weights_file_bytes": shape.file_bytes})
        if gpu_count is not None and gpus > gpu_count:
            out["warnings"].append(f"{model}: gpus: {gpus} but the devices have {gpu_count} GPU(s); its jobs get "
                                   f"{gpu_count} (Snakemake caps a job at --resources gpu)")
        for (m, pset), rules in pairs.items():
            if m != model:
                continue
            lengths = sequence_lengths(config, model, pset, folder, base_dir)
            seqs = [p + c for p, c in zip(lengths["prompt_tokens"], lengths["completion_tokens"])]
            n_tokens = sum(seqs)
            itemsize = storage_bytes(config, planning_gpu)
            meta = _cache_metadata(config, model, pset, folder, shape, n_tokens, len(seqs))
            size = cache_bytes(shape, n_tokens, len(seqs), itemsize, meta)
            needs_cache = any(any(i.split("_")[0] in ("resid", "tokens") for i in infos[r].inputs) for r in rules)
            seq = max(lengths["prompt_tokens"]) + lengths["max_new_tokens"]
            jobs = {}
            act = config["activations"]
            decoder = spec["kind"] == "decoder"  # encoders keep no KV cache
            if spec["kind"] == "decoder" and needs_cache:
                gen = lsconfig.generation_params(config, model, pset)
                jobs["generate_completions"] = {
                    "forward_passes": math.ceil(len(seqs) / gen["batch_size"]) * max(1, lengths["max_new_tokens"]),
                    **job_memory(shape, gpus=gpus, weight_bytes=compute_bytes(spec["dtype"], planning_gpu),
                                 batch=gen["batch_size"], seq=seq, act_bytes=compute_bytes(spec["dtype"], planning_gpu),
                                 kv=True)}
            if needs_cache:
                jobs["extract_activations"] = {
                    "forward_passes": math.ceil(len(seqs) / act["batch_size"]),
                    **job_memory(shape, gpus=gpus, weight_bytes=compute_bytes(spec["dtype"], planning_gpu),
                                 batch=act["batch_size"], seq=max(seqs), act_bytes=compute_bytes(spec["dtype"],
                                 planning_gpu), kv=decoder)}
            experiments = {}
            for rule in rules:
                params = lsconfig.experiment_params(config, infos[rule].key)
                passes, how = forward_passes(rule, params, shape, len(seqs))
                experiments[rule] = {"forward_passes": passes, "counted_as": how, "gpu": infos[rule].gpu}
                if infos[rule].gpu:
                    dtype = params.get("dtype", spec["dtype"])
                    batch = params.get("batch_size", act["batch_size"])
                    jobs[rule] = {"forward_passes": passes, **job_memory(
                        shape, gpus=gpus, weight_bytes=compute_bytes(dtype, planning_gpu), batch=batch, seq=max(seqs),
                        act_bytes=compute_bytes(dtype, planning_gpu), kv=decoder)}
            pentry = {
                "prompts": len(seqs), "prompt_tokens": sum(lengths["prompt_tokens"]),
                "completion_tokens": sum(lengths["completion_tokens"]), "tokens": n_tokens,
                "completions": lengths["completions"], "max_sequence": max(seqs),
                "cache_bytes": size if needs_cache else 0, "cache_dtype_bytes": itemsize,
                "jobs": jobs, "experiments": experiments,
            }
            entry["prompt_sets"][pset] = pentry
            out["total_cache_bytes"] += pentry["cache_bytes"]
            for job, info in jobs.items():
                if gpu_memory is not None and info["peak_bytes_per_gpu"] > gpu_memory:
                    out["warnings"].append(
                        f"{model}/{pset}: {job} needs {human(info['peak_bytes_per_gpu'])} per GPU on {gpus} GPU(s), "
                        f"more than the {human(gpu_memory)} of one device: raise models.{model}.gpus or lower its "
                        "batch size")
    return out


def format_plan(plan: dict) -> str:
    lines = []
    dev = plan["devices"]
    memory = human(dev["gpu_memory_bytes"]) if dev["gpu_memory_bytes"] else "? (no --gpu-memory: fit not checked)"
    lines.append(f"layerscope run plan — devices: {dev['count'] or '?'} GPU(s) of {memory}; "
                 f"dtypes as on {dev['dtypes']}")
    for model, entry in plan["models"].items():
        head = f"\n{model} ({entry['kind']}, gpus: {entry['gpus']})"
        if entry["status"] != "prepared":
            lines.append(f"{head}: {entry['status']}")
            continue
        lines.append(f"{head}: {entry['n_layers']} layers, d_model {entry['d_model']}, "
                     f"{(entry['parameters'] or 0) / 1e6:.1f}M parameters "
                     f"({human(entry['weights_file_bytes'])} on disk)")
        if entry["experiments"]:
            lines.append(f"  per-model experiments (weights or their own inputs): {', '.join(entry['experiments'])}")
        for pset, p in entry["prompt_sets"].items():
            lines.append(f"  {pset}: {p['prompts']} prompts, {p['tokens']} tokens ({p['prompt_tokens']} rendered "
                         f"prompt + {p['completion_tokens']} completion, {p['completions']}); "
                         + (f"cache {human(p['cache_bytes'])}" if p["cache_bytes"] else "no activation cache"))
            for job, j in p["jobs"].items():
                lines.append(f"    GPU job {job:22s} peak {human(j['peak_bytes_per_gpu'])}/GPU (weights "
                             f"{human(j['weights_bytes'])}, activations {human(j['activation_bytes'])}, KV "
                             f"{human(j['kv_cache_bytes'])}), forward passes "
                             f"{'?' if j['forward_passes'] is None else j['forward_passes']}")
            for rule, e in p["experiments"].items():
                passes = "?" if e["forward_passes"] is None else e["forward_passes"]
                lines.append(f"    {rule:28s} forward passes {passes}: {e['counted_as']}")
    lines.append(f"\ntotal activation cache: {human(plan['total_cache_bytes'])}")
    for warning in plan["warnings"]:
        lines.append(f"WARNING: {warning}")
    return "\n".join(lines)


def run_rule(config: dict, log_file: str | Path) -> None:
    """The body of the Snakemake rule `plan`: the plan on the terminal and in the rule's log."""
    text = format_plan(plan_run(config, base_dir="."))
    Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    Path(log_file).write_text(text + "\n")
    print(text)


def load_config(configfile: str | Path, base_dir: str | Path = ".") -> dict:
    import yaml

    raw = yaml.safe_load(Path(configfile).read_text()) or {}
    schema = Path(base_dir) / lsconfig.SCHEMA_FILE
    if not schema.is_file():  # a run folder outside the repository (snakemake -d): the repository's schema
        schema = Path(__file__).resolve().parents[2] / lsconfig.SCHEMA_FILE
    return lsconfig.validate_config(raw, schema, base_dir=base_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Plan a layerscope run: tokens, cache sizes, GPU memory, passes.")
    parser.add_argument("--configfile", default="config.yaml")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--gpu-memory", help="memory of one GPU, e.g. 80GiB (default: devices.gpu_memory)")
    parser.add_argument("--gpu-count", type=int, help="GPUs available (default: devices.count)")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.configfile)
        plan = plan_run(config, gpu_memory=parse_bytes(args.gpu_memory), gpu_count=args.gpu_count)
    except LayerscopeError as exc:
        print(f"layerscope plan: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
