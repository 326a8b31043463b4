"""contrastive: trajectories of force-decoded contrastive completions."""

from layerscope.experiments.geometry.contrastive import run_contrastive
from layerscope.jobs.runtime import job

with job(snakemake, gpu=True, seed=snakemake.params.contrastive["seed"]) as ctx:
    run_contrastive(
        snakemake.input.model,
        snakemake.input.groups,
        snakemake.output,
        params=snakemake.params.contrastive,
        render=snakemake.params.render,
        device=ctx.device,
        model=snakemake.wildcards.model,
    )
