"""quantization: RTN fake-quantization sensitivity sweeps and mixed precision."""

from layerscope.experiments.nonlinearity.quantization import run_quantization
from layerscope.jobs.runtime import job

with job(snakemake, gpu=True, seed=snakemake.params.quant["seed"]) as ctx:
    run_quantization(
        snakemake.input.model,
        snakemake.input.resid,
        snakemake.output,
        params=snakemake.params.quant,
        model=snakemake.wildcards.model,
        prompt_set=snakemake.wildcards.pset,
        device=ctx.device,
    )
