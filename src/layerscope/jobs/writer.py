"""The one writer of experiment results, and the provenance every summary.json carries.

:func:`write_result` writes tables (Parquet), then figures, then other files, then
``summary.json`` last, each atomically: a summary on disk means every other output of the
job is complete. :func:`run_experiment_job` is what the generic workflow script calls.
"""

from __future__ import annotations

import functools
import logging
import math
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
    check_summary(exp, summary)
    if provenance is not None:
        summary["provenance"] = provenance
    write_json(get_path("summary"), summary)


UNCERTAINTY_KEYS = {"unit", "n_units", "n_boot", "level", "method"}


def check_summary(exp: Experiment, summary: dict[str, Any]) -> None:
    """Refuse a summary that states numbers without saying how sure they are.

    Every summary carries an ``uncertainty`` object (what was resampled, how often, at which
    level; or why the numbers are exact) and an ``underpowered`` flag; each headline the
    experiment declares is present with its ``_ci``; every interval is finite and contains
    its point value (element by element for per-layer lists).
    """
    unc = summary.get("uncertainty")
    if not isinstance(unc, dict) or set(unc) != UNCERTAINTY_KEYS:
        raise LayerscopeError(f"{exp.name}: summary needs an 'uncertainty' object with keys {sorted(UNCERTAINTY_KEYS)}")
    if not isinstance(summary.get("underpowered"), bool):
        raise LayerscopeError(f"{exp.name}: summary needs a boolean 'underpowered'")
    for key in exp.headlines:
        if key not in summary or f"{key}_ci" not in summary:
            raise LayerscopeError(f"{exp.name}: headline {key!r} needs its value and {key}_ci in the summary")
    for key, ci in summary.items():
        if key.endswith("_ci") and key[:-3] in summary:
            _check_interval(exp, key, summary[key[:-3]], ci)


def _check_interval(exp: Experiment, key: str, point: Any, ci: Any) -> None:
    if isinstance(point, bool) or point is None:
        return
    if isinstance(point, (int, float)):
        if not math.isfinite(point):
            return
        ok = (isinstance(ci, (list, tuple)) and len(ci) == 2
              and all(isinstance(v, (int, float)) and math.isfinite(v) for v in ci)
              and ci[0] - 1e-9 * max(1.0, abs(point)) <= point <= ci[1] + 1e-9 * max(1.0, abs(point)))
        if not ok:
            raise LayerscopeError(f"{exp.name}: {key} = {ci} is not a finite interval containing {point}")
    elif isinstance(point, (list, tuple)):
        if not isinstance(ci, (list, tuple)) or len(ci) != len(point):
            raise LayerscopeError(f"{exp.name}: {key} needs one interval per element of {key[:-3]}")
        for p, c in zip(point, ci):
            if c is None or (isinstance(c, (list, tuple)) and all(v is None for v in c)):
                if p is None or (isinstance(p, float) and not math.isfinite(p)):
                    continue
            _check_interval(exp, key, p, c)


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
    from layerscope.model.placement import use_placements

    exp = get(snakemake.rule)
    params = dict(snakemake.params.experiment)
    inputs = {key: str(value) for key, value in snakemake.input.items()}
    wildcards = {key: str(value) for key, value in snakemake.wildcards.items()}
    render = dict(snakemake.params.render) if exp.render else None
    # models placed over devices / offloaded: load_model finds its folder's placement (layerscope.model.placement)
    placements = dict(getattr(snakemake.params, "placement", None) or {})
    with job(snakemake, gpu=exp.gpu, seed=params.get("seed")) as ctx, use_placements(placements):
        return run_experiment(exp.name, inputs, snakemake.output, params=params, wildcards=wildcards,
                              device=ctx.device, render=render)
