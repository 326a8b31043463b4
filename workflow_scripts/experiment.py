"""Any registered experiment: the rule's name selects it (see layerscope.experiments.registry)."""

from layerscope.jobs.writer import run_experiment_job

run_experiment_job(snakemake)
