"""A real Snakemake run of weight_spectra and weight_topology on a tiny T5 and a tiny ViT (local folders)."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.helpers import save_tiny_model, snakemake

pytestmark = pytest.mark.slow


def test_t5_and_vit_run_through_the_workflow(tmp_path, stories_dir):
    models = {}
    for slug, family, kind in (("tinyt5", "t5_v1_1", "encoder_decoder"), ("tinyvit", "clip_vision", "vision")):
        folder = save_tiny_model(family, tmp_path / "src" / slug, stories_dir)
        models[slug] = {"kind": kind, "source": {"type": "local", "path": str(folder)}}
    (tmp_path / "prompts.json").write_text(json.dumps({"prompts": [{"id": "a", "category": "c", "text": "A cat"}]}))
    config = {"models": models, "prompt_sets": {"tiny": {"path": "prompts.json"}},
              "experiments": {"weight_spectra": {"top_k": 8}, "weight_topology": {"n_null": 20}}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    snakemake(tmp_path, "--cores", "2")
    t5 = json.loads((tmp_path / "results/tinyt5/weight_topology/summary.json").read_text())
    assert t5["stacks"] == {"encoder": 2, "decoder": 3} and set(t5["relative_position_bias"]) == {
        "encoder.relative_bias", "decoder.relative_bias"}
    assert "decoder.cross" in t5["qk_by_circuit"]
    vit = json.loads((tmp_path / "results/tinyvit/weight_spectra/summary.json").read_text())
    assert vit["kind"] == "vision" and vit["reshaped"]["patch_embed"]["matrix_shape"] == [32, 48]
    manifest = json.loads((tmp_path / "resources/models/tinyt5/layerscope.json").read_text())
    assert manifest["kind"] == "encoder_decoder" and manifest["architecture"]["stacks"]["decoder"] == 3
    for model in models:
        for name in ("weight_spectra/rank_ratio.png", "weight_topology/position.png", "weight_topology/qk_circuits.png"):
            assert (tmp_path / "results" / model / name).is_file()
