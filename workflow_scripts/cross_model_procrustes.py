"""cross_model_procrustes: orthogonal Procrustes alignment of two models' input embeddings."""

from layerscope.experiments.cross_model.cross_model import run_cross_model_procrustes
from layerscope.jobs.runtime import job

with job(snakemake, seed=snakemake.params.cross["seed"]):
    run_cross_model_procrustes(
        snakemake.input.model_a,
        snakemake.input.model_b,
        snakemake.output,
        params=snakemake.params.cross,
        model_a=snakemake.wildcards.model_a,
        model_b=snakemake.wildcards.model_b,
        seed=snakemake.params.cross["seed"],
    )
