"""knockout: layer surgery through the loss evaluator (a GPU job: it runs model blocks)."""

from layerscope.jobs.pipeline import run_knockout
from layerscope.jobs.runtime import job

with job(snakemake, gpu=True, seed=snakemake.params.knockout["seed"]) as ctx:
    run_knockout(
        snakemake.input.model,
        snakemake.input.resid,
        snakemake.output,
        params=snakemake.params.knockout,
        model=snakemake.wildcards.model,
        prompt_set=snakemake.wildcards.pset,
        device=ctx.device,
    )
