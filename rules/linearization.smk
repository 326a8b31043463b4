# DESIGN.md experiment 10: how nonlinear each block (and its attention / MLP sub-layer) is, on cached inputs.
# Runs model forwards and jvp/vjp passes through single blocks: a GPU job.


rule linearization:
    input:
        model=paths.MODEL_DIR,
        resid=paths.RESID,
        tokens=paths.TOKENS,
    output:
        summary=paths.experiment_file("linearization", "summary.json"),
        metrics=paths.experiment_file("linearization", "metrics.parquet"),
        per_sample=paths.experiment_file("linearization", "per_sample.parquet"),
        per_token=paths.experiment_file("linearization", "per_token.parquet"),
        gap=report(
            paths.experiment_file("linearization", f"gap.{FIGURE}"),
            caption="../resources/report/linearization_gap.rst",
            category="linearization",
            labels={"model": "{model}", "prompt set": "{pset}", "figure": "gap by layer"},
        ),
        order=report(
            paths.experiment_file("linearization", f"order.{FIGURE}"),
            caption="../resources/report/linearization_order.rst",
            category="linearization",
            labels={"model": "{model}", "prompt set": "{pset}", "figure": "order by layer"},
        ),
        jacobian=report(
            paths.experiment_file("linearization", f"jacobian.{FIGURE}"),
            caption="../resources/report/linearization_jacobian.rst",
            category="linearization",
            labels={"model": "{model}", "prompt set": "{pset}", "figure": "magnitude and spectral norm"},
        ),
    params:
        lin=experiment_params("linearization"),
    log:
        paths.log("linearization", "{model}", "{pset}"),
    benchmark:
        paths.benchmark("linearization", "{model}", "{pset}")
    threads: 4
    resources:
        gpu=1,
        mem_mb=GPU_MEM_MB,
        runtime=120,
    conda:
        "../envs/gpu.yaml"
    script:
        "../workflow_scripts/linearization.py"
