"""Configuration: JSON-Schema validation (draft 2020-12), defaults, and what the run must build.

The Snakefile calls :func:`validate_config` once at start-up; a bad key, a wrong type, an
unknown experiment, model source or reference stops the run with a message naming it.
Everything the rules need from the config is computed here, so it can be unit-tested.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable

import jsonschema

from layerscope import LayerscopeError
from layerscope.jobs import paths
from layerscope.data.prompts import PromptSetError, load_prompt_set, zh_en_pairs

SCHEMA_FILE = "resources/config.schema.json"


class ConfigError(LayerscopeError):
    """The configuration is invalid; the message lists every problem found."""


# ---------------------------------------------------------------------------- validation


def _extend_with_defaults(validator_class):
    """A validator that fills ``default`` values of object properties while validating."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for prop, subschema in properties.items():
                if isinstance(subschema, dict) and "default" in subschema and prop not in instance:
                    instance[prop] = copy.deepcopy(subschema["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


_DefaultFillingValidator = _extend_with_defaults(jsonschema.Draft202012Validator)


def _format_error(error: jsonschema.ValidationError) -> str:
    where = "config"
    for part in error.absolute_path:
        where += f"[{part!r}]" if isinstance(part, int) else f".{part}"
    message = error.schema.get("errorMessage") if isinstance(error.schema, dict) else None
    if error.validator == "additionalProperties" and error.validator_value is False:
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed)) if isinstance(error.instance, dict) else []
        noun = "experiment" if list(error.absolute_path) == ["experiments"] else "key"
        message = f"unknown {noun}(s) {extra}; allowed: {allowed}"
    elif error.validator == "enum" and list(error.absolute_path)[-2:-1] == ["source"]:
        message = f"unknown model source type {error.instance!r}; supported: {error.validator_value}"
    elif error.validator == "pattern" and error.schema.get("description"):
        message = f"{error.instance!r} is not valid: {error.schema['description']}"
    return f"{where}: {message or error.message}"


def load_schema(schema_path: str | Path) -> dict:
    """The full schema: the shipped file with every registered experiment's block (see jobs.schema)."""
    from layerscope.jobs.schema import build_schema

    return build_schema(schema_path)


def validate_config(config: dict, schema_path: str | Path, base_dir: str | Path = ".") -> dict:
    """Validate ``config`` against the schema, fill defaults, check cross-references.

    Returns a new dict (the input is not modified). Raises :class:`ConfigError` listing
    every problem. ``base_dir`` resolves relative prompt-set paths for the existence check.
    """
    schema = load_schema(schema_path)
    filled = copy.deepcopy(dict(config))
    validator = _DefaultFillingValidator(schema)
    errors = sorted(validator.iter_errors(filled), key=lambda e: [str(p) for p in e.absolute_path])
    # `oneOf`/`if` branches report their sub-errors separately; keep the most specific ones
    problems = list(dict.fromkeys(_format_error(e) for e in errors))
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))

    problems = []
    models = filled["models"]
    psets = filled["prompt_sets"]
    for slug in models:
        if slug in paths.RESERVED_MODEL_SLUGS:
            problems.append(f"config.models.{slug}: {slug!r} is reserved (a folder of results/); rename the model")
    weights_only = [info.folder or info.name for info in experiment_infos().values() if info.per_model]
    for slug in psets:
        if slug in weights_only:
            problems.append(f"config.prompt_sets.{slug}: {slug!r} is the name of a weights-only experiment "
                            "(results/{model}/" + slug + "/); rename the prompt set")
    loaded = {}
    for slug, pset in psets.items():
        file = Path(base_dir) / pset["path"]
        try:
            loaded[slug] = load_prompt_set(file, limit=pset.get("limit"))
        except PromptSetError as exc:
            problems.append(f"config.prompt_sets.{slug}: {exc}")
    for name, exp in filled["experiments"].items():
        info = info_of(name)
        for model in exp.get("models", []):
            if model not in models:
                problems.append(f"config.experiments.{name}.models: unknown model {model!r}; configured: {sorted(models)}")
            elif not info.accepts(models[model]["kind"]):
                problems.append(
                    f"config.experiments.{name}.models: {name} runs on {' or '.join(info.model_kinds)} models, but "
                    f"{model!r} is of kind {models[model]['kind']!r}"
                )
        for pset in exp.get("prompt_sets", []):
            if pset not in psets:
                problems.append(
                    f"config.experiments.{name}.prompt_sets: unknown prompt set {pset!r}; configured: {sorted(psets)}"
                )
        if info.paired and exp.get("enabled", True):
            for pset in exp.get("prompt_sets") or list(psets):
                if pset not in loaded:
                    continue  # unknown or unreadable: reported above
                try:
                    zh_en_pairs(loaded[pset])
                except PromptSetError as exc:
                    problems.append(
                        f"config.experiments.{name}.prompt_sets: {name} needs zh/en paired prompts, but prompt set "
                        f"{pset!r} is not one ({exc}); list only paired prompt sets under `prompt_sets`"
                    )
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
    return filled


