# `snakemake plan`: tokens, cache sizes, GPU memory and forward passes of this config, printed before
# anything heavy runs (layerscope.plan; not part of `all`). Reads config.json, tokenizers and safetensors
# headers of the prepared models only.
rule plan:
    localrule: True
    log:
        paths.log("plan"),
    run:
        from layerscope.plan import run_rule

        run_rule(config, log[0])
