# DESIGN.md experiment 12: contrastive completion trajectories (force-decodes its shipped groups: GPU rule).


rule contrastive:
    input:
        model=paths.MODEL_DIR,
        groups=experiment_input("contrastive", "groups"),
    output:
        summary=paths.experiment_file("contrastive", "summary.json", weights_only=True),
        metrics=paths.experiment_file("contrastive", "metrics.parquet", weights_only=True),
        per_group=paths.experiment_file("contrastive", "per_group.parquet", weights_only=True),
        cosine=report(
            paths.experiment_file("contrastive", f"cosine.{FIGURE}", weights_only=True),
            caption="../resources/report/contrastive_cosine.rst",
            category="contrastive",
            labels={"model": "{model}", "figure": "trajectory cosine"},
        ),
        kl=report(
            paths.experiment_file("contrastive", f"kl.{FIGURE}", weights_only=True),
            caption="../resources/report/contrastive_kl.rst",
            category="contrastive",
            labels={"model": "{model}", "figure": "lens KL"},
        ),
        crossover=report(
            paths.experiment_file("contrastive", f"crossover.{FIGURE}", weights_only=True),
            caption="../resources/report/contrastive_crossover.rst",
            category="contrastive",
            labels={"model": "{model}", "figure": "crossover"},
        ),
        relations=report(
            paths.experiment_file("contrastive", f"relations.{FIGURE}", weights_only=True),
            caption="../resources/report/contrastive_relations.rst",
            category="contrastive",
            labels={"model": "{model}", "figure": "per relation"},
        ),
    params:
        contrastive=experiment_params("contrastive"),
        render=rendering_params,
    log:
        paths.log("contrastive", "{model}"),
    benchmark:
        paths.benchmark("contrastive", "{model}")
    threads: 2
    resources:
        gpu=1,
        mem_mb=GPU_MEM_MB,
        runtime=60,
    conda:
        "../envs/gpu.yaml"
    script:
        "../workflow_scripts/contrastive.py"
