"""report_index: results/report/index.html (the dashboard) and provenance.html."""

from pathlib import Path

from layerscope.jobs.paths import MODEL_MANIFEST
from layerscope.report.pages import report_index
from layerscope.jobs.runtime import job

with job(snakemake):
    models = list(snakemake.params.models)
    report_index(
        models,
        list(snakemake.input.summaries),
        {m: Path(d) / MODEL_MANIFEST for m, d in zip(models, snakemake.input.models)},
        snakemake.output.html,
        snakemake.output.provenance,
        config=dict(snakemake.params.config),
        benchmarks_dir=snakemake.params.benchmarks,
    )
