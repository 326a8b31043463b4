# DESIGN.md experiment 8: spectra of every weight matrix (weights only: no prompts, no activations).


rule weight_spectra:
    input:
        model=paths.MODEL_DIR,
    output:
        summary=paths.experiment_file("weight_spectra", "summary.json", weights_only=True),
        metrics=paths.experiment_file("weight_spectra", "metrics.parquet", weights_only=True),
        singular_values=paths.experiment_file(
            "weight_spectra", "singular_values.parquet", weights_only=True
        ),
        jumps=paths.experiment_file("weight_spectra", "jumps.parquet", weights_only=True),
        rank_ratio=report(
            paths.experiment_file("weight_spectra", f"rank_ratio.{FIGURE}", weights_only=True),
            caption="../resources/report/weight_spectra_rank_ratio.rst",
            category="weight_spectra",
            labels={"model": "{model}", "figure": "effective rank ratio by layer"},
        ),
        spectra=report(
            paths.experiment_file("weight_spectra", f"singular_values.{FIGURE}", weights_only=True),
            caption="../resources/report/weight_spectra_singular_values.rst",
            category="weight_spectra",
            labels={"model": "{model}", "figure": "singular value spectra"},
        ),
    params:
        spectra=experiment_params("weight_spectra"),
    log:
        paths.log("weight_spectra", "{model}"),
    benchmark:
        paths.benchmark("weight_spectra", "{model}")
    threads: 2
    resources:
        mem_mb=CPU_MEM_MB,
        runtime=60,
    conda:
        "../envs/cpu.yaml"
    script:
        "../workflow_scripts/weight_spectra.py"
