"""cross_model_report: every headline number, models side by side."""

from layerscope.report.pages import cross_model_report
from layerscope.jobs.runtime import job

with job(snakemake):
    cross_model_report(list(snakemake.input.summaries), snakemake.output.md, snakemake.output.table)
