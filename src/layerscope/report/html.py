"""HTML pages of the report, rendered with Jinja2 templates (``report/templates``).

Pages are self-contained static files: styles are inlined, curves are inline SVG, figures and
tables are linked by relative paths, nothing is fetched from the network when a page is viewed.
A value is rendered as a :class:`Cell`: text (``value [lo, hi]`` where the summary carries an
interval), and for a numeric list longer than :data:`INLINE_LIST` a small inline plot of the
curve, with its interval band where the summary has one.
"""

from __future__ import annotations

import functools
import html
import io
import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jinja2

INLINE_LIST = 4  # numeric lists up to this length are printed (with intervals); longer ones are drawn
SPARK_W, SPARK_H, SPARK_PAD = 180, 36, 3


@dataclass(frozen=True)
class Cell:
    text: str
    svg: str = ""  # inline SVG markup (already safe), empty when the value is printed
    title: str = ""  # the full value, shown on hover


def fmt(value: Any) -> str:
    """A number as the report prints it: integers as integers, others to 4 significant digits."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if value.is_integer() and abs(value) < 1e6:
            return str(int(value))
        return f"{value:.4g}"
    return str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_pair(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_number(v) for v in value)


def cell(value: Any, ci: Any = None) -> Cell:
    """How one summary value is shown: scalars with their interval, short lists inline, curves drawn."""
    if isinstance(value, list):
        if not value:
            return Cell("(none)")
        if all(_is_number(v) or v is None for v in value):
            numbers = [float("nan") if v is None else float(v) for v in value]
            full = ", ".join(fmt(v) for v in value)
            if len(value) <= INLINE_LIST:
                text = full
                if isinstance(ci, list) and len(ci) == len(value) and all(_is_pair(c) for c in ci):
                    text = ", ".join(f"{fmt(v)} [{fmt(c[0])}, {fmt(c[1])}]" for v, c in zip(value, ci))
                return Cell(text, title=full)
            band = ci if isinstance(ci, list) and len(ci) == len(value) and all(_is_pair(c) for c in ci) else None
            finite = [v for v in numbers if math.isfinite(v)]
            summary = (f"{len(value)} values, {fmt(min(finite))} … {fmt(max(finite))}" if finite
                       else f"{len(value)} values, none finite")
            return Cell(summary, svg=sparkline(numbers, band), title=full)
        if all(isinstance(v, (str, bool)) or v is None for v in value):
            shown = [fmt(v) for v in value]
            text = ", ".join(shown[:12]) + (f", … (+{len(shown) - 12} more)" if len(shown) > 12 else "")
            return Cell(text, title=", ".join(shown))
        return Cell(f"{len(value)} entries (see summary.json)")
    if isinstance(value, dict):
        return Cell(f"{len(value)} entries (see summary.json)")
    if _is_pair(ci) and _is_number(value):
        return Cell(f"{fmt(value)} [{fmt(ci[0])}, {fmt(ci[1])}]")
    return Cell(fmt(value))


def sparkline(values: list[float], band: list | None = None) -> str:
    """A small inline SVG curve of ``values`` (x: index), with a shaded interval band if given."""
    lows = [float(b[0]) for b in band] if band else []
    highs = [float(b[1]) for b in band] if band else []
    finite = [v for v in values + lows + highs if math.isfinite(v)]
    if not finite:
        return ""
    lo, hi = min(finite), max(finite)
    span = hi - lo or 1.0
    n = len(values)

    def x(i: int) -> float:
        return SPARK_PAD + (SPARK_W - 2 * SPARK_PAD) * (i / (n - 1) if n > 1 else 0.5)

    def y(v: float) -> float:
        return SPARK_H - SPARK_PAD - (SPARK_H - 2 * SPARK_PAD) * (v - lo) / span

    parts = [f"<svg class='spark' xmlns='http://www.w3.org/2000/svg' width='{SPARK_W}' height='{SPARK_H}' "
             f"viewBox='0 0 {SPARK_W} {SPARK_H}' role='img'>"]
    parts.append(f"<title>{html.escape(f'{n} values from {fmt(lo)} to {fmt(hi)} (index 0 at the left)')}</title>")
    if band:
        upper = [(x(i), y(h)) for i, h in enumerate(highs) if math.isfinite(h)]
        lower = [(x(i), y(l)) for i, l in enumerate(lows) if math.isfinite(l)]
        if upper and lower:
            points = " ".join(f"{a:.1f},{b:.1f}" for a, b in upper + lower[::-1])
            parts.append(f"<polygon points='{points}' fill='#9ecae1' fill-opacity='0.5' stroke='none'/>")
    segment: list[str] = []
    segments = []
    for i, v in enumerate(values):
        if math.isfinite(v):
            segment.append(f"{x(i):.1f},{y(v):.1f}")
        elif segment:
            segments.append(segment)
            segment = []
    if segment:
        segments.append(segment)
    for seg in segments:
        if len(seg) == 1:
            cx, cy = seg[0].split(",")
            parts.append(f"<circle cx='{cx}' cy='{cy}' r='1.5' fill='#08519c'/>")
        else:
            parts.append(f"<polyline points='{' '.join(seg)}' fill='none' stroke='#08519c' stroke-width='1.3'/>")
    parts.append("</svg>")
    return "".join(parts)


# ---------------------------------------------------------------------------- captions


def caption_html(caption_file: str | Path, wildcards: dict[str, str]) -> str:
    """A figure's caption (reStructuredText with Jinja2 placeholders, as Snakemake's report reads it)
    rendered to an HTML fragment; empty if the file is missing."""
    path = Path(caption_file)
    if not path.is_file():
        return ""
    return _caption_html(path.read_text(), tuple(sorted(wildcards.items())))


@functools.lru_cache(maxsize=256)
def _caption_html(template: str, wildcards: tuple) -> str:
    from docutils.core import publish_parts

    snakemake = SimpleNamespace(wildcards=SimpleNamespace(**dict(wildcards)), config={}, params={})
    text = jinja2.Template(template).render(snakemake=snakemake)
    parts = publish_parts(text, writer="html",
                          settings_overrides={"report_level": 5, "halt_level": 5, "warning_stream": io.StringIO(),
                                              "doctitle_xform": False, "initial_header_level": 4})
    return parts["body"]


def caption_problems(template: str, wildcards: dict[str, str]) -> list[str]:
    """docutils' warnings and errors for a caption (an empty list for a clean one)."""
    from docutils.core import publish_parts

    snakemake = SimpleNamespace(wildcards=SimpleNamespace(**wildcards), config={}, params={})
    text = jinja2.Template(template).render(snakemake=snakemake)
    stream = io.StringIO()
    publish_parts(text, writer="html", settings_overrides={"report_level": 2, "halt_level": 5,
                                                                 "warning_stream": stream})
    return [line for line in stream.getvalue().splitlines() if line.strip()]


# ---------------------------------------------------------------------------- templates


@functools.lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("layerscope.report", "templates"),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["fmt"] = fmt
    return env


def render(template: str, **context: Any) -> str:
    from layerscope import __version__

    return environment().get_template(template).render(version=__version__, **context)
