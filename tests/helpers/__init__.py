"""Helpers shared by the tests (importable as ``tests.helpers``): paths, tiny models, Snakemake runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
STORIES_DIR = SHARED / "models" / "stories260K"
STORIES_GGUF = ("ggml-org/models", "tinyllamas/stories260K.gguf")


def save_tiny_model(name: str, folder: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A tiny random model of family ``name`` saved as a HF folder with stories260K's tokenizer."""
    from tests.helpers.tiny_models import tiny_model

    model = tiny_model(name, seed=seed)
    model.save_pretrained(folder, safe_serialization=True)
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer_dir / file, folder / file)
    return folder


# ---------------------------------------------------------------------------- workflow helpers


def snakemake(workdir: Path, *args: str, check: bool = True, env: dict | None = None,
              configfile: str = "config.yaml", timeout: int = 900) -> subprocess.CompletedProcess:
    """Run the real Snakemake CLI on this repository's Snakefile in ``workdir``."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
           "--configfile", str(workdir / configfile), *args]
    full_env = {**os.environ, **(env or {})}
    result = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, env=full_env, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({result.returncode}):\n"
                             f"{result.stdout[-4000:]}\n{result.stderr[-8000:]}")
    return result


def planned_jobs(workdir: Path, configfile: str = "config.yaml") -> list[tuple[str, dict]]:
    """(rule, wildcards) of every job a dry run would execute (without the `all` target)."""
    out = snakemake(workdir, "-n", "--cores", "1", configfile=configfile)
    text = out.stdout + out.stderr
    jobs = []
    current = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith(("rule ", "localrule ")) and stripped.endswith(":"):
            current = [stripped.split()[1].rstrip(":"), {}]
            jobs.append(current)
        elif current is not None and stripped.startswith("wildcards:"):
            for pair in stripped.removeprefix("wildcards:").split(","):
                key, _, value = pair.strip().partition("=")
                current[1][key] = value
    return [(rule, wc) for rule, wc in jobs if rule != "all"]
