"""quantization: RTN fake-quantization sensitivity sweeps and mixed precision."""

import os

# before torch loads OpenMP: idle threads sleep instead of spinning, which on a CPU shared with
# other jobs keeps many small ops (jvp passes, short sequences) from slowing down several-fold
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from layerscope.quantization import run_quantization
from layerscope.runtime import job

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
