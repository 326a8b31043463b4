# DESIGN.md experiment 14: every pair of models side by side.
# CKA between all layers on a shared prompt set (from both activation caches), and
# Procrustes alignment of the input embeddings (pairs sharing a tokenizer; other pairs get
# a summary that says why it does not apply).


rule cross_model_cka:
    input:
        unpack(cka_inputs),
    output:
        summary=paths.cross_model_file("cka", "summary.json"),
        cka=paths.cross_model_file("cka", "cka.parquet"),
        heatmap=report(
            paths.cross_model_file("cka", f"cka.{FIGURE}"),
            caption="../resources/report/cross_model_cka.rst",
            category="cross_model",
            labels={"models": "{model_a} vs {model_b}", "prompt set": "{pset}", "figure": "CKA heatmap"},
        ),
    params:
        cross=experiment_params("cross_model"),
    log:
        paths.log("cross_model_cka", "{model_a}", "{model_b}", "{pset}"),
    benchmark:
        paths.benchmark("cross_model_cka", "{model_a}", "{model_b}", "{pset}")
    threads: 1
    resources:
        mem_mb=CPU_MEM_MB,
        runtime=30,
    conda:
        "../envs/cpu.yaml"
    script:
        "../workflow_scripts/cross_model_cka.py"


rule cross_model_procrustes:
    input:
        unpack(procrustes_inputs),
    output:
        summary=paths.cross_model_file("procrustes", "summary.json"),
        metrics=paths.cross_model_file("procrustes", "metrics.parquet"),
    params:
        cross=experiment_params("cross_model"),
    log:
        paths.log("cross_model_procrustes", "{model_a}", "{model_b}"),
    benchmark:
        paths.benchmark("cross_model_procrustes", "{model_a}", "{model_b}")
    threads: 2
    resources:
        mem_mb=CPU_MEM_MB,
        runtime=30,
    conda:
        "../envs/cpu.yaml"
    script:
        "../workflow_scripts/cross_model_procrustes.py"
