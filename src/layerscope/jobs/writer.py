"""The one writer of experiment results, and the provenance every summary.json carries.

:func:`write_result` writes tables (Parquet), then figures, then other files, then
``summary.json`` last, each atomically: a summary on disk means every other output of the
job is complete. :func:`run_experiment_job` is what the generic workflow script calls.
"""

from __future__ import annotations

import functools
import logging
import subprocess
from pathlib import Path
from typing import Any

from layerscope import LayerscopeError, __version__
from layerscope.experiments.registry import Experiment, Job, Result, get
from layerscope.jobs.io import output_getter, read_json, sha256_json, write_json, write_parquet

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the checkout layerscope runs from (None outside a git checkout)."""
    root = Path(__file__).resolve().parents[3]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    if out.returncode != 0 or not commit:
        return None
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    return commit + ("-dirty" if dirty else "")


def versions() -> dict[str, str]:
    out = {"layerscope": __version__}
    for module in ("torch", "transformers", "numpy"):
        try:
            out[module] = __import__(module).__version__
        except ImportError:
            continue
    return out


def _model_hash(model_dir: str | Path) -> str | None:
    from layerscope.jobs.paths import MODEL_MANIFEST

    manifest = Path(model_dir) / MODEL_MANIFEST
    if not manifest.is_file():
        return None
    return sha256_json(read_json(manifest).get("weights", {}))


def _cache_fingerprint(resid: str | Path) -> dict[str, Any] | None:
    """The cache a job read: its path and the metadata extraction recorded (model, prompt-set hash, dtype)."""
    from safetensors import safe_open

    path = Path(resid)
    if not path.is_file():
        return None
    with safe_open(str(path), framework="numpy") as handle:
        meta = dict(handle.metadata() or {})
    return {"path": str(path), "metadata_sha256": sha256_json(meta),
            **{k: meta[k] for k in ("prompt_set_sha256", "storage_dtype") if k in meta}}


def provenance(exp: Experiment, job: Job) -> dict[str, Any]:
    """Experiment, producing function, parameter hash, versions, commit, model weight hash, cache read."""
    out: dict[str, Any] = {
        "experiment": exp.name,
        "function": exp.function,
        "params_sha256": sha256_json(job.params),
        "versions": versions(),
        "commit": git_commit(),
        "wildcards": dict(job.wildcards),
    }
    models = {k: _model_hash(v) for k, v in job.inputs.items() if k in ("model", "model_a", "model_b")}
    if models:
        out["model_weights_sha256"] = models
    caches = {k: _cache_fingerprint(v) for k, v in job.inputs.items() if k in ("resid", "resid_a", "resid_b")}
    if caches:
        out["cache"] = caches
    return out


def write_result(exp: Experiment, result: Result, outputs, *, provenance: dict[str, Any] | None = None) -> None:
    """Write every output of ``result`` to the job's ``outputs`` (Snakemake's or a dict of keys to paths).

    The result must provide exactly the tables, figures and files the experiment declares.
    """
    get_path = output_getter(outputs)
    _check_keys(exp, "tables", set(result.tables), set(exp.tables))
    _check_keys(exp, "figures", set(result.figures), {f.name for f in exp.figures})
    _check_keys(exp, "files", set(result.files), set(exp.files))
    for name in exp.tables:
        write_parquet(get_path(f"table_{name}"), result.tables[name])
    for figure in exp.figures:
        result.figures[figure.name](Path(get_path(f"figure_{figure.name}")))
    for filename in exp.files:
        target = Path(get_path(f"file_{filename.split('.', 1)[0]}"))
        result.files[filename](target)
    summary = dict(result.summary)
    if provenance is not None:
        summary["provenance"] = provenance
    write_json(get_path("summary"), summary)


def _check_keys(exp: Experiment, what: str, got: set, declared: set) -> None:
    if got != declared:
        raise LayerscopeError(f"{exp.name} returned {what} {sorted(got)}, but declares {sorted(declared)}")


def run_experiment(name: str, inputs: dict[str, str], outputs, *, params: dict, wildcards: dict[str, str],
                   device="cpu", render: dict | None = None) -> Result:
    """Run a registered experiment and write its result (library callers and tests)."""
    exp = get(name)
    job = Job(exp, dict(inputs), dict(params), dict(wildcards), device=device, render=render)
    result = exp.run(job)
    write_result(exp, result, outputs, provenance=provenance(exp, job))
    return result


def run_experiment_job(snakemake) -> Result:
    """The body of workflow_scripts/experiment.py: one Snakemake job of any registered experiment."""
    from layerscope.jobs.runtime import job

    exp = get(snakemake.rule)
    params = dict(snakemake.params.experiment)
    inputs = {key: str(value) for key, value in snakemake.input.items()}
    wildcards = {key: str(value) for key, value in snakemake.wildcards.items()}
    render = dict(snakemake.params.render) if exp.render else None
    with job(snakemake, gpu=exp.gpu, seed=params.get("seed")) as ctx:
        return run_experiment(exp.name, inputs, snakemake.output, params=params, wildcards=wildcards,
                              device=ctx.device, render=render)
