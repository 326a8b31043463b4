# Model preparation: any configured source -> a safetensors Hugging Face folder.


rule prepare_model:
    output:
        model=directory(paths.MODEL_DIR),
    params:
        spec=prepare_params,
    log:
        paths.log("prepare_model", "{model}"),
    benchmark:
        paths.benchmark("prepare_model", "{model}")
    threads: 2
    resources:
        mem_mb=CPU_MEM_MB,
        runtime=60,
    conda:
        "../envs/cpu.yaml"
    script:
        "../workflow_scripts/prepare_model.py"
