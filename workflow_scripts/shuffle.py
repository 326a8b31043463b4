"""shuffle: layer surgery through the loss evaluator (a GPU job: it runs model blocks)."""

from layerscope.jobs.pipeline import run_shuffle
from layerscope.jobs.runtime import job

with job(snakemake, gpu=True, seed=snakemake.params.shuffle["seed"]) as ctx:
    run_shuffle(
        snakemake.input.model,
        snakemake.input.resid,
        snakemake.output,
        params=snakemake.params.shuffle,
        model=snakemake.wildcards.model,
        prompt_set=snakemake.wildcards.pset,
        device=ctx.device,
    )
