"""residual_geometry: per-layer geometry of the cached residual stream."""

from layerscope.experiments.geometry.residual_geometry import run_residual_geometry
from layerscope.jobs.runtime import job

with job(snakemake, seed=snakemake.params.geometry["seed"]):
    run_residual_geometry(
        snakemake.input.resid,
        snakemake.output,
        params=snakemake.params.geometry,
        model=snakemake.wildcards.model,
        prompt_set=snakemake.wildcards.pset,
    )
