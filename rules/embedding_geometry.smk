# DESIGN.md experiment 7: geometry of the embedding matrices, from the weights (CPU).


rule embedding_geometry:
    input:
        model=paths.MODEL_DIR,
        categories=experiment_input("embedding_geometry", "categories"),
    output:
        summary=paths.experiment_file("embedding_geometry", "summary.json", weights_only=True),
        metrics=paths.experiment_file("embedding_geometry", "metrics.parquet", weights_only=True),
        words=paths.experiment_file("embedding_geometry", "words.parquet", weights_only=True),
        eigenspectrum=paths.experiment_file("embedding_geometry", "eigenspectrum.parquet", weights_only=True),
        overview=report(
            paths.experiment_file("embedding_geometry", f"overview.{FIGURE}", weights_only=True),
            caption="../resources/report/embedding_geometry_overview.rst",
            category="embedding_geometry",
            labels={"model": "{model}", "figure": "overview"},
        ),
        categories=report(
            paths.experiment_file("embedding_geometry", f"categories.{FIGURE}", weights_only=True),
            caption="../resources/report/embedding_geometry_categories.rst",
            category="embedding_geometry",
            labels={"model": "{model}", "figure": "semantic categories"},
        ),
    params:
        embedding=experiment_params("embedding_geometry"),
    log:
        paths.log("embedding_geometry", "{model}"),
    benchmark:
        paths.benchmark("embedding_geometry", "{model}")
    threads: 1
    resources:
        mem_mb=CPU_MEM_MB,
        runtime=60,
    conda:
        "../envs/cpu.yaml"
    script:
        "../workflow_scripts/embedding_geometry.py"