# ---------------------------------------------------------------------------- what to run


def experiment_infos() -> dict:
    """Every experiment (rule) by name, from the registry."""
    from layerscope.experiments.registry import experiments

    return experiments()


def _rules_of(key: str) -> list:
    """Experiments (rules) that read config block ``key``."""
    return [info for info in experiment_infos().values() if info.key == key]


def info_of(key: str):
    """What the config block ``key`` runs (the first of its rules: they share needs and data kind)."""
    found = _rules_of(key)
    if not found:
        raise ConfigError(f"unknown experiment {key!r}")
    return found[0]


def enabled_experiments(config: dict) -> list[str]:
    """Enabled config blocks (experiment keys)."""
    return [name for name, exp in config["experiments"].items() if exp.get("enabled", True)]


def enabled_rules(config: dict) -> list[str]:
    """Names of the experiment rules that run (a config block may have several, e.g. cross_model)."""
    enabled = set(enabled_experiments(config))
    return [name for name, info in experiment_infos().items() if info.key in enabled]


def experiment_models(config: dict, name: str) -> list[str]:
    """Models an experiment runs on: those listed (or all), restricted to the kinds it supports."""
    info = experiment_infos().get(name) or info_of(name)
    exp = config["experiments"].get(info.key, {})
    chosen = exp.get("models") or list(config["models"])
    return [m for m in chosen if info.accepts(config["models"][m]["kind"])]


def experiment_prompt_sets(config: dict, name: str) -> list[str]:
    info = experiment_infos().get(name)
    exp = config["experiments"].get(info.key, {})
    return exp.get("prompt_sets") or list(config["prompt_sets"])


def experiment_runs(config: dict, name: str) -> list[dict[str, str]]:
    """Wildcard values of every run of an experiment rule: [{'model':…, 'pset':…}] (no pset if per model)."""
    info = experiment_infos()[name]
    if info.key not in enabled_experiments(config):
        return []
    models = experiment_models(config, name)
    if info.pairwise:
        return pair_runs(config, name)
    if info.per_model:
        runs = [{"model": m} for m in models]
    else:
        runs = [{"model": m, "pset": p} for m in models for p in experiment_prompt_sets(config, name)]
    for required in info.requires:  # a cross-experiment rule needs its inputs' runs
        available = experiment_runs(config, required)
        runs = [r for r in runs if any(all(a.get(k) == v for k, v in r.items()) for a in available)]
    return runs


def model_pairs(config: dict, name: str) -> list[tuple[str, str]]:
    """Every unordered pair of an experiment's models, in config order."""
    models = experiment_models(config, name)
    return [(a, b) for i, a in enumerate(models) for b in models[i + 1 :]]


def pair_runs(config: dict, name: str) -> list[dict[str, str]]:
    """Runs of a pairwise experiment rule: one per pair (and prompt set, where it reads activation caches)."""
    info = experiment_infos()[name]
    runs = []
    for a, b in model_pairs(config, name):
        if info.uses_prompt_sets:
            runs += [{"model_a": a, "model_b": b, "pset": p} for p in experiment_prompt_sets(config, name)]
        else:
            runs.append({"model_a": a, "model_b": b})
    return runs


