"""sensitivity_vs_linearity: Spearman ρ between per-block quantization sensitivity and linearization gap."""

from layerscope.runtime import job
from layerscope.sensitivity_vs_linearity import run_sensitivity_vs_linearity

with job(snakemake):
    run_sensitivity_vs_linearity(
        snakemake.input.linearization,
        snakemake.input.quantization,
        snakemake.output,
        model=snakemake.wildcards.model,
        prompt_set=snakemake.wildcards.pset,
    )
