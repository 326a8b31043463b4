"""sensitivity_vs_linearity: Spearman ρ between per-block quantization sensitivity and linearization gap."""

from layerscope.jobs.runtime import job
from layerscope.experiments.nonlinearity.sensitivity_vs_linearity import run_sensitivity_vs_linearity

with job(snakemake):
    run_sensitivity_vs_linearity(
        snakemake.input.linearization,
        snakemake.input.quantization,
        snakemake.output,
        model=snakemake.wildcards.model,
        prompt_set=snakemake.wildcards.pset,
    )
