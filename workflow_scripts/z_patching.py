"""z_patching: en←zh subspace patching of greedy generation at the Z-mask layers."""

from layerscope.jobs.runtime import job
from layerscope.experiments.z_subspace.z_patching import run_z_patching

with job(snakemake, gpu=True, seed=snakemake.params.z["seed"]) as ctx:
    run_z_patching(
        snakemake.input.model,
        snakemake.input.mask,
        snakemake.input.resid,
        snakemake.input.prompts,
        snakemake.output,
        params=snakemake.params.z,
        model=snakemake.wildcards.model,
        prompt_set=snakemake.wildcards.pset,
        device=ctx.device,
        dtype=snakemake.params.dtype,
    )
