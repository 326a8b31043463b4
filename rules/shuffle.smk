# DESIGN.md experiment 4: shuffle all blocks and recover their order (runs model blocks: gpu=1).


rule shuffle:
    input:
        model=paths.MODEL_DIR,
        resid=paths.RESID,
        tokens=paths.TOKENS,
    output:
        summary=paths.experiment_file("shuffle", "summary.json"),
        metrics=paths.experiment_file("shuffle", "metrics.parquet"),
        orders=paths.experiment_file("shuffle", "orders.parquet"),
        methods_plot=report(
            paths.experiment_file("shuffle", f"methods.{FIGURE}"),
            caption="../resources/report/shuffle_methods.rst",
            category="shuffle",
            labels={"model": "{model}", "prompt set": "{pset}", "figure": "recovery methods compared"},
        ),
        orders_plot=report(
            paths.experiment_file("shuffle", f"orders.{FIGURE}"),
            caption="../resources/report/shuffle_orders.rst",
            category="shuffle",
            labels={"model": "{model}", "prompt set": "{pset}", "figure": "recovered orders"},
        ),
    params:
        shuffle=experiment_params("shuffle"),
    log:
        paths.log("shuffle", "{model}", "{pset}"),
    benchmark:
        paths.benchmark("shuffle", "{model}", "{pset}")
    threads: 2
    resources:
        gpu=1,
        mem_mb=GPU_MEM_MB,
        runtime=180,
    conda:
        "../envs/gpu.yaml"
    script:
        "../workflow_scripts/shuffle.py"
