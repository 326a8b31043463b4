"""Reports: a page per model, the dashboard (index.html), provenance.html and a cross-model table.

What a page shows is read from each experiment's ``summary.json``: its top-level scalars and
lists of scalars (a number K with its interval ``K_ci``), led by the experiment's ``dashboard``
keys (its headlines by default), and the warnings it records (:func:`notes`). Nested tables stay
in the summary and the experiment's Parquet files, which the pages link. The HTML is rendered by
:mod:`layerscope.report.html` from Jinja2 templates; model pages are also written as Markdown.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from layerscope import __version__
from layerscope.jobs.io import read_json, write_parquet, write_text
from layerscope.report import html as html_pages

REPO = Path(__file__).resolve().parents[3]  # captions: resources/report/ of the checkout the workflow runs from

FIGURE_SUFFIXES = (".png", ".svg")
MAX_LIST = 12


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool)) or value is None


def headline(summary: dict) -> dict[str, Any]:
    """The summary's top-level scalars and short scalar lists (model / prompt_set excluded).

    A number K reported with an interval ``K_ci`` is kept as K; the interval is read with
    :func:`intervals` and shown beside it ("value [lo, hi]"), not as a row of its own.
    """
    out = {}
    cis = intervals(summary)
    for key, value in summary.items():
        if key in ("model", "prompt_set", "experiment", "model_a", "model_b", "underpowered_reasons"):
            continue
        if key.endswith("_ci") and key[: -len("_ci")] in cis:
            continue
        if _is_scalar(value):
            out[key] = value
        elif isinstance(value, list) and len(value) <= MAX_LIST and all(_is_scalar(v) for v in value):
            out[key] = value
    return out


def intervals(summary: dict) -> dict[str, list[float]]:
    """K -> [lo, hi] for every scalar number K of the summary that has a ``K_ci`` pair."""
    out = {}
    for key, value in summary.items():
        if not key.endswith("_ci"):
            continue
        base = key[: -len("_ci")]
        point = summary.get(base)
        if (isinstance(point, (int, float)) and not isinstance(point, bool) and isinstance(value, list)
                and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)):
            out[base] = [float(value[0]), float(value[1])]
    return out


def shown(summary: dict, key: str, value: Any) -> str:
    """One headline value as the report prints it: "value [lo, hi]" when it has an interval."""
    if isinstance(value, list):
        return html_pages.cell(value, summary.get(f"{key}_ci")).text
    ci = intervals(summary).get(key)
    if ci is None:
        return _fmt(value)
    return f"{_fmt(value)} [{_fmt(ci[0])}, {_fmt(ci[1])}]"


def evidence_note(summary: dict) -> str:
    """What the intervals are over, and why a claim is flagged underpowered (empty if neither)."""
    parts = []
    unc = summary.get("uncertainty")
    if isinstance(unc, dict):
        if unc.get("n_units"):
            parts.append(f"Intervals: {unc['level']:.0%} {unc['method']} ({unc['n_units']} {unc['unit']}s, "
                         f"{unc['n_boot']} resamples).")
        elif unc.get("method"):
            parts.append(f"No intervals: {unc['method']}.")
    if summary.get("underpowered"):
        reasons = "; ".join(summary.get("underpowered_reasons") or []) or "see summary"
        parts.append(f"**Underpowered**: {reasons}.")
    return " ".join(parts)


def parse_summary_path(path: str | Path) -> dict[str, str]:
    """results/{model}/{pset}/{experiment}/summary.json or results/{model}/{experiment}/summary.json.

    A pairwise result, results/cross_model/{analysis}/[{pset}/]{model_a}/{model_b}/summary.json,
    is labelled model "{model_a} vs {model_b}" and experiment "cross_model/{analysis}".
    """
    parts = Path(path).parts
    i = parts.index("results") if "results" in parts else len(parts) - 5
    rest = parts[i + 1 : -1]
    if rest and rest[0] == "cross_model" and len(rest) in (4, 5):
        pset = rest[2] if len(rest) == 5 else ""
        return {"model": f"{rest[-2]} vs {rest[-1]}", "prompt_set": pset, "experiment": f"cross_model/{rest[1]}"}
    if len(rest) == 3:
        return {"model": rest[0], "prompt_set": rest[1], "experiment": rest[2]}
    if len(rest) == 2:
        return {"model": rest[0], "prompt_set": "", "experiment": rest[1]}
    raise ValueError(f"not a summary path: {path}")


def report_sections() -> dict[str, list[str]]:
    """Report section -> the experiments shown in it, in registry order (a family such as z_subspace
    shares one section)."""
    from layerscope.experiments.registry import experiments

    out: dict[str, list[str]] = {}
    for exp in experiments().values():
        out.setdefault(exp.report_section, []).append(exp.name)
    return out


def scope_label(experiment: str, prompt_set: str) -> str:
    """What a result was computed from: a prompt set, the weights, or the experiment's own inputs."""
    if prompt_set:
        return f"prompt set `{prompt_set}`"
    from layerscope.jobs.config import experiment_infos

    info = experiment_infos().get(experiment)
    return "its own inputs" if info is not None and info.data == "inputs" else "weights"


