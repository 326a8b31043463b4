"""weight_topology: sparsity, QK circuits, MLP neurons, cross-layer correlation, norm scales, positions."""

from layerscope.jobs.runtime import job
from layerscope.experiments.weights.weight_topology import run_weight_topology

with job(snakemake, seed=snakemake.params.topology["seed"]):
    run_weight_topology(
        snakemake.input.model,
        snakemake.output,
        params=snakemake.params.topology,
        model=snakemake.wildcards.model,
    )
