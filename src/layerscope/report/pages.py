"""Reports: one page per model and a cross-model table of every experiment's headline numbers.

Headline numbers are read from each experiment's ``summary.json``: its top-level scalars
(numbers, strings, booleans) and short lists of scalars. Nested tables stay in the summary
and in ``metrics.parquet``. Pages are written as Markdown and as self-contained-looking
HTML that links the figures in place.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from layerscope import __version__
from layerscope.jobs.io import read_json, write_parquet, write_text

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
        return json.dumps(value)
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
    if value is None:
        return "–"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if number.is_integer() and abs(number) < 1e12 and "." not in str(value):
        return str(int(number))
    return f"{number:.4g}"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;"
    "text-align:left;font-size:0.9em}th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee;margin:4px 0}"
    "code{background:#f3f3f3;padding:0 3px}"
)


def _html_page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>{body}</body></html>\n")


def _figures(summary_path: Path) -> list[Path]:
    return sorted(p for p in summary_path.parent.iterdir() if p.suffix in FIGURE_SUFFIXES)


def _tables(summary_path: Path) -> list[Path]:
    """Markdown tables an experiment writes beside its summary (e.g. z_patching's table.md)."""
    return sorted(p for p in summary_path.parent.iterdir() if p.suffix == ".md" and not p.name.startswith("."))


def model_report(model: str, summary_paths: list[str | Path], manifest_path: str | Path | None,
                 out_md: str | Path, out_html: str | Path) -> None:
    """The per-model page: architecture, then each experiment's headline numbers and figures."""
    out_md, out_html = Path(out_md), Path(out_html)
    md = [f"# {model}", ""]
    body = [f"<h1>{html.escape(model)}</h1>"]
    if manifest_path and Path(manifest_path).is_file():
        manifest = read_json(manifest_path)
        facts = manifest.get("architecture", {})
        source = manifest.get("source", {})
        src = ", ".join(f"{k}={v}" for k, v in source.items())
        md += [f"Source: `{src}`", ""]
        body.append(f"<p>Source: <code>{html.escape(src)}</code></p>")
        rows = [[k, _fmt(v)] for k, v in facts.items()]
        md += ["## Architecture", "", _md_table(["fact", "value"], rows), ""]
        body += ["<h2>Architecture</h2>", _html_table(["fact", "value"], rows)]
    from layerscope.jobs.config import experiment_infos

    EXPERIMENTS = experiment_infos()
    # experiments of one family (Experiment.section, e.g. z_subspace) share one section
    sections: dict[str, list[tuple[str, Path]]] = {}
    for path in map(Path, summary_paths):
        experiment = parse_summary_path(path)["experiment"]
        info = EXPERIMENTS.get(experiment)
        sections.setdefault(info.report_section if info else experiment, []).append((experiment, path))
    for section, items in sections.items():
        md += [f"## {section}", ""]
        body.append(f"<h2>{html.escape(section)}</h2>")
        family = any(experiment != section for experiment, _ in items)
        for experiment, path in items:
            where = parse_summary_path(path)
            label = scope_label(experiment, where["prompt_set"])
            if family:
                label = f"{experiment} — {label}"
            summary = read_json(path)
            rows = [[k, shown(summary, k, v)] for k, v in headline(summary).items()]
            note = evidence_note(summary)
            md += [f"### {label}", ""]
            body.append(f"<h3>{html.escape(label.replace('`', ''))}</h3>")
            if family and experiment in EXPERIMENTS:
                md += [f"_{EXPERIMENTS[experiment].description}_", ""]
                body.append(f"<p><em>{html.escape(EXPERIMENTS[experiment].description)}</em></p>")
            if note:
                md += [note, ""]
                body.append(f"<p class='evidence'>{html.escape(note).replace('**', '')}</p>")
            md += [_md_table(["metric", "value"], rows), ""]
            body.append(_html_table(["metric", "value"], rows))
            for table in _tables(path):
                rel_md = os.path.relpath(table, out_md.parent)
                rel_html = os.path.relpath(table, out_html.parent)
                md += [f"Table: [{table.name}]({rel_md})", ""]
                body.append(f"<p>Table: <a href='{html.escape(rel_html)}'>{html.escape(table.name)}</a></p>")
            for fig in _figures(path):
                rel_md = os.path.relpath(fig, out_md.parent)
                rel_html = os.path.relpath(fig, out_html.parent)
                md.append(f"![{experiment} {fig.stem}]({rel_md})")
                body.append(f"<figure><img src='{html.escape(rel_html)}' alt='{html.escape(fig.stem)}'>"
                            f"<figcaption>{html.escape(experiment)}: {html.escape(fig.stem)}</figcaption></figure>")
            md.append("")
    md.append(f"_layerscope {__version__}_")
    write_text(out_md, "\n".join(md) + "\n")
    write_text(out_html, _html_page(f"layerscope — {model}", "".join(body)))


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


def report_index(models: list[str], out_html: str | Path, cross_model_md: str | Path) -> None:
    out_html = Path(out_html)
    links = "".join(f"<li><a href='{html.escape(m)}.html'>{html.escape(m)}</a></li>" for m in models)
    cross = Path(cross_model_md).read_text() if Path(cross_model_md).is_file() else ""
    body = (f"<h1>layerscope report</h1><h2>Models</h2><ul>{links}</ul>"
            f"<h2>Cross-model comparison</h2><pre>{html.escape(cross)}</pre>")
    write_text(out_html, _html_page("layerscope report", body))
