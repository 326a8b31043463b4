"""Progress lines of long loops: what they say, how often, that they land in the job's log, and that
reporting never changes a result."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from layerscope.engines.surgery import LossEvaluator, swap
from layerscope.progress import ENV, Progress, duration, progress, progress_interval, tqdm_factory, track
from tests.helpers import REPO
from tests.helpers.surgery import token_cache

LOGGER = "layerscope.progress"
# "<label> 2.5/10 sequences (25.0%), 49.6/s, elapsed 0.1s, ETA 0.3s"
LINE = re.compile(r"^(?P<label>.+?) (?P<done>[\d.]+)/(?P<total>\d+) (?P<unit>\w+) \((?P<pct>[\d.]+)%\), "
                  r"(?P<rate>[\d.e+]+)/s.*, elapsed \S+, ETA \S+$")
FINAL = re.compile(r"^(?P<label>.+?) done: (?P<done>[\d.]+)/(?P<total>\d+) (?P<unit>\w+) in \S+")


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def test_a_line_says_done_total_percent_rate_and_eta(caplog):
    clock = FakeClock()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        bar = Progress("sweep", 200, unit="variants", interval=5, clock=clock)
        clock.t += 10
        bar.update(50)  # 10 s after the start, past the interval: one line
        clock.t += 1
        bar.update(10)  # 1 s after that line: throttled
        clock.t += 29
        bar.update(140)
        bar.close()
        bar.close()  # once only
    lines = messages(caplog)
    # 50 done in 10 s: 5 per second, 150 left: 30 s
    assert lines[0] == "sweep 50/200 variants (25.0%), 5/s, elapsed 10s, ETA 30s"
    assert lines[1] == "sweep 200/200 variants (100.0%), 5/s, elapsed 40s, ETA 0s"
    assert lines[2] == "sweep done: 200/200 variants in 40s (5/s)"
    assert len(lines) == 3


def test_slow_rates_unknown_totals_and_durations():
    clock = FakeClock()
    bar = Progress("gen", None, interval=0, clock=clock)
    clock.t += 120
    bar.update(3)
    assert bar.line() == "gen 3, 0.025/s (40s each), elapsed 2m00s"  # no total: no percent, no ETA
    bar = Progress("gen", 10, interval=0, clock=clock)
    assert "ETA ?" in bar.line()  # nothing done yet: no rate to extrapolate
    assert [duration(s) for s in (3.21, 42, 245, 7380)] == ["3.2s", "42s", "4m05s", "2h03m"]


def test_the_interval_comes_from_the_environment(monkeypatch, caplog):
    monkeypatch.setenv(ENV, "0.25")
    assert progress_interval() == 0.25 and Progress("x").interval == 0.25
    monkeypatch.delenv(ENV)
    assert progress_interval() == 5.0
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv(ENV, bad)
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            assert progress_interval() == 5.0
        assert ENV in caplog.text


def test_track_counts_items_or_weights_and_says_where_a_loop_stopped(caplog):
    with caplog.at_level(logging.INFO, logger=LOGGER):
        seen = list(track([[1, 2], [3], [4, 5, 6]], "batches", total=6, weight=len, unit="rows", interval=0))
        assert seen == [[1, 2], [3], [4, 5, 6]]
        lines = messages(caplog)
        assert [LINE.match(m)["done"] for m in lines[:-1]] == ["2", "3", "6"]
        assert FINAL.match(lines[-1])["done"] == "6"
        caplog.clear()
        for i in track(range(10), "loop", interval=3600):  # total from len()
            if i == 3:
                break
        with pytest.raises(ValueError):
            with progress("failing", 4, interval=3600) as bar:
                bar.update(2)
                raise ValueError("boom")
    lines = messages(caplog)
    assert lines[0].startswith("loop stopped at 3/10 after")
    assert lines[1].startswith("failing stopped at 2/4 after") and lines[1].endswith("(ValueError)")


def test_the_tqdm_factory_reports_like_vllm_uses_it(caplog, capsys):
    """vLLM's LLM._run_engine: the factory called with total/desc/postfix, then n, format_dict['elapsed'],
    postfix, update, refresh and close; and its request adder iterates a wrapped list."""
    factory = tqdm_factory("generate (vllm)", unit="prompts", interval=0)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert list(factory([1, 2, 3], desc="Adding requests")) == [1, 2, 3]
        pbar = factory(total=4, desc="Processed prompts", dynamic_ncols=True, postfix="est. speed input: 0 toks/s")
        for _ in range(4):
            speed = 10 / max(pbar.format_dict["elapsed"], 1e-9)
            pbar.postfix = f"est. speed input: {speed:.2f} toks/s"
            pbar.update(1)
            if pbar.n == 4:
                pbar.refresh()
        pbar.close()
    lines = messages(caplog)
    adding = [m for m in lines if "Adding requests" in m]
    processed = [LINE.match(m) for m in lines if "Processed prompts" in m and "done:" not in m]
    assert FINAL.match(adding[-1])["done"] == "3"
    assert [m["done"] for m in processed] == ["1", "2", "3", "4"]
    assert lines[-1].startswith("generate (vllm): Processed prompts done: 4/4 prompts in")
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""  # no bar drawn


# ---------------------------------------------------------------------------- the surgery engine's sweep


@pytest.fixture(scope="module")
def evaluator(stories, tmp_path_factory):
    adapter, tok = stories
    cache, _ = token_cache(adapter, tok, tmp_path_factory.mktemp("progress_cache"), seed=3)
    ev = LossEvaluator(adapter, cache, batch_size=2)  # 5 prompts: 3 groups
    assert len(ev.groups) == 3
    return ev


def all_swaps(n):
    return [swap(n, i, j) for i in range(n) for j in range(i + 1, n)]


def test_a_sweep_logs_progress_per_finished_sequence_and_a_final_line(evaluator, monkeypatch, caplog):
    monkeypatch.setenv(ENV, "0")
    variants = all_swaps(evaluator.n_layers)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        evaluator.losses(variants, progress="swap: variants")
    lines = messages(caplog)
    parsed = [LINE.match(m) for m in lines[:-1]]
    assert all(parsed), lines
    n, groups = len(variants), len(evaluator.groups)
    assert len(parsed) == n * groups  # interval 0: one line per (group, sequence)
    assert {m["label"] for m in parsed} == {"swap: variants"} and {m["unit"] for m in parsed} == {"sequences"}
    assert {int(m["total"]) for m in parsed} == {n}
    done = [float(m["done"]) for m in parsed]
    expected = [(g * n + k + 1) / groups for g in range(groups) for k in range(n)]  # groups are the outer loop
    np.testing.assert_allclose(done, expected, atol=0.05)  # printed with one decimal
    assert all(b > a for a, b in zip(done, done[1:])) and done[-1] == n
    assert [float(m["pct"]) for m in parsed][-1] == 100.0
    assert all(float(m["rate"]) > 0 for m in parsed)
    final = FINAL.match(lines[-1])
    assert final and final["label"] == "swap: variants" and final["done"] == final["total"] == str(n)


def test_with_a_long_interval_only_the_final_line_appears(evaluator, monkeypatch, caplog):
    monkeypatch.setenv(ENV, "3600")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        evaluator.losses(all_swaps(evaluator.n_layers), progress="swap: variants")
    lines = messages(caplog)
    assert len(lines) == 1 and FINAL.match(lines[0])


def test_progress_never_changes_the_losses(evaluator, monkeypatch, caplog):
    monkeypatch.setenv(ENV, "0")
    variants = all_swaps(evaluator.n_layers) + [list(range(evaluator.n_layers))]
    plain = evaluator.losses(variants, per_token=True)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        reported = evaluator.losses(variants, per_token=True, progress="swap: variants")
    assert messages(caplog)
    for a, b in zip(plain, reported):
        np.testing.assert_array_equal(a, b)  # the same kernels in the same order: bit for bit
    assert not [r for r in caplog.records if r.name == LOGGER and r.levelno > logging.INFO]
    # and without a label the engine says nothing
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        evaluator.losses(variants[:2])
    assert messages(caplog) == []


# ---------------------------------------------------------------------------- the job's log file


def test_progress_lines_land_in_the_jobs_log_file(stories_dir, tmp_path):
    """A job as Snakemake runs it (jobs.runtime.job with the rule's log file, in its own process):
    activation extraction and the swap sweep write their progress to the log, nothing to the console."""
    log_file = tmp_path / "logs" / "swap" / "stories_set.log"
    script = textwrap.dedent(f"""
        from types import SimpleNamespace
        from pathlib import Path
        from layerscope.jobs.runtime import job
        from layerscope.engines.surgery import LossEvaluator
        from layerscope.experiments.surgery.swap import swap_sweep
        from layerscope.model.adapter import load_model, load_tokenizer
        from tests.helpers.surgery import token_cache

        with job(SimpleNamespace(threads=1, log=[{str(log_file)!r}], rule="swap"), gpu=True):
            adapter, tok = load_model({str(stories_dir)!r}), load_tokenizer({str(stories_dir)!r})
            cache, _ = token_cache(adapter, tok, Path({str(tmp_path)!r}))
            swap_sweep(LossEvaluator(adapter, cache, batch_size=2))
    """)
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}:{REPO}", ENV: "0", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "layerscope.progress" not in done.stdout + done.stderr
    text = log_file.read_text()
    progress_lines = [line.split("layerscope.progress: ", 1)[1] for line in text.splitlines()
                      if " INFO layerscope.progress: " in line]
    sweep = [LINE.match(m) for m in progress_lines if m.startswith("swap: variants") and "done:" not in m]
    assert sweep and all(sweep)
    assert [float(m["done"]) for m in sweep][-1] == 10  # stories260K: 5 blocks, 10 swaps
    assert any(FINAL.match(m) and m.startswith("swap: variants") for m in progress_lines)
    assert any(FINAL.match(m) and m.startswith("extract activations done: 5/5") for m in progress_lines)
    assert text.index("swap: variants done:") < text.index("INFO layerscope: done in")
