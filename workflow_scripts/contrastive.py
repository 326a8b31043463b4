"""contrastive: trajectories of force-decoded contrastive completions."""

import os

# idle OpenMP threads sleep instead of spinning (must be set before torch loads): a job with 2
# threads on a busy CPU is otherwise several times slower (README, "Contrastive")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from layerscope.contrastive import run_contrastive  # noqa: E402
from layerscope.runtime import job  # noqa: E402

with job(snakemake, gpu=True, seed=snakemake.params.contrastive["seed"]) as ctx:
    run_contrastive(
        snakemake.input.model,
        snakemake.input.groups,
        snakemake.output,
        params=snakemake.params.contrastive,
        render=snakemake.params.render,
        device=ctx.device,
        model=snakemake.wildcards.model,
    )
