# DESIGN.md experiment 2: block knockout, pairwise synergy and causal tracing (runs model blocks: gpu=1).


rule knockout:
    input:
        model=paths.MODEL_DIR,
        resid=paths.RESID,
        tokens=paths.TOKENS,
    output:
        summary=paths.experiment_file("knockout", "summary.json"),
        metrics=paths.experiment_file("knockout", "metrics.parquet"),
        pairs=paths.experiment_file("knockout", "pairs.parquet"),
        tracing=paths.experiment_file("knockout", "tracing.parquet"),
        ratio_plot=report(
            paths.experiment_file("knockout", f"ratio.{FIGURE}"),
            caption="../resources/report/knockout_ratio.rst",
            category="knockout",
            labels={"model": "{model}", "prompt set": "{pset}", "figure": "loss ratio per skipped block"},
        ),
        synergy_plot=report(
            paths.experiment_file("knockout", f"synergy.{FIGURE}"),
            caption="../resources/report/knockout_synergy.rst",
            category="knockout",
            labels={"model": "{model}", "prompt set": "{pset}", "figure": "pairwise synergy"},
        ),
        tracing_plot=report(
            paths.experiment_file("knockout", f"tracing.{FIGURE}"),
            caption="../resources/report/knockout_tracing.rst",
            category="knockout",
            labels={"model": "{model}", "prompt set": "{pset}", "figure": "causal tracing"},
        ),
    params:
        knockout=experiment_params("knockout"),
    log:
        paths.log("knockout", "{model}", "{pset}"),
    benchmark:
        paths.benchmark("knockout", "{model}", "{pset}")
    threads: 2
    resources:
        gpu=1,
        mem_mb=GPU_MEM_MB,
        runtime=120,
    conda:
        "../envs/gpu.yaml"
    script:
        "../workflow_scripts/knockout.py"
