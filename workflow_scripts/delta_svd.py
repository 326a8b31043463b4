"""delta_svd: the SVD of every block's update of the cached residual stream."""

from layerscope.experiments.geometry.delta_svd import run_delta_svd
from layerscope.jobs.runtime import job

with job(snakemake, seed=snakemake.params.delta["seed"]):
    run_delta_svd(
        snakemake.input.resid,
        snakemake.output,
        params=snakemake.params.delta,
        model=snakemake.wildcards.model,
        prompt_set=snakemake.wildcards.pset,
    )
