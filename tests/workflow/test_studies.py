"""The study configs in resources/studies/: each validates, and a dry run plans it without network access."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from tests.helpers import REPO

STUDIES = sorted((REPO / "resources" / "studies").glob("*.yaml"))


def test_there_are_study_configs_and_each_is_documented():
    assert len(STUDIES) >= 4
    reproductions = (REPO / "docs" / "reproductions.md").read_text()
    for study in STUDIES:
        assert f"resources/studies/{study.name}" in reproductions, f"{study.name} is not in docs/reproductions.md"


@pytest.mark.parametrize("study", STUDIES, ids=[s.stem for s in STUDIES])
def test_a_study_config_validates(study):
    from layerscope.jobs import config as lsconfig

    cfg = lsconfig.validate_config(yaml.safe_load(study.read_text()), REPO / lsconfig.SCHEMA_FILE, base_dir=REPO)
    assert lsconfig.targets(cfg)
    assert all(spec["source"]["type"] == "hub" for spec in cfg["models"].values())


@pytest.mark.slow
@pytest.mark.parametrize("study", STUDIES, ids=[s.stem for s in STUDIES])
def test_a_study_dry_run_needs_no_network(study):
    # a dry run must not fetch a model: the hub is switched off and any proxy points nowhere
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    result = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--configfile", str(study)],
                            cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "prepare_model" in result.stdout + result.stderr
