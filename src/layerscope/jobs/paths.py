"""Every file name the workflow reads or writes, in one place.

Rules, target lists, reports and tests all build paths from these patterns, so a file has
one name everywhere. ``{model}`` and ``{pset}`` are config slugs (never a hub id).
"""

from __future__ import annotations

RESULTS = "results"
MODELS_DIR = "resources/models"

MODEL_DIR = MODELS_DIR + "/{model}"
MODEL_MANIFEST = "layerscope.json"  # inside MODEL_DIR

RUN_DIR = RESULTS + "/{model}/{pset}"
COMPLETIONS = RUN_DIR + "/completions.parquet"
ACTIVATIONS_DIR = RUN_DIR + "/activations"
RESID = ACTIVATIONS_DIR + "/resid.safetensors"
TOKENS = ACTIVATIONS_DIR + "/tokens.parquet"

# an experiment that reads prompts writes here ...
EXPERIMENT_DIR = RUN_DIR + "/{experiment}"
# ... a weights-only experiment here
WEIGHTS_EXPERIMENT_DIR = RESULTS + "/{model}/{experiment}"
METRICS = "metrics.parquet"
SUMMARY = "summary.json"

CROSS_MODEL_DIR = RESULTS + "/cross_model/{experiment}"
# the cross_model experiment's analyses of a model pair: CKA per prompt set, Procrustes per pair
CROSS_MODEL_ANALYSES = {"cka": "prompts", "procrustes": "weights"}
# names a model slug may not take (they are folders of results/ itself)
RESERVED_MODEL_SLUGS = ("cross_model", "report", "logs", "benchmarks")
REPORT_DIR = RESULTS + "/report"
MODEL_REPORT_MD = REPORT_DIR + "/{model}.md"
MODEL_REPORT_HTML = REPORT_DIR + "/{model}.html"
CROSS_MODEL_REPORT_MD = REPORT_DIR + "/cross_model.md"
CROSS_MODEL_TABLE = REPORT_DIR + "/cross_model.parquet"
REPORT_INDEX = REPORT_DIR + "/index.html"

LOGS = RESULTS + "/logs"
BENCHMARKS = RESULTS + "/benchmarks"


def experiment_file(experiment: str, name: str, *, weights_only: bool = False) -> str:
    """Pattern of one output file of an experiment (wildcards {model} and, unless weights-only, {pset})."""
    base = WEIGHTS_EXPERIMENT_DIR if weights_only else EXPERIMENT_DIR
    return base.replace("{experiment}", experiment) + "/" + name


def cross_model_file(analysis: str, name: str) -> str:
    """Pattern of one output of a pairwise analysis (wildcards {model_a}, {model_b}, and {pset} for CKA)."""
    base = CROSS_MODEL_DIR.replace("{experiment}", analysis)
    if CROSS_MODEL_ANALYSES[analysis] == "prompts":
        base += "/{pset}"
    return base + "/{model_a}/{model_b}/" + name


def log(rule: str, *wildcards: str) -> str:
    """Log file pattern of a rule, e.g. log('logit_lens', '{model}', '{pset}')."""
    stem = "_".join(wildcards) if wildcards else "all"
    return f"{LOGS}/{rule}/{stem}.log"


def benchmark(rule: str, *wildcards: str) -> str:
    stem = "_".join(wildcards) if wildcards else "all"
    return f"{BENCHMARKS}/{rule}/{stem}.tsv"