def headline_table(summary_paths: Iterable[str | Path]) -> pd.DataFrame:
    """Long table: experiment, prompt_set, metric, model, value (value as JSON text for lists)."""
    rows = []
    for path in summary_paths:
        where = parse_summary_path(path)
        summary = read_json(path)
        for metric, value in headline(summary).items():
            text = None if value is None else shown(summary, metric, value) if metric in intervals(summary) \
                else json.dumps(value) if isinstance(value, list) else str(value)
            rows.append({**where, "metric": metric, "value": text,
                         "number": float(value) if isinstance(value, (int, float)) and not isinstance(value, bool)
                         else float("nan")})
    return pd.DataFrame(rows, columns=["model", "prompt_set", "experiment", "metric", "value", "number"])


def _fmt(value: Any) -> str:
    return html_pages.fmt(value)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _figures(summary_path: Path) -> list[Path]:
    return sorted(p for p in summary_path.parent.iterdir() if p.suffix in FIGURE_SUFFIXES)


def _tables(summary_path: Path) -> list[Path]:
    """Tables an experiment writes beside its summary: Parquet files and Markdown tables (e.g. z_patching's)."""
    return sorted(p for p in summary_path.parent.iterdir()
                  if p.suffix in (".md", ".parquet") and not p.name.startswith("."))


# ---------------------------------------------------------------------------- what a page shows

META_KEYS = {"model", "prompt_set", "experiment", "model_a", "model_b", "underpowered_reasons", "uncertainty",
             "provenance", "definitions", "prompt_ids", "notes", "warnings"}


