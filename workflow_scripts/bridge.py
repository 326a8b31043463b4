"""bridge: ridge regression from English to Chinese coordinates in Z, with leave-one-out R²."""

from layerscope.experiments.z_subspace.bridge import run_bridge
from layerscope.jobs.runtime import job

with job(snakemake, seed=snakemake.params.z["seed"]):
    run_bridge(
        snakemake.input.mask,
        snakemake.input.resid,
        snakemake.input.prompts,
        snakemake.output,
        params=snakemake.params.z,
        model=snakemake.wildcards.model,
        prompt_set=snakemake.wildcards.pset,
    )
