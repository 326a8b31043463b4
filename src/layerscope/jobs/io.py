"""Atomic output writing and small file helpers.

Every file the workflow produces is written to a temporary name beside its target and
renamed into place only once complete, so an interrupted job never leaves a half-written
file that looks finished. A job killed outright (``kill -9``) cannot remove its temporary
file: the next write of the same target removes such leftovers (one job at a time writes a
given target — Snakemake guarantees that within a working directory).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

_UMASK = os.umask(0)
os.umask(_UMASK)


def _temp_name_pattern(target: Path, suffix: str) -> re.Pattern:
    """Names ``tempfile.mkstemp``/``mkdtemp`` give a temporary for ``target`` (8 random characters)."""
    return re.compile(re.escape(f".{target.name}.") + r"[A-Za-z0-9_]{8}" + re.escape(suffix))


def remove_stale_temporaries(target: str | os.PathLike, suffix: str | None = None) -> list[Path]:
    """Remove temporaries of ``target`` left by a killed writer (files or folders); returns them."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    suffix = f".tmp{target.suffix}" if suffix is None else suffix
    pattern = _temp_name_pattern(target, suffix)
    removed = []
    for entry in target.parent.iterdir():
        if pattern.fullmatch(entry.name):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
            removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto ``target`` on success.

    On an exception the temporary file is removed and the target is left untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = suffix if suffix is not None else target.suffix
    remove_stale_temporaries(target, f".tmp{suffix}")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{suffix}", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp creates 0600 files
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; it replaces ``target`` on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target, ".tmp")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        for path in [tmp, *tmp.rglob("*")]:
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_UMASK)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _clean_floats(obj: Any) -> Any:
    """Replace NaN/inf by None so the JSON is standard (json.dumps would write NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, np.floating):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, dict):
        return {str(k): _clean_floats(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean_floats(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _clean_floats(obj.tolist())
    return obj


def write_json(path: str | os.PathLike, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_clean_floats(data), indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_parquet(path: str | os.PathLike, frame) -> None:
    """Write a pandas DataFrame to Parquet atomically (no index column)."""
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


def output_getter(outputs) -> Callable[[str], Any]:
    """``get(name)`` for a job's output paths, given as a dict (library callers, tests) or as
    Snakemake's named output list (``snakemake.output``)."""
    if isinstance(outputs, dict):
        return outputs.__getitem__
    return lambda name: getattr(outputs, name)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(data: Any) -> str:
    """Hash of a JSON-able object in canonical form (sorted keys, no whitespace)."""
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_json_default)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
