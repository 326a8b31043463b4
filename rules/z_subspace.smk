# DESIGN.md experiment 13, the z_subspace suite. The Z-mask is built once per model from the
# weights; every analysis of the paired zh/en prompts reads it and the activation cache
# (never recomputed). Layers and k live in the mask: changing them re-runs z_mask and
# everything that reads it, and nothing upstream.

Z_MASK = paths.experiment_file("z_mask", "z_mask.safetensors", weights_only=True)


rule z_mask:
    input:
        model=paths.MODEL_DIR,
    output:
        mask=Z_MASK,
        summary=paths.experiment_file("z_mask", "summary.json", weights_only=True),
        metrics=paths.experiment_file("z_mask", "metrics.parquet", weights_only=True),
        spectra=report(
            paths.experiment_file("z_mask", f"spectra.{FIGURE}", weights_only=True),
            caption="../resources/report/z_mask_spectra.rst",
            category="z_subspace",
            subcategory="z_mask",
            labels={"model": "{model}", "figure": "QK circuits and Z"},
        ),
    params:
        z=experiment_params("z_mask"),
    log:
        paths.log("z_mask", "{model}"),
    benchmark:
        paths.benchmark("z_mask", "{model}")
    threads: 1
    resources:
        mem_mb=CPU_MEM_MB,
        runtime=30,
    conda:
        "../envs/cpu.yaml"
    script:
        "../workflow_scripts/z_mask.py"


rule z_separation:
    input:
        mask=Z_MASK,
        resid=paths.RESID,
        tokens=paths.TOKENS,
        prompts=prompt_file,
    output:
        summary=paths.experiment_file("z_separation", "summary.json"),
        metrics=paths.experiment_file("z_separation", "metrics.parquet"),
        separation=report(
            paths.experiment_file("z_separation", f"separation.{FIGURE}"),
            caption="../resources/report/z_separation.rst",
            category="z_subspace",
            subcategory="z_separation",
            labels={"model": "{model}", "prompt set": "{pset}", "figure": "separation and energy"},
        ),
    params:
        z=experiment_params("z_separation"),
    log:
        paths.log("z_separation", "{model}", "{pset}"),
    benchmark:
        paths.benchmark("z_separation", "{model}", "{pset}")
    threads: 1
    resources:
        mem_mb=CPU_MEM_MB,
        runtime=30,
    conda:
        "../envs/cpu.yaml"
    script:
        "../workflow_scripts/z_separation.py"


rule update_decomposition:
    input:
        mask=Z_MASK,
        resid=paths.RESID,
        tokens=paths.TOKENS,
        prompts=prompt_file,
    output:
        summary=paths.experiment_file("update_decomposition", "summary.json"),
        metrics=paths.experiment_file("update_decomposition", "metrics.parquet"),
        ratios=report(
            paths.experiment_file("update_decomposition", f"ratios.{FIGURE}"),
            caption="../resources/report/update_decomposition.rst",
            category="z_subspace",
            subcategory="update_decomposition",
            labels={"model": "{model}", "prompt set": "{pset}", "figure": "R per block"},
        ),
    params:
        z=experiment_params("update_decomposition"),
    log:
        paths.log("update_decomposition", "{model}", "{pset}"),
    benchmark:
        paths.benchmark("update_decomposition", "{model}", "{pset}")
    threads: 1
    resources:
        mem_mb=CPU_MEM_MB,
        runtime=30,
    conda:
        "../envs/cpu.yaml"
    script:
        "../workflow_scripts/update_decomposition.py"


rule z_patching:
    input:
        model=paths.MODEL_DIR,
        mask=Z_MASK,
        resid=paths.RESID,
        tokens=paths.TOKENS,
        prompts=prompt_file,
    output:
        summary=paths.experiment_file("z_patching", "summary.json"),
        metrics=paths.experiment_file("z_patching", "metrics.parquet"),
        table=paths.experiment_file("z_patching", "outputs.parquet"),
        markdown=paths.experiment_file("z_patching", "table.md"),
        rates=report(
            paths.experiment_file("z_patching", f"rates.{FIGURE}"),
            caption="../resources/report/z_patching_rates.rst",
            category="z_subspace",
            subcategory="z_patching",
            labels={"model": "{model}", "prompt set": "{pset}", "figure": "answer and language changes"},
        ),
    params:
        z=experiment_params("z_patching"),
        dtype=model_dtype,
    log:
        paths.log("z_patching", "{model}", "{pset}"),
    benchmark:
        paths.benchmark("z_patching", "{model}", "{pset}")
    threads: 4
    resources:
        gpu=1,
        mem_mb=GPU_MEM_MB,
        runtime=120,
    conda:
        "../envs/gpu.yaml"
    script:
        "../workflow_scripts/z_patching.py"


rule ard_mmd:
    input:
        mask=Z_MASK,
        resid=paths.RESID,
        tokens=paths.TOKENS,
        prompts=prompt_file,
    output:
        summary=paths.experiment_file("ard_mmd", "summary.json"),
        metrics=paths.experiment_file("ard_mmd", "metrics.parquet"),
        lengthscales=paths.experiment_file("ard_mmd", "lengthscales.parquet"),
        trajectory=paths.experiment_file("ard_mmd", "trajectory.parquet"),
        spectrum=report(
            paths.experiment_file("ard_mmd", f"lengthscales.{FIGURE}"),
            caption="../resources/report/ard_mmd_lengthscales.rst",
            category="z_subspace",
            subcategory="ard_mmd",
            labels={"model": "{model}", "prompt set": "{pset}", "figure": "lengthscale spectrum"},
        ),
        convergence=report(
            paths.experiment_file("ard_mmd", f"convergence.{FIGURE}"),
            caption="../resources/report/ard_mmd_convergence.rst",
            category="z_subspace",
            subcategory="ard_mmd",
            labels={"model": "{model}", "prompt set": "{pset}", "figure": "convergence"},
        ),
    params:
        z=experiment_params("ard_mmd"),
    log:
        paths.log("ard_mmd", "{model}", "{pset}"),
    benchmark:
        paths.benchmark("ard_mmd", "{model}", "{pset}")
    threads: 1
    resources:
        gpu=1,
        mem_mb=GPU_MEM_MB,
        runtime=60,
    conda:
        "../envs/gpu.yaml"
    script:
        "../workflow_scripts/ard_mmd.py"


rule bridge:
    input:
        mask=Z_MASK,
        resid=paths.RESID,
        tokens=paths.TOKENS,
        prompts=prompt_file,
    output:
        summary=paths.experiment_file("bridge", "summary.json"),
        metrics=paths.experiment_file("bridge", "metrics.parquet"),
        bridge=report(
            paths.experiment_file("bridge", f"bridge.{FIGURE}"),
            caption="../resources/report/bridge.rst",
            category="z_subspace",
            subcategory="bridge",
            labels={"model": "{model}", "prompt set": "{pset}", "figure": "LOO R² and singular values"},
        ),
    params:
        z=experiment_params("bridge"),
    log:
        paths.log("bridge", "{model}", "{pset}"),
    benchmark:
        paths.benchmark("bridge", "{model}", "{pset}")
    threads: 1
    resources:
        mem_mb=CPU_MEM_MB,
        runtime=30,
    conda:
        "../envs/cpu.yaml"
    script:
        "../workflow_scripts/bridge.py"
