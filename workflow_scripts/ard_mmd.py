"""ard_mmd: ARD-RBF lengthscales that separate each pair's zh and en token clouds (GPU when leased)."""

from layerscope.experiments.z_subspace.ard_mmd import run_ard_mmd
from layerscope.jobs.runtime import job

with job(snakemake, gpu=True, seed=snakemake.params.z["seed"]) as ctx:
    run_ard_mmd(
        snakemake.input.mask,
        snakemake.input.resid,
        snakemake.input.prompts,
        snakemake.output,
        params=snakemake.params.z,
        model=snakemake.wildcards.model,
        prompt_set=snakemake.wildcards.pset,
        device=ctx.device,
    )
