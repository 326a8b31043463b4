# Helpers shared by every rule: the validated config and functions of wildcards.
# The logic lives in the library (layerscope.jobs.config); these wrappers only bind the config.

import re
import sys
from pathlib import Path

from layerscope.jobs import paths
from layerscope.jobs import config as lsconfig

try:
    _validated = lsconfig.validate_config(
        config, Path(workflow.basedir) / lsconfig.SCHEMA_FILE, base_dir="."
    )
except lsconfig.ConfigError as exc:
    sys.exit(f"layerscope: {exc}")
config.clear()
config.update(_validated)


wildcard_constraints:
    model="|".join(re.escape(m) for m in config["models"]),
    model_a="|".join(re.escape(m) for m in config["models"]),
    model_b="|".join(re.escape(m) for m in config["models"]),
    pset="|".join(re.escape(p) for p in config["prompt_sets"]),


FIGURE = lsconfig.figure_format(config)
GPU_MEM_MB = 16000
CPU_MEM_MB = 4000


def all_targets():
    return lsconfig.targets(config)


def model_kind(wildcards):
    return lsconfig.model_spec(config, wildcards.model)["kind"]


def model_gpus(wildcards):
    """resources gpu=N of a GPU job: its model's `gpus` (see layerscope.jobs.devices)."""
    return lsconfig.job_gpus(config, dict(wildcards.items()))


def prompt_file(wildcards):
    return lsconfig.prompt_set_spec(config, wildcards.pset)["path"]


def prepare_params(wildcards):
    return lsconfig.prepare_params(config, wildcards.model)


def generation_params(wildcards):
    return lsconfig.generation_params(config, wildcards.model, wildcards.pset)


def activation_params(wildcards):
    return lsconfig.activation_params(config, wildcards.model, wildcards.pset)


def activation_inputs(wildcards):
    """Decoders are extracted from their completions, encoders from their prompts."""
    inputs = {
        "model": paths.MODEL_DIR.format(model=wildcards.model),
        "prompts": prompt_file(wildcards),
    }
    if model_kind(wildcards) == "decoder":
        inputs["completions"] = paths.COMPLETIONS.format(**wildcards)
    return inputs


def experiment_params(name):
    def params(wildcards):
        return lsconfig.experiment_params(config, name)

    return params


def model_report_inputs(wildcards):
    return {
        "model": paths.MODEL_DIR.format(model=wildcards.model),
        "summaries": lsconfig.model_summaries(config, wildcards.model),
    }


def cross_model_inputs(wildcards):
    return lsconfig.all_summaries(config)


def model_report_pages(wildcards):
    return [paths.MODEL_REPORT_HTML.format(model=m) for m in lsconfig.reported_models(config)]


def reported_models(wildcards):
    return lsconfig.reported_models(config)


def reported_model_dirs(wildcards):
    return [paths.MODEL_DIR.format(model=m) for m in lsconfig.reported_models(config)]


def rendering_params(wildcards):
    return lsconfig.rendering_params(config, wildcards.model)


def placement_params(wildcards):
    """Placements (device_map, max_memory, offload_folder) of the run's models, by model folder."""
    return lsconfig.experiment_placements(config, dict(wildcards.items()))


def experiment_inputs(name):
    """Input function of an experiment rule: its declared inputs, by name (see the registry's INPUTS)."""

    def inputs(wildcards):
        return lsconfig.experiment_input_paths(config, name, dict(wildcards.items()))

    return inputs


def experiment_outputs(exp):
    """An experiment rule's outputs; figures are registered with Snakemake's report."""
    out = {}
    figures = {f"figure_{f.name}": f for f in exp.figures}
    for key, pattern in exp.outputs(FIGURE).items():
        if key in figures:
            figure = figures[key]
            labels = {"figure": figure.label}
            if exp.pairwise:
                labels = {"models": "{model_a} vs {model_b}", **({"prompt set": "{pset}"} if "pset" in exp.wildcards else {}), **labels}
            else:
                labels = {"model": "{model}", **({"prompt set": "{pset}"} if "pset" in exp.wildcards else {}), **labels}
            out[key] = report(
                pattern,
                caption=f"../{exp.caption(figure)}",
                category=exp.report_section,
                subcategory=exp.name if exp.report_section != exp.name else None,
                labels=labels,
            )
        else:
            out[key] = pattern
    return out


def experiment_resources(exp):
    if exp.gpu:
        return {"gpu": model_gpus, "mem_mb": GPU_MEM_MB, "runtime": exp.runtime}
    return {"mem_mb": CPU_MEM_MB, "runtime": exp.runtime}

