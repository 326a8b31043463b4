"""logit_lens: per-layer read-outs of the cached residual stream."""

from layerscope.jobs.pipeline import run_logit_lens
from layerscope.jobs.runtime import job

with job(snakemake, seed=snakemake.params.lens["seed"]):
    run_logit_lens(
        snakemake.input.model,
        snakemake.input.resid,
        snakemake.output,
        params=snakemake.params.lens,
        model=snakemake.wildcards.model,
        prompt_set=snakemake.wildcards.pset,
    )
