# Greedy completions of a prompt set (decoders), stored as token ids.


rule generate_completions:
    input:
        model=paths.MODEL_DIR,
        prompts=prompt_file,
    output:
        completions=paths.COMPLETIONS,
    params:
        gen=generation_params,
    log:
        paths.log("generate_completions", "{model}", "{pset}"),
    benchmark:
        paths.benchmark("generate_completions", "{model}", "{pset}")
    threads: 4
    resources:
        gpu=model_gpus,
        mem_mb=GPU_MEM_MB,
        runtime=120,
    conda:
        "../envs/gpu.yaml"
    script:
        "../workflow_scripts/generate_completions.py"