def summary_path(name: str, run: dict[str, str]) -> str:
    return experiment_infos()[name].output_file(paths.SUMMARY).format(**run)


def model_summaries(config: dict, model: str) -> list[str]:
    """Every summary.json that belongs to one model's report (pairwise results go to the cross-model page)."""
    return [
        summary_path(name, run)
        for name in enabled_rules(config)
        for run in experiment_runs(config, name)
        if run.get("model") == model
    ]


def reported_models(config: dict) -> list[str]:
    """Models with at least one experiment (each gets a report page)."""
    return [m for m in config["models"] if model_summaries(config, m)]


def all_summaries(config: dict) -> list[str]:
    return [summary_path(name, run) for name in enabled_rules(config) for run in experiment_runs(config, name)]


def targets(config: dict) -> list[str]:
    """Everything `rule all` asks for: every experiment's summary and the reports."""
    out = all_summaries(config)
    models = reported_models(config)
    out += [paths.MODEL_REPORT_MD.format(model=m) for m in models]
    out += [paths.MODEL_REPORT_HTML.format(model=m) for m in models]
    if models:
        out += [paths.CROSS_MODEL_REPORT_MD, paths.CROSS_MODEL_TABLE, paths.REPORT_INDEX, paths.REPORT_PROVENANCE]
    # every configured model is prepared, even one no experiment uses yet
    out += [paths.MODEL_DIR.format(model=m) for m in config["models"]]
    return list(dict.fromkeys(out))


def experiment_input_paths(config: dict, name: str, wildcards: dict[str, str]) -> dict[str, str]:
    """The files an experiment rule reads, by its declared input names, for one run's wildcards."""
    from layerscope.experiments.registry import get

    exp = get(name)
    out = {}
    for item in exp.inputs:
        if item.startswith("param:"):
            out[item.split(":", 1)[1]] = config["experiments"][exp.key][item.split(":", 1)[1]]
        elif item.startswith("summary:"):
            other = item.split(":", 1)[1]
            out[other] = get(other).output_file(paths.SUMMARY).format(**wildcards)
        elif item == "prompts":
            out[item] = prompt_set_spec(config, wildcards["pset"])["path"]
        elif item == "mask":
            out[item] = get("z_mask").output_file("z_mask.safetensors").format(model=wildcards["model"])
        elif item in ("model", "model_a", "model_b"):
            out[item] = paths.MODEL_DIR.format(model=wildcards[item])
        else:  # resid, tokens (of the model), resid_a, tokens_b, … (of a pair's model)
            part, _, side = item.partition("_")
            model = wildcards[f"model_{side}"] if side else wildcards["model"]
            out[item] = {"resid": paths.RESID, "tokens": paths.TOKENS}[part].format(model=model, pset=wildcards["pset"])
    return out


# ---------------------------------------------------------------------------- parameters of rules


def model_spec(config: dict, model: str) -> dict:
    try:
        return config["models"][model]
    except KeyError:
        raise ConfigError(f"unknown model {model!r}; configured: {sorted(config['models'])}") from None


def prompt_set_spec(config: dict, pset: str) -> dict:
    try:
        return config["prompt_sets"][pset]
    except KeyError:
        raise ConfigError(f"unknown prompt set {pset!r}; configured: {sorted(config['prompt_sets'])}") from None


def model_gpus(config: dict, model: str) -> int:
    """GPUs one job of ``model`` leases at once (``models.<slug>.gpus``, default 1)."""
    return int(model_spec(config, model).get("gpus", 1))


def job_gpus(config: dict, wildcards: dict[str, str]) -> int:
    """A GPU rule's ``resources: gpu`` for one job: its model's gpus (a pair's: the larger)."""
    models = [wildcards[key] for key in ("model", "model_a", "model_b") if key in wildcards]
    return max((model_gpus(config, m) for m in models), default=1)


