# layerscope: experiments on transformer internals, with a cached activation store.
#
#   snakemake --cores all --resources gpu=2      # one machine (GPUs leased per job)
#   snakemake --profile profiles/slurm           # a SLURM cluster
#
# The run is described by config.yaml (validated against resources/config.schema.json).

from pathlib import Path

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


# experiments not yet declared in the registry keep their own rule files
for _legacy in ["rules/logit_lens.smk", "rules/linearization.smk", "rules/quantization.smk", "rules/sensitivity_vs_linearity.smk", "rules/residual_geometry.smk", "rules/delta_svd.smk", "rules/embedding_geometry.smk", "rules/contrastive.smk", "rules/weight_spectra.smk", "rules/weight_topology.smk", "rules/cross_model.smk", "rules/knockout.smk", "rules/swap.smk", "rules/shuffle.smk", "rules/z_subspace.smk"]:
    if Path(workflow.basedir, _legacy).exists():

        include: _legacy


include: "rules/report.smk"


rule all:
    input:
        all_targets(),
    default_target: True
