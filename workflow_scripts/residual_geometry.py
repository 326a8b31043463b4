"""residual_geometry: per-layer geometry of the cached residual stream."""

from layerscope.residual_geometry import run_residual_geometry
from layerscope.runtime import job

with job(snakemake, seed=snakemake.params.geometry["seed"]):
    run_residual_geometry(
        snakemake.input.resid,
        snakemake.output,
        params=snakemake.params.geometry,
        model=snakemake.wildcards.model,
        prompt_set=snakemake.wildcards.pset,
    )
