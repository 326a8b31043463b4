# DESIGN.md experiment 5: residual-stream geometry, from the activation cache (CPU, no forward pass).


rule residual_geometry:
    input:
        resid=paths.RESID,
        tokens=paths.TOKENS,
    output:
        summary=paths.experiment_file("residual_geometry", "summary.json"),
        metrics=paths.experiment_file("residual_geometry", "metrics.parquet"),
        massive=paths.experiment_file("residual_geometry", "massive.parquet"),
        curves=report(
            paths.experiment_file("residual_geometry", f"curves.{FIGURE}"),
            caption="../resources/report/residual_geometry_curves.rst",
            category="residual_geometry",
            labels={"model": "{model}", "prompt set": "{pset}", "figure": "per-layer geometry"},
        ),
        massive_figure=report(
            paths.experiment_file("residual_geometry", f"massive.{FIGURE}"),
            caption="../resources/report/residual_geometry_massive.rst",
            category="residual_geometry",
            labels={"model": "{model}", "prompt set": "{pset}", "figure": "massive activations"},
        ),
    params:
        geometry=experiment_params("residual_geometry"),
    log:
        paths.log("residual_geometry", "{model}", "{pset}"),
    benchmark:
        paths.benchmark("residual_geometry", "{model}", "{pset}")
    threads: 1
    resources:
        mem_mb=CPU_MEM_MB,
        runtime=60,
    conda:
        "../envs/cpu.yaml"
    script:
        "../workflow_scripts/residual_geometry.py"
