# layerscope: experiments on transformer internals, with a cached activation store.
#
#   snakemake --cores all --resources gpu=2      # one machine (GPUs leased per job)
#   snakemake --profile profiles/slurm           # a SLURM cluster
#
# The run is described by config.yaml (validated against resources/config.schema.json).

from snakemake.utils import min_version

min_version("9.0")


# `--configfile my.yaml` replaces the default config instead of being merged into it
# (a merge would keep the default's models and prompt sets).
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"



include: "rules/common.smk"
include: "rules/models.smk"
include: "rules/completions.smk"
include: "rules/activations.smk"
include: "rules/experiments.smk"
include: "rules/report.smk"
include: "rules/plan.smk"


rule all:
    input:
        all_targets(),
    default_target: True
