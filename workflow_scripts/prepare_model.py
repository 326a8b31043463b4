"""prepare_model: fetch/convert one model into resources/models/{model}/."""

from layerscope.model.prepare import prepare_model
from layerscope.jobs.runtime import job

with job(snakemake):
    spec = snakemake.params.spec
    prepare_model(
        spec["source"],
        snakemake.output.model,
        kind=spec["kind"],
        trust_remote_code=spec["trust_remote_code"],
        allow_pickle=spec["allow_pickle"],
    )
