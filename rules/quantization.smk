# DESIGN.md experiment 11: fake-quantization sensitivity of blocks, matrix types and the whole model,
# and mixed precision at equal average bits. Every variant is a loss evaluation: a GPU job.


rule quantization:
    input:
        model=paths.MODEL_DIR,
        resid=paths.RESID,
        tokens=paths.TOKENS,
    output:
        summary=paths.experiment_file("quantization", "summary.json"),
        metrics=paths.experiment_file("quantization", "metrics.parquet"),
        layers=report(
            paths.experiment_file("quantization", f"layers.{FIGURE}"),
            caption="../resources/report/quantization_layers.rst",
            category="quantization",
            labels={"model": "{model}", "prompt set": "{pset}", "figure": "per-block sensitivity"},
        ),
        matrices=report(
            paths.experiment_file("quantization", f"matrices.{FIGURE}"),
            caption="../resources/report/quantization_matrices.rst",
            category="quantization",
            labels={"model": "{model}", "prompt set": "{pset}", "figure": "per-matrix-type sensitivity"},
        ),
        mixed=report(
            paths.experiment_file("quantization", f"mixed.{FIGURE}"),
            caption="../resources/report/quantization_mixed.rst",
            category="quantization",
            labels={"model": "{model}", "prompt set": "{pset}", "figure": "mixed precision"},
        ),
    params:
        quant=experiment_params("quantization"),
    log:
        paths.log("quantization", "{model}", "{pset}"),
    benchmark:
        paths.benchmark("quantization", "{model}", "{pset}")
    threads: 4
    resources:
        gpu=1,
        mem_mb=GPU_MEM_MB,
        runtime=240,
    conda:
        "../envs/gpu.yaml"
    script:
        "../workflow_scripts/quantization.py"