def prepare_params(config: dict, model: str) -> dict:
    spec = model_spec(config, model)
    return {
        "source": spec["source"],
        "kind": spec["kind"],
        "trust_remote_code": spec["trust_remote_code"],
        "allow_pickle": spec["allow_pickle"],
    }


PLACEMENT_KEYS = ("device_map", "max_memory", "offload_folder")


def placement_params(config: dict, model: str) -> dict:
    """Where the model's weights go (device_map, max_memory, offload_folder: see layerscope.model.placement)."""
    spec = model_spec(config, model)
    return {key: spec.get(key) for key in PLACEMENT_KEYS}


def placement_configured(config: dict, model: str) -> bool:
    """Whether the model's placement differs from the default (the params of its jobs then carry it)."""
    return any(value is not None for value in placement_params(config, model).values())


def model_gpus(config: dict, model: str) -> int:
    """GPUs a job of this model uses (``gpus`` of the model spec; 1 when absent)."""
    return int(model_spec(config, model).get("gpus") or 1)


def experiment_placements(config: dict, wildcards: dict) -> dict:
    """Placements of the models an experiment run loads (model, or model_a and model_b), by model folder.

    Only configured ones: a run of default models gets an empty dict.
    """
    out = {}
    for key in ("model", "model_a", "model_b"):
        model = wildcards.get(key)
        if model and placement_configured(config, model):
            out[paths.MODEL_DIR.format(model=model)] = placement_params(config, model)
    return out


def any_placement(config: dict) -> bool:
    return any(placement_configured(config, m) for m in config["models"])


def _with_placement(config: dict, model: str, params: dict) -> dict:
    # only a configured placement enters the params, so default runs keep their params (no reruns)
    if placement_configured(config, model):
        params["placement"] = placement_params(config, model)
    return params


def generation_params(config: dict, model: str, pset: str) -> dict:
    spec = model_spec(config, model)
    gen = config["generation"]
    ps = prompt_set_spec(config, pset)
    system_prompt = spec["system_prompt"] if "system_prompt" in spec else gen["system_prompt"]
    out = {
        "backend": gen["backend"],
        "max_new_tokens": ps.get("max_new_tokens", gen["max_new_tokens"]),
        "batch_size": gen["batch_size"],
        "system_prompt": system_prompt,
        "chat_template": spec["chat_template"],
        "dtype": spec["dtype"],
        "limit": ps.get("limit"),
        "seed": config["seed"],
    }
    if model_gpus(config, model) > 1:  # vLLM's tensor parallelism over the job's GPUs
        out["tensor_parallel_size"] = model_gpus(config, model)
    return _with_placement(config, model, out)


def rendering_params(config: dict, model: str) -> dict:
    """How a model's prompts are rendered and run, for experiments that force-decode their own inputs."""
    spec = model_spec(config, model)
    gen = config["generation"]
    return {
        "system_prompt": spec["system_prompt"] if "system_prompt" in spec else gen["system_prompt"],
        "chat_template": spec["chat_template"],
        "dtype": spec["dtype"],
    }


def activation_params(config: dict, model: str, pset: str) -> dict:
    spec = model_spec(config, model)
    act = config["activations"]
    out = {
        "batch_size": act["batch_size"],
        "storage_dtype": act["dtype"],
        "dtype": spec["dtype"],
        "kind": spec["kind"],
        "limit": prompt_set_spec(config, pset).get("limit"),
    }
    if spec["kind"] == "encoder":
        # encoders have no completions: the prompt text is encoded as-is
        out["chat_template"] = False
    return _with_placement(config, model, out)


def experiment_params(config: dict, name: str) -> dict:
    """An experiment's own parameters (without enabled/models/prompt_sets), plus the seed."""
    exp = dict(config["experiments"].get(name, {}))
    for key in ("enabled", "models", "prompt_sets"):
        exp.pop(key, None)
    exp["seed"] = config["seed"]
    return exp


def figure_format(config: dict) -> str:
    return config.get("report", {}).get("figure_format", "png")


def unique(items: Iterable[Any]) -> list[Any]:
    return list(dict.fromkeys(items))
