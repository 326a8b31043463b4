# DESIGN.md experiment 1: the logit lens, from the activation cache (CPU, no forward pass).


rule logit_lens:
    input:
        model=paths.MODEL_DIR,
        resid=paths.RESID,
        tokens=paths.TOKENS,
    output:
        summary=paths.experiment_file("logit_lens", "summary.json"),
        metrics=paths.experiment_file("logit_lens", "metrics.parquet"),
        per_token=paths.experiment_file("logit_lens", "per_token.parquet"),
        curves=report(
            paths.experiment_file("logit_lens", f"curves.{FIGURE}"),
            caption="../resources/report/logit_lens_curves.rst",
            category="logit_lens",
            labels={"model": "{model}", "prompt set": "{pset}", "figure": "per-layer curves"},
        ),
        categories=report(
            paths.experiment_file("logit_lens", f"categories.{FIGURE}"),
            caption="../resources/report/logit_lens_categories.rst",
            category="logit_lens",
            labels={"model": "{model}", "prompt set": "{pset}", "figure": "by category"},
        ),
        crystallization=report(
            paths.experiment_file("logit_lens", f"crystallization.{FIGURE}"),
            caption="../resources/report/logit_lens_crystallization.rst",
            category="logit_lens",
            labels={"model": "{model}", "prompt set": "{pset}", "figure": "crystallization"},
        ),
    params:
        lens=experiment_params("logit_lens"),
    log:
        paths.log("logit_lens", "{model}", "{pset}"),
    benchmark:
        paths.benchmark("logit_lens", "{model}", "{pset}")
    threads: 2
    resources:
        mem_mb=CPU_MEM_MB,
        runtime=60,
    conda:
        "../envs/cpu.yaml"
    script:
        "../workflow_scripts/logit_lens.py"
