"""cross_model_cka: linear CKA between every layer of two models on a shared prompt set."""

from layerscope.experiments.cross_model.cross_model import run_cross_model_cka
from layerscope.jobs.runtime import job

with job(snakemake, seed=snakemake.params.cross["seed"]):
    run_cross_model_cka(
        snakemake.input.resid_a,
        snakemake.input.resid_b,
        snakemake.output,
        params=snakemake.params.cross,
        model_a=snakemake.wildcards.model_a,
        model_b=snakemake.wildcards.model_b,
        prompt_set=snakemake.wildcards.pset,
    )
