"""Report pages: headline numbers with their intervals and the underpowered flags."""

from layerscope.jobs.io import write_json
from layerscope.report.pages import evidence_note, headline, headline_table, intervals, model_report, shown

SUMMARY = {
    "model": "m", "experiment": "knockout",
    "baseline_loss": 2.5, "baseline_loss_ci": [2.25, 2.75],
    "ratio_by_layer": [1.0, 2.0], "ratio_by_layer_ci": [[0.9, 1.1], [1.5, 2.5]],
    "most_critical_layer": 1, "most_critical_layer_stability": 0.62,
    "uncertainty": {"unit": "prompt", "n_units": 7, "n_boot": 1000, "level": 0.95,
                    "method": "percentile bootstrap over units"},
    "underpowered": True,
    "underpowered_reasons": ["most_critical_layer is reproduced by 62% of bootstrap resamples (< 80%)"],
}


def test_a_number_is_shown_with_its_interval_and_the_interval_has_no_row_of_its_own():
    rows = headline(SUMMARY)
    assert "baseline_loss_ci" not in rows and rows["baseline_loss"] == 2.5
    assert intervals(SUMMARY) == {"baseline_loss": [2.25, 2.75]}
    assert shown(SUMMARY, "baseline_loss", 2.5) == "2.5 [2.25, 2.75]"
    assert shown(SUMMARY, "most_critical_layer", 1) == "1"
    assert "underpowered_reasons" not in rows and rows["underpowered"] is True


def test_evidence_note_says_what_the_intervals_are_over_and_why_a_claim_is_underpowered():
    note = evidence_note(SUMMARY)
    assert "95% percentile bootstrap over units (7 prompts, 1000 resamples)" in note
    assert "Underpowered" in note and "62%" in note
    exact = {"uncertainty": {"unit": None, "n_units": None, "n_boot": 0, "level": None,
                             "method": "none: deterministic given the weights"}, "underpowered": False}
    assert evidence_note(exact) == "No intervals: none: deterministic given the weights."


def test_pages_print_value_and_interval(tmp_path):
    path = tmp_path / "results" / "m" / "core" / "knockout" / "summary.json"
    path.parent.mkdir(parents=True)
    write_json(path, SUMMARY)
    model_report("m", [path], None, tmp_path / "m.md", tmp_path / "m.html")
    md = (tmp_path / "m.md").read_text()
    assert "| baseline_loss | 2.5 [2.25, 2.75] |" in md and "**Underpowered**" in md
    assert "2.5 [2.25, 2.75]" in (tmp_path / "m.html").read_text()
    table = headline_table([path])
    row = table[table["metric"] == "baseline_loss"].iloc[0]
    assert row["value"] == "2.5 [2.25, 2.75]" and row["number"] == 2.5


# ---------------------------------------------------------------------------- HTML pages

import json  # noqa: E402
import re  # noqa: E402

import pytest  # noqa: E402

from layerscope.report.html import caption_problems, cell, sparkline  # noqa: E402
from layerscope.report.pages import notes, provenance, report_index  # noqa: E402

CURVE = [0.1 * i for i in range(30)]
RICH = {
    **SUMMARY, "experiment": "knockout",
    "ratio_by_layer": CURVE, "ratio_by_layer_ci": [[v - 0.05, v + 0.05] for v in CURVE],
    "pairwise_layers": [3, 7], "converged": False, "applicable": True,
    "skipped_words": {"colors": ["magenta", "cyan"]},
    "provenance": {"experiment": "knockout", "commit": "abc123", "versions": {"torch": "2.13.0"},
                   "params_sha256": "f" * 64},
}


def test_values_are_shown_as_a_reader_expects():
    assert cell(True).text == "yes" and cell(False).text == "no"
    assert cell(2.5, [2.25, 2.75]).text == "2.5 [2.25, 2.75]"
    short = cell([1.0, 2.0], [[0.5, 1.5], [1.5, 2.5]])
    assert short.text == "1 [0.5, 1.5], 2 [1.5, 2.5]" and not short.svg
    curve = cell(CURVE, RICH["ratio_by_layer_ci"])
    assert curve.text == "30 values, 0 … 2.9" and curve.svg.startswith("<svg")
    points = re.search(r"<polyline points='([^']*)'", curve.svg).group(1).split()
    assert len(points) == 30  # one vertex per layer
    ys = [float(p.split(",")[1]) for p in points]
    assert ys == sorted(ys, reverse=True)  # an increasing curve rises (SVG y grows downwards)
    assert "<polygon" in curve.svg  # the interval band
    assert "<polygon" not in sparkline(CURVE)
    assert cell(["a"] * 20).text.endswith("(+8 more)")


