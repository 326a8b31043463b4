# DESIGN.md experiment 9: weight topology (weights only: no prompts, no activations).


rule weight_topology:
    input:
        model=paths.MODEL_DIR,
    output:
        summary=paths.experiment_file("weight_topology", "summary.json", weights_only=True),
        metrics=paths.experiment_file("weight_topology", "metrics.parquet", weights_only=True),
        sparsity=paths.experiment_file("weight_topology", "sparsity.parquet", weights_only=True),
        qk=paths.experiment_file("weight_topology", "qk_circuits.parquet", weights_only=True),
        qk_spectra=paths.experiment_file("weight_topology", "qk_spectra.parquet", weights_only=True),
        neurons=paths.experiment_file("weight_topology", "mlp_neurons.parquet", weights_only=True),
        cross_layer=paths.experiment_file("weight_topology", "cross_layer.parquet", weights_only=True),
        norm_scales=paths.experiment_file("weight_topology", "norm_scales.parquet", weights_only=True),
        position=paths.experiment_file("weight_topology", "position.parquet", weights_only=True),
        qk_figure=report(
            paths.experiment_file("weight_topology", f"qk_circuits.{FIGURE}", weights_only=True),
            caption="../resources/report/weight_topology_qk_circuits.rst",
            category="weight_topology",
            labels={"model": "{model}", "figure": "QK circuit spectra and symmetry"},
        ),
        cross_layer_figure=report(
            paths.experiment_file("weight_topology", f"cross_layer.{FIGURE}", weights_only=True),
            caption="../resources/report/weight_topology_cross_layer.rst",
            category="weight_topology",
            labels={"model": "{model}", "figure": "cross-layer correlation"},
        ),
        norm_scales_figure=report(
            paths.experiment_file("weight_topology", f"norm_scales.{FIGURE}", weights_only=True),
            caption="../resources/report/weight_topology_norm_scales.rst",
            category="weight_topology",
            labels={"model": "{model}", "figure": "norm scales across depth"},
        ),
        position_figure=report(
            paths.experiment_file("weight_topology", f"position.{FIGURE}", weights_only=True),
            caption="../resources/report/weight_topology_position.rst",
            category="weight_topology",
            labels={"model": "{model}", "figure": "position embeddings"},
        ),
    params:
        topology=experiment_params("weight_topology"),
    log:
        paths.log("weight_topology", "{model}"),
    benchmark:
        paths.benchmark("weight_topology", "{model}")
    threads: 2
    resources:
        mem_mb=CPU_MEM_MB,
        runtime=60,
    conda:
        "../envs/cpu.yaml"
    script:
        "../workflow_scripts/weight_topology.py"
