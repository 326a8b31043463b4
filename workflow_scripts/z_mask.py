"""z_mask: the QK-circuit subspace Z of each configured layer and k, from the weights."""

from layerscope.jobs.runtime import job
from layerscope.experiments.z_subspace.z_mask import run_z_mask

with job(snakemake, seed=snakemake.params.z["seed"]):
    run_z_mask(snakemake.input.model, snakemake.output, params=snakemake.params.z, model=snakemake.wildcards.model)
