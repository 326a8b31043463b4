"""weight_spectra: singular-value spectra of every weight matrix (weights only)."""

from layerscope.jobs.runtime import job
from layerscope.experiments.weights.weight_spectra import run_weight_spectra

with job(snakemake, seed=snakemake.params.spectra["seed"]):
    run_weight_spectra(
        snakemake.input.model,
        snakemake.output,
        params=snakemake.params.spectra,
        model=snakemake.wildcards.model,
    )
