"""update_decomposition: every block's pooled update split into its Z and Z⊥ parts."""

from layerscope.experiments.z_subspace.update_decomposition import run_update_decomposition
from layerscope.jobs.runtime import job

with job(snakemake, seed=snakemake.params.z["seed"]):
    run_update_decomposition(
        snakemake.input.mask,
        snakemake.input.resid,
        snakemake.input.prompts,
        snakemake.output,
        params=snakemake.params.z,
        model=snakemake.wildcards.model,
        prompt_set=snakemake.wildcards.pset,
    )
