"""generate_completions: greedy completions of one prompt set by one model."""

from layerscope.jobs.pipeline import run_generate
from layerscope.jobs.runtime import job

with job(snakemake, gpu=True, seed=snakemake.params.gen["seed"]) as ctx:
    run_generate(
        snakemake.input.model,
        snakemake.input.prompts,
        snakemake.output.completions,
        params=snakemake.params.gen,
        device=ctx.device,
    )
