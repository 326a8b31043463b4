"""report_index: the entry page of results/report/."""

from layerscope.report import report_index
from layerscope.runtime import job

with job(snakemake):
    report_index(list(snakemake.params.models), snakemake.output.html, snakemake.input.cross)
