"""z_separation: zh/en separation and energy fractions in Z, Z⊥ and a random subspace."""

from layerscope.experiments.z_subspace.z_separation import run_z_separation
from layerscope.jobs.runtime import job

with job(snakemake, seed=snakemake.params.z["seed"]):
    run_z_separation(
        snakemake.input.mask,
        snakemake.input.resid,
        snakemake.input.prompts,
        snakemake.output,
        params=snakemake.params.z,
        model=snakemake.wildcards.model,
        prompt_set=snakemake.wildcards.pset,
    )
