"""report_index: the entry page of results/report/."""

from layerscope.report.pages import report_index
from layerscope.jobs.runtime import job

with job(snakemake):
    report_index(list(snakemake.params.models), snakemake.output.html, snakemake.input.cross)
