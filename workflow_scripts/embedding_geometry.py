"""embedding_geometry: geometry of a model's embedding (and untied unembedding) matrix."""

from layerscope.experiments.geometry.embedding_geometry import run_embedding_geometry
from layerscope.jobs.runtime import job

with job(snakemake, seed=snakemake.params.embedding["seed"]):
    run_embedding_geometry(
        snakemake.input.model,
        snakemake.input.categories,
        snakemake.output,
        params=snakemake.params.embedding,
        model=snakemake.wildcards.model,
    )
