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
