"""extract_activations: the residual stream at every block boundary, streamed to disk."""

from layerscope.jobs.pipeline import run_extract
from layerscope.jobs.runtime import job

with job(snakemake, gpu=True) as ctx:
    run_extract(
        snakemake.input.model,
        snakemake.output.resid,
        snakemake.output.tokens,
        params=snakemake.params.act,
        device=ctx.device,
        model=snakemake.wildcards.model,
        prompt_set=snakemake.wildcards.pset,
        completions=snakemake.input.get("completions"),
        prompt_file=snakemake.input.prompts,
    )
