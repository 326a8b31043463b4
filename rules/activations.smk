# The activation cache: resid.0 ... resid.L for every token, and the token table.


rule extract_activations:
    input:
        unpack(activation_inputs),
    output:
        resid=paths.RESID,
        tokens=paths.TOKENS,
    params:
        act=activation_params,
    log:
        paths.log("extract_activations", "{model}", "{pset}"),
    benchmark:
        paths.benchmark("extract_activations", "{model}", "{pset}")
    threads: 4
    resources:
        gpu=model_gpus,
        mem_mb=GPU_MEM_MB,
        runtime=120,
    conda:
        "../envs/gpu.yaml"
    script:
        "../workflow_scripts/extract_activations.py"
