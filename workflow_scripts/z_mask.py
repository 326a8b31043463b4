"""z_mask: the QK-circuit subspace Z of each configured layer and k, from the weights."""

from layerscope.runtime import job
from layerscope.z_mask import run_z_mask

with job(snakemake, seed=snakemake.params.z["seed"]):
    run_z_mask(snakemake.input.model, snakemake.output, params=snakemake.params.z, model=snakemake.wildcards.model)
