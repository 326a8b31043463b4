# DESIGN.md experiment 6: the SVD of each block's residual update, from the activation cache (CPU).


rule delta_svd:
    input:
        resid=paths.RESID,
        tokens=paths.TOKENS,
    output:
        summary=paths.experiment_file("delta_svd", "summary.json"),
        metrics=paths.experiment_file("delta_svd", "metrics.parquet"),
        pairs=paths.experiment_file("delta_svd", "pairs.parquet"),
        curves=report(
            paths.experiment_file("delta_svd", f"curves.{FIGURE}"),
            caption="../resources/report/delta_svd_curves.rst",
            category="delta_svd",
            labels={"model": "{model}", "prompt set": "{pset}", "figure": "per-block updates"},
        ),
        directions=report(
            paths.experiment_file("delta_svd", f"directions.{FIGURE}"),
            caption="../resources/report/delta_svd_directions.rst",
            category="delta_svd",
            labels={"model": "{model}", "prompt set": "{pset}", "figure": "update directions"},
        ),
    params:
        delta=experiment_params("delta_svd"),
    log:
        paths.log("delta_svd", "{model}", "{pset}"),
    benchmark:
        paths.benchmark("delta_svd", "{model}", "{pset}")
    threads: 1
    resources:
        mem_mb=CPU_MEM_MB,
        runtime=60,
    conda:
        "../envs/cpu.yaml"
    script:
        "../workflow_scripts/delta_svd.py"
