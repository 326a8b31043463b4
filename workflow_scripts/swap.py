"""swap: layer surgery through the loss evaluator (a GPU job: it runs model blocks)."""

from layerscope.jobs.pipeline import run_swap
from layerscope.jobs.runtime import job

with job(snakemake, gpu=True, seed=snakemake.params.swap["seed"]) as ctx:
    run_swap(
        snakemake.input.model,
        snakemake.input.resid,
        snakemake.output,
        params=snakemake.params.swap,
        model=snakemake.wildcards.model,
        prompt_set=snakemake.wildcards.pset,
        device=ctx.device,
    )
