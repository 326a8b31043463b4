# Reports: a page per model, a cross-model table of headline numbers, the dashboard (index.html) and
# provenance.html (config as run, versions, commits, weight hashes, time and memory per job).


rule model_report:
    input:
        unpack(model_report_inputs),
    output:
        md=paths.MODEL_REPORT_MD,
        html=paths.MODEL_REPORT_HTML,
    log:
        paths.log("model_report", "{model}"),
    threads: 1
    conda:
        "../envs/cpu.yaml"
    script:
        "../workflow_scripts/model_report.py"


rule cross_model_report:
    input:
        summaries=cross_model_inputs,
    output:
        md=paths.CROSS_MODEL_REPORT_MD,
        table=paths.CROSS_MODEL_TABLE,
    log:
        paths.log("cross_model_report"),
    threads: 1
    conda:
        "../envs/cpu.yaml"
    script:
        "../workflow_scripts/cross_model_report.py"


rule report_index:
    input:
        pages=model_report_pages,
        cross=paths.CROSS_MODEL_REPORT_MD,
        summaries=cross_model_inputs,
        models=reported_model_dirs,
    output:
        html=paths.REPORT_INDEX,
        provenance=paths.REPORT_PROVENANCE,
    params:
        models=reported_models,
        config=config,
        benchmarks=paths.BENCHMARKS,
    log:
        paths.log("report_index"),
    threads: 1
    conda:
        "../envs/cpu.yaml"
    script:
        "../workflow_scripts/report_index.py"
