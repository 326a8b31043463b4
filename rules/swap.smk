# DESIGN.md experiment 3: swap cost of every pair of blocks, zones (runs model blocks: gpu=1).


rule swap:
    input:
        model=paths.MODEL_DIR,
        resid=paths.RESID,
        tokens=paths.TOKENS,
    output:
        summary=paths.experiment_file("swap", "summary.json"),
        metrics=paths.experiment_file("swap", "metrics.parquet"),
        pairs=paths.experiment_file("swap", "pairs.parquet"),
        cost_matrix_plot=report(
            paths.experiment_file("swap", f"cost_matrix.{FIGURE}"),
            caption="../resources/report/swap_cost_matrix.rst",
            category="swap",
            labels={"model": "{model}", "prompt set": "{pset}", "figure": "swap cost matrix and zones"},
        ),
        sensitivity_plot=report(
            paths.experiment_file("swap", f"sensitivity.{FIGURE}"),
            caption="../resources/report/swap_sensitivity.rst",
            category="swap",
            labels={"model": "{model}", "prompt set": "{pset}", "figure": "position sensitivity"},
        ),
    params:
        swap=experiment_params("swap"),
    log:
        paths.log("swap", "{model}", "{pset}"),
    benchmark:
        paths.benchmark("swap", "{model}", "{pset}")
    threads: 2
    resources:
        gpu=1,
        mem_mb=GPU_MEM_MB,
        runtime=240,
    conda:
        "../envs/gpu.yaml"
    script:
        "../workflow_scripts/swap.py"
