# Cross-experiment rule: Spearman correlation of per-block quantization sensitivity with the
# linearization gap, for every model and prompt set where both experiments run (CPU, reads summaries).


rule sensitivity_vs_linearity:
    input:
        linearization=paths.experiment_file("linearization", "summary.json"),
        quantization=paths.experiment_file("quantization", "summary.json"),
    output:
        summary=paths.experiment_file("sensitivity_vs_linearity", "summary.json"),
        metrics=paths.experiment_file("sensitivity_vs_linearity", "metrics.parquet"),
        scatter=report(
            paths.experiment_file("sensitivity_vs_linearity", f"scatter.{FIGURE}"),
            caption="../resources/report/sensitivity_vs_linearity_scatter.rst",
            category="sensitivity_vs_linearity",
            labels={"model": "{model}", "prompt set": "{pset}", "figure": "sensitivity vs gap"},
        ),
    log:
        paths.log("sensitivity_vs_linearity", "{model}", "{pset}"),
    threads: 1
    conda:
        "../envs/cpu.yaml"
    script:
        "../workflow_scripts/sensitivity_vs_linearity.py"
