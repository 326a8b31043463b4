"""Config validation: every kind of bad input stops the run with a message naming it."""

from __future__ import annotations

import copy

import pytest
import yaml

from tests.helpers import REPO
from layerscope.jobs import config as lsconfig
from layerscope.jobs.config import ConfigError, validate_config

SCHEMA = REPO / lsconfig.SCHEMA_FILE


def minimal() -> dict:
    return {
        "models": {"m1": {"source": {"type": "local", "path": "/x"}}},
        "prompt_sets": {"core": {"path": "resources/prompt_sets/core.json"}},
        "experiments": {"logit_lens": {}},
    }


def check(cfg: dict) -> dict:
    return validate_config(cfg, SCHEMA, base_dir=REPO)


def test_default_config_is_valid_and_defaults_are_filled():
    cfg = check(yaml.safe_load((REPO / "config.yaml").read_text()))
    assert cfg["generation"]["backend"] == "auto"
    assert cfg["activations"]["dtype"] == "auto"
    assert cfg["experiments"]["logit_lens"]["enabled"] is True
    assert cfg["models"]["smollm2-135m"]["kind"] == "decoder"
    assert cfg["models"]["minilm-l6"]["kind"] == "encoder"


def test_minimal_config_fills_nested_defaults():
    cfg = check(minimal())
    assert cfg["seed"] == 0
    assert cfg["models"]["m1"]["dtype"] == "auto"
    assert cfg["experiments"]["logit_lens"]["topk"] == 10
    hub = minimal()
    hub["models"]["m1"]["source"] = {"type": "hub", "id": "org/name"}
    assert check(hub)["models"]["m1"]["source"]["revision"] == "main"


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda c: c.update(lens_topk=3), "unknown key(s) ['lens_topk']"),
        (lambda c: c["experiments"].update(bogus={}), "unknown experiment(s) ['bogus']"),
        (lambda c: c["models"]["m1"].update(source={"type": "ftp", "path": "x"}), "unknown model source type 'ftp'"),
        (lambda c: c["experiments"]["logit_lens"].update(topk="ten"), "config.experiments.logit_lens.topk"),
        (lambda c: c["experiments"]["logit_lens"].update(topk=0), "config.experiments.logit_lens.topk"),
        (lambda c: c.update(models={"org/model": {"source": {"type": "local", "path": "x"}}}), "'org/model'"),
        (lambda c: c["models"]["m1"]["source"].update(revision="v1"), "unknown key(s) ['revision']"),
        (lambda c: c["models"]["m1"].update(source={"type": "pypi_wheel", "package": "a==1"}), "exactly one of 'gguf'"),
        (lambda c: c["models"]["m1"].update(source={"type": "hub", "id": "no-slash"}), "config.models.m1.source.id"),
        (lambda c: c["experiments"]["logit_lens"].update(models=["nope"]), "unknown model 'nope'"),
        (lambda c: c["experiments"]["logit_lens"].update(prompt_sets=["nope"]), "unknown prompt set 'nope'"),
        (lambda c: c["prompt_sets"]["core"].update(path="missing.json"), "file not found"),
        (lambda c: c.pop("models"), "'models' is a required property"),
    ],
)
def test_bad_config_names_the_problem(mutate, expected):
    cfg = minimal()
    mutate(cfg)
    with pytest.raises(ConfigError) as info:
        check(cfg)
    assert expected in str(info.value)


def test_decoder_only_experiment_refuses_an_encoder():
    cfg = minimal()
    cfg["models"]["enc"] = {"kind": "encoder", "source": {"type": "local", "path": "/y"}}
    cfg["experiments"]["logit_lens"]["models"] = ["enc"]
    with pytest.raises(ConfigError, match="logit_lens runs on decoder models, but 'enc' is of kind 'encoder'"):
        check(cfg)


def test_weights_only_kinds_get_only_the_weight_experiments():
    from layerscope.jobs.config import experiment_models

    cfg = minimal()
    cfg["models"]["t5"] = {"kind": "encoder_decoder", "source": {"type": "local", "path": "/t5"}}
    cfg["models"]["vit"] = {"kind": "vision", "source": {"type": "local", "path": "/vit"}}
    cfg["experiments"].update({"weight_spectra": {}, "residual_geometry": {}})
    filled = check(cfg)
    assert set(experiment_models(filled, "weight_spectra")) >= {"t5", "vit"}
    assert not {"t5", "vit"} & set(experiment_models(filled, "residual_geometry"))
    assert not {"t5", "vit"} & set(experiment_models(filled, "logit_lens"))
    cfg["experiments"]["residual_geometry"]["models"] = ["t5"]
    with pytest.raises(ConfigError, match="residual_geometry runs on decoder or encoder models, but 't5' is of "
                                          "kind 'encoder_decoder'"):
        check(cfg)


def test_validation_does_not_modify_its_input():
    cfg = minimal()
    before = copy.deepcopy(cfg)
    check(cfg)
    assert cfg == before


def test_targets_schedule_only_what_a_model_supports():
    cfg = minimal()
    cfg["models"]["enc"] = {"kind": "encoder", "source": {"type": "local", "path": "/y"}}
    cfg = check(cfg)
    targets = lsconfig.targets(cfg)
    assert "results/m1/core/logit_lens/summary.json" in targets
    assert not any(t.startswith("results/enc/") for t in targets)
    assert "resources/models/enc" in targets  # every configured model is still prepared
    assert "results/report/m1.html" in targets and "results/report/enc.html" not in targets


def test_disabled_experiment_has_no_targets():
    cfg = minimal()
    cfg["experiments"]["logit_lens"]["enabled"] = False
    cfg = check(cfg)
    assert lsconfig.all_summaries(cfg) == []


def test_rule_params_carry_every_setting_that_changes_results():
    cfg = minimal()
    cfg["models"]["m1"]["system_prompt"] = "Be brief."
    cfg["prompt_sets"]["core"]["max_new_tokens"] = 7
    cfg = check(cfg)
    gen = lsconfig.generation_params(cfg, "m1", "core")
    assert gen["system_prompt"] == "Be brief." and gen["max_new_tokens"] == 7
    assert lsconfig.experiment_params(cfg, "logit_lens") == {"topk": 10, "max_phases": 4, "chunk_tokens": 256, "seed": 0}


@pytest.mark.parametrize("source, message", [
    ({"path": "/x"}, "source: 'type' is a required property"),  # not "unknown key revision" from a default
    ({"type": "pypi_wheel", "gguf": "a.gguf"}, "source: 'package' is a required property"),
    ({"type": "pypi_wheel", "package": "x==1"}, "needs exactly one of 'gguf'"),
    ({"type": "hub"}, "source: 'id' is a required property"),
])
def test_model_source_errors_name_the_real_problem(source, message):
    cfg = minimal()
    cfg["models"]["m1"]["source"] = source
    with pytest.raises(ConfigError) as err:
        check(cfg)
    problems = str(err.value).splitlines()[1:]
    assert len(problems) == 1 and message in problems[0], str(err.value)


def test_an_encoder_left_at_the_default_kind_is_named_in_prepare(tmp_path, stories_dir):
    """A BERT folder configured without `kind` fails in prepare_model, naming the setting to change."""
    from tests.helpers import save_tiny_model
    from layerscope import LayerscopeError
    from layerscope.model.adapter import check_supported

    bert = save_tiny_model("bert", tmp_path / "bert", stories_dir)
    with pytest.raises(LayerscopeError, match=r"default when `kind` is left out.*set `kind: encoder`"):
        check_supported(bert, "decoder")
    assert check_supported(bert, "encoder").kind == "encoder"
