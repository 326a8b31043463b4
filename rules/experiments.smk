# One rule per registered experiment, generated from the registry (layerscope.experiments.registry):
# its inputs, outputs (figures registered with the report, captions in resources/report/), params,
# log, benchmark, threads and resources all come from the experiment's declaration. Every rule
# runs the same thin script, which looks the experiment up by the rule's name.

from layerscope.experiments import registry as _registry


# only when some model configures its placement: default runs keep their params (no reruns)
_placement = {"placement": placement_params} if lsconfig.any_placement(config) else {}

for _exp in _registry.experiments().values():

    rule:
        name:
            _exp.name
        input:
            unpack(experiment_inputs(_exp.name)),
        output:
            **experiment_outputs(_exp),
        params:
            experiment=experiment_params(_exp.key),
            render=rendering_params if _exp.render else {},
            **_placement,
        log:
            _exp.log(),
        benchmark:
            _exp.benchmark()
        threads: _exp.threads
        resources:
            **experiment_resources(_exp),
        conda:
            "../envs/gpu.yaml" if _exp.gpu else "../envs/cpu.yaml"
        script:
            "../workflow_scripts/experiment.py"