def test_notes_collect_every_warning_a_summary_records():
    found = notes({**RICH, "applicable": False, "reason": "the models do not share a tokenizer",
                   "n_converged": 1, "n_runs": 4, "n_empty_completions": 2, "notes": ["layer 3 skipped: no tokens"]})
    text = "\n".join(found)
    assert "Not applicable: the models do not share a tokenizer." in text
    assert "Underpowered: most_critical_layer is reproduced by 62%" in text
    assert "3 of 4 optimisation runs did not converge" in text
    assert "colors: magenta, cyan" in text and "2 prompt(s) with an empty completion" in text
    assert "layer 3 skipped: no tokens" in text
    assert notes({"underpowered": False}) == []


def test_model_page_is_html_with_curves_notes_captions_and_links(tmp_path):
    folder = tmp_path / "results" / "m" / "core" / "knockout"
    folder.mkdir(parents=True)
    write_json(folder / "summary.json", RICH)
    (folder / "metrics.parquet").write_bytes(b"PAR1")
    (folder / "ratio.png").write_bytes(b"\x89PNG")
    out = tmp_path / "results" / "report"
    model_report("m", [folder / "summary.json"], None, out / "m.md", out / "m.html")
    page = (out / "m.html").read_text()
    assert "<table" in page and "|---|" not in page
    assert "<svg class='spark'" in page and json.dumps(CURVE) not in page
    assert "Underpowered: most_critical_layer" in page and "magenta, cyan" in page
    assert "href=\"../m/core/knockout/metrics.parquet\"" in page
    assert "src=\"../m/core/knockout/ratio.png\"" in page
    # the caption comes from resources/report/knockout_ratio.rst, rendered from reStructuredText
    assert "each block" in page.lower() or "skipp" in page.lower()
    assert "{{" not in page and "snakemake.wildcards" not in page
    assert page.index("most_critical_layer") < page.index("pairwise_layers")  # key numbers lead


def test_index_and_provenance(tmp_path):
    folder = tmp_path / "results" / "m" / "core" / "knockout"
    folder.mkdir(parents=True)
    write_json(folder / "summary.json", RICH)
    bench = tmp_path / "results" / "benchmarks" / "knockout"
    bench.mkdir(parents=True)
    (bench / "m_core.tsv").write_text("s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\t"
                                      "cpu_time\n12.5\t0:00:12\t812.3\t1\t1\t1\t0\t0\t90\t11.0\n")
    manifest = tmp_path / "layerscope.json"
    write_json(manifest, {"kind": "decoder", "architecture": {"family": "llama", "n_layers": 30},
                          "source": {"type": "local"}, "weights": {"model.safetensors": "ab" * 32}})
    out = tmp_path / "results" / "report"
    report_index(["m"], [folder / "summary.json"], {"m": manifest}, out / "index.html", out / "provenance.html",
                 config={"seed": 0, "experiments": {"knockout": {"max_prompts": 7}}},
                 benchmarks_dir=tmp_path / "results" / "benchmarks")
    index = (out / "index.html").read_text()
    assert "<table" in index and "|---|" not in index and "<pre>" not in index
    assert "href=\"m.html#knockout--core\"" in index
    assert "2.5 [2.25, 2.75]" in index and "underpowered" in index
    prov = (out / "provenance.html").read_text()
    assert "812.3" in prov and "12.5" in prov and "ab" * 32 in prov and "max_prompts: 7" in prov
    assert "abc123" in prov and "snakemake" in prov
    facts = provenance([folder / "summary.json"], {"m": manifest}, None, tmp_path / "results" / "benchmarks")
    assert facts["total_seconds"] == 12.5 and facts["commits"] == ["abc123"] and not facts["mixed_commits"]


def test_every_caption_renders_as_clean_restructuredtext():
    from layerscope.experiments.registry import experiments
    from tests.helpers import REPO

    wildcards = {"model": "m", "pset": "p", "model_a": "a", "model_b": "b"}
    checked = 0
    for exp in experiments().values():
        for figure in exp.figures:
            path = REPO / exp.caption(figure)
            assert path.is_file(), f"{exp.name}: figure {figure.name} has no caption file {path}"
            problems = caption_problems(path.read_text(), wildcards)
            assert not problems, f"{path.name}: {problems}"
            checked += 1
    assert checked >= 30


@pytest.mark.parametrize("text", ["the norm |h| of a state", "|cos| between"])
def test_the_caption_check_catches_substitution_syntax(text):
    assert any("Undefined substitution" in p for p in caption_problems(text, {}))
