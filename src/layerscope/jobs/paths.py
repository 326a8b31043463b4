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
# names a model slug may not take (they are folders of results/ itself)
RESERVED_MODEL_SLUGS = ("cross_model", "report", "logs", "benchmarks")
REPORT_DIR = RESULTS + "/report"
MODEL_REPORT_MD = REPORT_DIR + "/{model}.md"
MODEL_REPORT_HTML = REPORT_DIR + "/{model}.html"
CROSS_MODEL_REPORT_MD = REPORT_DIR + "/cross_model.md"
CROSS_MODEL_TABLE = REPORT_DIR + "/cross_model.parquet"
REPORT_INDEX = REPORT_DIR + "/index.html"
REPORT_PROVENANCE = REPORT_DIR + "/provenance.html"

LOGS = RESULTS + "/logs"
BENCHMARKS = RESULTS + "/benchmarks"


def log(rule: str, *wildcards: str) -> str:
    """Log file pattern of a rule, e.g. log('logit_lens', '{model}', '{pset}')."""
    stem = "_".join(wildcards) if wildcards else "all"
    return f"{LOGS}/{rule}/{stem}.log"


def benchmark(rule: str, *wildcards: str) -> str:
    stem = "_".join(wildcards) if wildcards else "all"
    return f"{BENCHMARKS}/{rule}/{stem}.tsv"
