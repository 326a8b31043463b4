"""linearization: linearization gap, order, magnitude and Jacobian norm of every block and sub-layer."""

from layerscope.experiments.nonlinearity.linearization import run_linearization
from layerscope.jobs.runtime import job

with job(snakemake, gpu=True, seed=snakemake.params.lin["seed"]) as ctx:
    run_linearization(
        snakemake.input.model,
        snakemake.input.resid,
        snakemake.output,
        params=snakemake.params.lin,
        model=snakemake.wildcards.model,
        prompt_set=snakemake.wildcards.pset,
        device=ctx.device,
    )