def notes(summary: dict) -> list[str]:
    """Every warning a summary records, as sentences: not applicable and why, underpowered claims and
    why, runs that did not converge, inputs that were skipped or left out."""
    out = []
    if summary.get("applicable") is False:
        out.append(f"Not applicable: {summary.get('reason') or 'see summary.json'}.")
    reasons = [str(r) for r in summary.get("underpowered_reasons") or []]
    out += [f"Underpowered: {r}." for r in reasons]
    if summary.get("underpowered") and not reasons:
        out.append("Underpowered (no reason recorded).")
    for key in ("notes", "warnings"):
        value = summary.get(key)
        if isinstance(value, str) and value:
            out.append(value)
        elif isinstance(value, list):
            out += [str(v) for v in value if v]
    n_conv, n_runs = summary.get("n_converged"), summary.get("n_runs")
    if isinstance(n_conv, int) and isinstance(n_runs, int) and n_conv < n_runs \
            and not any("converge" in r for r in reasons):
        out.append(f"{n_runs - n_conv} of {n_runs} optimisation runs did not converge.")
    for key, value in summary.items():
        if not key.startswith("skipped") or not value:
            continue
        if isinstance(value, dict):
            items = "; ".join(f"{k}: {', '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in value.items())
        elif isinstance(value, list):
            items = ", ".join(map(str, value[:20])) + (f", … (+{len(value) - 20})" if len(value) > 20 else "")
        else:
            items = str(value)
        out.append(f"Skipped ({key.replace('_', ' ')}): {items}.")
    empty = summary.get("n_empty_completions")
    if isinstance(empty, int) and empty > 0:
        out.append(f"{empty} prompt(s) with an empty completion left out.")
    return out


def registry_entry(path: str | Path, summary: dict | None = None):
    """The registered experiment a summary belongs to (None for an unknown one)."""
    from layerscope.jobs.config import experiment_infos

    infos = experiment_infos()
    name = ((summary or {}).get("provenance") or {}).get("experiment") if isinstance(summary, dict) else None
    if name in infos:
        return infos[name]
    experiment = parse_summary_path(path)["experiment"]
    if experiment.startswith("cross_model/"):
        folder = experiment.split("/", 1)[1]
        for info in infos.values():
            if info.pairwise and (info.folder or info.name) == folder:
                return info
    return infos.get(experiment)


def key_metrics(info, summary: dict) -> list[str]:
    """The summary keys a page leads with: the experiment's dashboard keys (its headlines by default)."""
    keys = list(getattr(info, "dashboard", ()) or getattr(info, "headlines", ()) or ()) if info is not None else []
    keys = [k for k in keys if k in summary]
    if not keys:  # an experiment that declares none: its first few numbers
        keys = [k for k, v in headline(summary).items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.startswith("n_")][:4]
    return keys


def _ci(summary: dict, key: str):
    value = summary.get(f"{key}_ci")
    return value if isinstance(value, list) else None


def metric_rows(summary: dict, keys: Iterable[str]) -> list[dict]:
    return [{"metric": k, "cell": html_pages.cell(summary[k], _ci(summary, k))} for k in keys if k in summary]


def other_keys(summary: dict, lead: list[str]) -> list[str]:
    out = []
    for key, value in summary.items():
        if key in META_KEYS or key in lead or (key.endswith("_ci") and key[:-3] in summary):
            continue
        if _is_scalar(value) or (isinstance(value, list) and all(_is_scalar(v) for v in value)):
            out.append(key)
    return out


def anchor(experiment: str, prompt_set: str) -> str:
    return f"{experiment.replace('/', '-')}--{prompt_set or 'model'}"


def _result_view(path: Path, out_html: Path) -> dict:
    where = parse_summary_path(path)
    summary = read_json(path)
    info = registry_entry(path, summary)
    name = info.name if info else where["experiment"]
    lead = key_metrics(info, summary)
    wildcards = {"model": where["model"], "pset": where["prompt_set"]}
    if " vs " in where["model"]:
        wildcards.update(zip(("model_a", "model_b"), where["model"].split(" vs ")))
    registered = {f.name: f for f in info.figures} if info is not None else {}
    figures = []
    for fig in _figures(path):
        caption = html_pages.caption_html(REPO / info.caption(registered[fig.stem]), wildcards) \
            if fig.stem in registered else ""
        figures.append({"src": os.path.relpath(fig, out_html.parent), "alt": f"{name}: {fig.stem}",
                        "name": fig.stem, "caption": caption})
    return {
        "experiment": name,
        "prompt_set": where["prompt_set"],
        "model": where["model"],
        "scope": scope_label(where["experiment"], where["prompt_set"]).replace("`", ""),
        "anchor": anchor(where["experiment"], where["prompt_set"]),
        "description": info.description if info else "",
        "evidence": evidence_note(summary).replace("**", ""),
        "notes": notes(summary),
        "underpowered": bool(summary.get("underpowered")),
        "lead": metric_rows(summary, lead),
        "others": metric_rows(summary, other_keys(summary, lead)),
        "figures": figures,
        "tables": [{"href": os.path.relpath(t, out_html.parent), "name": t.name} for t in _tables(path)]
                  + [{"href": os.path.relpath(path, out_html.parent), "name": path.name}],
        "summary": summary,
        "title": f"{name} — {where['model']}" if " vs " in where["model"] else scope_label(
            where["experiment"], where["prompt_set"]).replace("`", ""),
        "family": False,
    }


def model_report(model: str, summary_paths: list[str | Path], manifest_path: str | Path | None,
                 out_md: str | Path, out_html: str | Path) -> None:
    """The per-model page: architecture, then per experiment its headline numbers (value [lo, hi]), its
    notes (every warning it recorded), figures with their captions, small inline curves for per-layer
    lists, and links to its tables. Written as HTML (from templates) and as Markdown."""
    out_md, out_html = Path(out_md), Path(out_html)
    manifest = read_json(manifest_path) if manifest_path and Path(manifest_path).is_file() else {}
    facts = manifest.get("architecture", {})
    source = ", ".join(f"{k}={v}" for k, v in manifest.get("source", {}).items())
    sections: dict[str, list[dict]] = {}
    for path in map(Path, summary_paths):
        view = _result_view(path, out_html)
        info = registry_entry(path, view["summary"])
        sections.setdefault(info.report_section if info else view["experiment"], []).append(view)
    for section, views in sections.items():
        family = any(v["experiment"] != section for v in views)
        for view in views:
            view["title"] = f"{view['experiment']} — {view['scope']}" if family else view["scope"]
            view["family"] = family

    md = [f"# {model}", ""]
    if source:
        md += [f"Source: `{source}`", ""]
    if facts:
        md += ["## Architecture", "", _md_table(["fact", "value"], [[k, _fmt(v)] for k, v in facts.items()]), ""]
    for section, views in sections.items():
        md += [f"## {section}", ""]
        for view in views:
            scope = scope_label(view["experiment"], view["prompt_set"])
            md += [f"### {view['experiment']} — {scope}" if view["family"] else f"### {scope}", ""]
            if view["family"] and view["description"]:
                md += [f"_{view['description']}_", ""]
            note = evidence_note(view["summary"])
            if note:
                md += [note, ""]
            md += [f"- {n}" for n in view["notes"] if not n.startswith("Underpowered")] + ([""] if view["notes"] else [])
            rows = [[r["metric"], r["cell"].text] for r in view["lead"] + view["others"]]
            md += [_md_table(["metric", "value"], rows), ""]
            for table in view["tables"]:
                href = os.path.relpath(out_html.parent / table["href"], out_md.parent)
                md += [f"Table: [{table['name']}]({href})", ""]
            for fig in view["figures"]:
                md.append(f"![{fig['alt']}]({os.path.relpath(out_html.parent / fig['src'], out_md.parent)})")
            md.append("")
    md.append(f"_layerscope {__version__}_")
    write_text(out_md, "\n".join(md) + "\n")
    page = html_pages.render("model.html.j2", title=f"layerscope — {model}", model=model, source=source,
                             facts=[(k, _fmt(v)) for k, v in facts.items()], sections=sections)
    write_text(out_html, page)


def cross_model_report(summary_paths: list[str | Path], out_md: str | Path, out_table: str | Path) -> pd.DataFrame:
    """Every headline number side by side: one row per (experiment, prompt set, metric), one column per model."""
    table = headline_table(summary_paths)
    write_parquet(out_table, table)
    md = ["# Cross-model comparison", ""]
    models = list(dict.fromkeys(table["model"]))
    for (experiment, pset), group in table.groupby(["experiment", "prompt_set"], sort=False):
        wide = group.pivot_table(index="metric", columns="model", values="value", aggfunc="first", sort=False)
        wide = wide.reindex(columns=[m for m in models if m in wide.columns])
        rows = [[metric] + [_fmt(v) if isinstance(v, str) and not v.startswith("[") else
                            "–" if v is None or (isinstance(v, float) and v != v) else str(v)
                            for v in wide.loc[metric].tolist()] for metric in wide.index]
        title = f"{experiment} — {scope_label(experiment, pset)}"
        md += [f"## {title}", "", _md_table(["metric", *wide.columns.tolist()], rows), ""]
    pair_figures = [(parse_summary_path(p), fig) for p in map(Path, summary_paths)
                    if parse_summary_path(p)["experiment"].startswith("cross_model/") for fig in _figures(p)]
    if pair_figures:
        md += ["## Figures of model pairs", ""]
        for where, fig in pair_figures:
            label = f"{where['experiment']} {where['model']}" + (f" ({where['prompt_set']})" if where["prompt_set"] else "")
            md.append(f"![{label}]({os.path.relpath(fig, Path(out_md).parent)})")
        md.append("")
    write_text(out_md, "\n".join(md) + "\n")
    return table


def _model_row(model: str, manifest: dict, views: list[dict]) -> dict:
    facts = manifest.get("architecture", {})
    return {
        "model": model, "href": f"{model}.html", "kind": manifest.get("kind") or facts.get("kind", "–"),
        "family": facts.get("family", "–"), "n_layers": facts.get("n_layers", "–"),
        "d_model": facts.get("d_model", "–"), "vocab_size": facts.get("vocab_size", "–"),
        "n_results": len(views), "n_underpowered": sum(v["underpowered"] for v in views),
        "n_notes": sum(bool(v["notes"]) for v in views),
    }


def dashboard(models: list[str], summary_paths: list[str | Path], manifests: dict[str, str | Path],
              out_html: str | Path) -> dict:
    """What the index shows: a row per model, then per experiment a row per (model, prompt set) with its
    key numbers, and the results of model pairs in full (tables, notes, CKA heat maps)."""
    out_html = Path(out_html)
    views = [_result_view(Path(p), out_html) for p in summary_paths]
    single = [v for v in views if " vs " not in v["model"]]
    pairs = [v for v in views if " vs " in v["model"]]
    model_rows = []
    for model in models:
        path = manifests.get(model)
        manifest = read_json(path) if path and Path(path).is_file() else {}
        model_rows.append(_model_row(model, manifest, [v for v in single if v["model"] == model]))
    sections: dict[str, dict[str, dict]] = {}
    for view in single:
        section = _section_of(view["experiment"])
        block = sections.setdefault(section, {}).setdefault(view["experiment"], {
            "experiment": view["experiment"], "description": view["description"], "columns": [], "rows": []})
        for row in view["lead"]:
            if row["metric"] not in block["columns"]:
                block["columns"].append(row["metric"])
        block["rows"].append({"model": view["model"], "prompt_set": view["prompt_set"] or "–",
                              "href": f"{view['model']}.html#{view['anchor']}", "view": view,
                              "cells": {r["metric"]: r["cell"] for r in view["lead"]},
                              "underpowered": view["underpowered"], "n_notes": len(view["notes"])})
    cka = [fig for view in pairs for fig in view["figures"] if view["experiment"] == "cross_model_cka"]
    return {"models": model_rows, "sections": sections, "pairs": pairs, "cka_figures": cka,
            "n_results": len(views), "n_underpowered": sum(v["underpowered"] for v in views)}


def _section_of(experiment: str) -> str:
    from layerscope.jobs.config import experiment_infos

    info = experiment_infos().get(experiment)
    return info.report_section if info else experiment


def benchmarks(benchmarks_dir: str | Path) -> pd.DataFrame:
    """Wall time and peak memory of every finished job, from Snakemake's benchmark files."""
    rows = []
    for path in sorted(Path(benchmarks_dir).glob("*/*.tsv")):
        try:
            frame = pd.read_csv(path, sep="\t")
        except (OSError, ValueError, pd.errors.ParserError):
            continue
        if frame.empty or "s" not in frame:
            continue
        last = frame.iloc[-1]
        rows.append({"rule": path.parent.name, "job": path.stem, "seconds": float(last["s"]),
                     "max_rss_mb": float(last.get("max_rss", float("nan"))),
                     "cpu_seconds": float(last.get("cpu_time", float("nan")))})
    return pd.DataFrame(rows, columns=["rule", "job", "seconds", "max_rss_mb", "cpu_seconds"])


def provenance(summary_paths: list[str | Path], manifests: dict[str, str | Path], config: dict | None,
               benchmarks_dir: str | Path) -> dict:
    """What was run: the config as validated, the versions and commits that produced each result, the
    model weights' hashes, and each job's wall time and peak memory."""
    import platform

    import yaml

    from layerscope.jobs.writer import git_commit, versions

    now = versions()
    for module in ("snakemake", "pandas", "scipy"):
        try:
            now[module] = __import__(module).__version__
        except ImportError:  # pragma: no cover
            pass
    now["python"] = platform.python_version()
    results = []
    for path in map(Path, summary_paths):
        summary = read_json(path)
        prov = summary.get("provenance") or {}
        where = parse_summary_path(path)
        results.append({"experiment": prov.get("experiment", where["experiment"]), "model": where["model"],
                        "prompt_set": where["prompt_set"] or "–", "commit": prov.get("commit") or "–",
                        "versions": ", ".join(f"{k} {v}" for k, v in (prov.get("versions") or {}).items()),
                        "params_sha256": (prov.get("params_sha256") or "–")[:12]})
    models = []
    for model, path in manifests.items():
        manifest = read_json(path) if path and Path(path).is_file() else {}
        hashes = dict(manifest.get("weights") or {})
        for key in ("gguf_sha256",):
            if manifest.get(key):
                hashes[key.replace("_sha256", "")] = manifest[key]
        if (manifest.get("wheel") or {}).get("sha256"):
            hashes[manifest["wheel"].get("file", "wheel")] = manifest["wheel"]["sha256"]
        models.append({"model": model, "source": ", ".join(f"{k}={v}" for k, v in manifest.get("source", {}).items()),
                       "hashes": sorted(hashes.items())})
    jobs = benchmarks(benchmarks_dir)
    commits = sorted({r["commit"] for r in results})
    return {
        "versions": sorted(now.items()), "workflow_commit": git_commit() or "not a git checkout",
        "commits": commits, "mixed_commits": len(commits) > 1,
        "mixed_versions": len({r["versions"] for r in results}) > 1,
        "results": results, "models": models,
        "jobs": jobs.sort_values("seconds", ascending=False).to_dict("records"),
        "total_seconds": float(jobs["seconds"].sum()) if len(jobs) else 0.0,
        "max_rss_mb": float(jobs["max_rss_mb"].max()) if len(jobs) else float("nan"),
        "config": yaml.safe_dump(config, sort_keys=False, allow_unicode=True) if config else "(not recorded)",
    }


def report_index(models: list[str], summary_paths: list[str | Path], manifests: dict[str, str | Path],
                 out_html: str | Path, out_provenance: str | Path, *, config: dict | None = None,
                 benchmarks_dir: str | Path = "results/benchmarks") -> None:
    """results/report/index.html (the dashboard) and provenance.html."""
    board = dashboard(models, summary_paths, manifests, out_html)
    write_text(out_html, html_pages.render("index.html.j2", title="layerscope report", **board,
                                           provenance_href=os.path.relpath(out_provenance, Path(out_html).parent)))
    prov = provenance(summary_paths, manifests, config, benchmarks_dir)
    write_text(out_provenance, html_pages.render("provenance.html.j2", title="layerscope — provenance", **prov,
                                                 index_href=os.path.relpath(out_html, Path(out_provenance).parent)))
