"""model_report: one model's headline numbers and figures."""

from pathlib import Path

from layerscope.jobs.paths import MODEL_MANIFEST
from layerscope.report.pages import model_report
from layerscope.jobs.runtime import job

with job(snakemake):
    model_report(
        snakemake.wildcards.model,
        list(snakemake.input.summaries),
        Path(snakemake.input.model) / MODEL_MANIFEST,
        snakemake.output.md,
        snakemake.output.html,
    )
